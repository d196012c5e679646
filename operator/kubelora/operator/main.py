"""Run the operator: `kubelora operator` (or `kopf run -m kubelora.operator.handlers`)."""

from __future__ import annotations

import logging
import os
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
) -> None:
    if config is not None:
        os.environ["KUBELORA_CONFIG"] = str(config)
    if metrics_port:
        os.environ["KUBELORA_METRICS_PORT"] = str(metrics_port)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if os.environ.get("KUBELORA_COUNT_API_REQUESTS"):
        from kubelora.operator.metrics import instrument_api_clients

        instrument_api_clients()
    import kubelora.operator.handlers  # noqa: F401 - registers the handlers

    kopf.run(
        clusterwide=all_namespaces or not namespaces,
        namespaces=namespaces,
        standalone=peering is None,
        peering_name=peering,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
    )
