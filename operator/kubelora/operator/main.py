"""Run the operator: `kubelora operator` (or `kopf run -m kubelora.operator.handlers`)."""

from __future__ import annotations

import getpass
import json
import logging
import os
import secrets
import socket
from pathlib import Path

import kopf


def run(
    namespaces: list[str],
    all_namespaces: bool,
    config: Path | None,
    metrics_port: int | None,
    health_port: int | None,
    peering: str | None,
    verbose: bool = False,
    priority: int | None = None,
) -> None:
    if config is not None:
        os.environ["KUBELORA_CONFIG"] = str(config)
    if metrics_port:
        os.environ["KUBELORA_METRICS_PORT"] = str(metrics_port)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if verbose:
        os.environ["KUBELORA_VERBOSE"] = "1"
    _limit_malloc_arenas()
    if os.environ.get("KUBELORA_COUNT_API_REQUESTS"):
        from kubelora.operator.metrics import instrument_api_clients

        instrument_api_clients()
    # Importing the modules registers their handlers with kopf.
    import kubelora.operator.adapter_handlers
    import kubelora.operator.handlers  # noqa: F401

    if namespaces and not all_namespaces:
        os.environ["KUBELORA_NAMESPACED"] = "1"
    clusterwide = all_namespaces or not namespaces
    identity: str | None = None
    if peering is not None:
        from kubelora.operator import peering as peering_object

        # kopf stays paused until its peering object exists; a startup handler creates it before kopf's peering starts.
        peering_object.register(peering, namespaces, clusterwide)
        if priority is None:
            # kopf pauses every peer of equal priority; distinct priorities let one run and the rest stand by.
            priority = secrets.randbelow(1_000_000)
        # kopf keeps its pause to itself: the LoRAJob queue reads the same peering objects and applies kopf's rule,
        # so it needs this replica's identity (as kopf makes one, given here so both agree) and priority.
        identity = os.environ.get("POD_ID") or f"{getpass.getuser()}@{socket.gethostname()}/{secrets.token_hex(4)}"
        os.environ["KUBELORA_PEERING_NAME"] = peering
        os.environ["KUBELORA_PEERING_IDENTITY"] = identity
        os.environ["KUBELORA_PEERING_PRIORITY"] = str(priority)
        os.environ["KUBELORA_PEERING_PLACES"] = json.dumps(peering_object.peering_namespaces(namespaces, clusterwide))
    kopf.run(
        identity=identity,  # type: ignore[arg-type]  # kopf's Identity is a NewType of str
        priority=priority,
        clusterwide=clusterwide,
        namespaces=namespaces,
        standalone=peering is None,
        peering_name=peering,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
    )


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread its own heap arena; with a handler thread pool that bloats RSS."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        m_arena_max = -8
        libc.mallopt(m_arena_max, arenas)
    except (OSError, AttributeError):
        return
