"""Thin kopf handlers for AdapterDeployments; the work is in ``adapterdeployments.py``.

- create/update(spec)/resume and a resync timer (every ``KUBELORA_ADAPTER_RESYNC_SECONDS``, default 3)
  run the same level-based pass; the timer is what repairs drift (a restarted or new vLLM pod gets its
  adapter back, failed loads are retried).
- a LoRAJob whose status changes (phase, digest, eval verdict) starts a pass of the AdapterDeployments
  that name it, so a rollout begins as soon as the adapter is published.
- delete unloads the adapter from every pod (kopf's finalizer holds the object until then).

All HTTP goes through one aiohttp session (``memo.http``) and Kubernetes calls through
``asyncio.to_thread``, so nothing blocks the event loop.

``kubelora operator`` registers these handlers next to the LoRAJob controller. ``python -m
kubelora.operator.adapter_handlers --namespace NS`` runs the AdapterDeployment controller alone (tests
and benchmarks use it, so no LoRAJob controller touches the LoRAJobs they write by hand).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import kopf

from kubelora.api.v1alpha1 import GROUP, VERSION
from kubelora.operator import adapterdeployments
from kubelora.operator.config import OperatorConfig
from kubelora.operator.lorajobs import Event

ADAPTERDEPLOYMENTS = (GROUP, VERSION, "adapterdeployments")
LORAJOBS = (GROUP, VERSION, "lorajobs")
RESYNC_SECONDS = float(os.environ.get("KUBELORA_ADAPTER_RESYNC_SECONDS", "3"))
#: Set by main(): this process runs only the AdapterDeployment controller and owns kopf's settings.
STANDALONE = False


@kopf.on.startup()
async def start_adapter_controller(settings: kopf.OperatorSettings, memo: Any, logger: Any, **_: Any) -> None:
    import aiohttp

    if STANDALONE:
        # the same persistence as the full operator (handlers.py), so either can take over the objects
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubelora.dev")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="kubelora.dev", key="last-handled-configuration"
        )
        settings.persistence.finalizer = "kubelora.dev/cleanup"
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
    # A deletion waits for the object's timer to stop; kopf looks again only after this many seconds
    # (default 60), which would hold every deleted AdapterDeployment whose resync was running.
    settings.background.cancellation_polling = min(settings.background.cancellation_polling, 2)
    api_client = getattr(memo, "api_client", None)
    memo.adapter_owns_api_client = api_client is None
    if api_client is None:
        api_client = await asyncio.to_thread(_new_api_client)
    config = getattr(memo, "config", None)
    if config is None:
        path = os.environ.get("KUBELORA_CONFIG")
        config = OperatorConfig.load(Path(path) if path else None)
    runtime_settings = adapterdeployments.Settings.from_env(config.agent_image)
    memo.http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max(64, 4 * runtime_settings.concurrency)),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
    )
    memo.adapters = adapterdeployments.Runtime(
        adapterdeployments.KubeApi(api_client), memo.http, config, runtime_settings
    )
    memo.adapter_api_client = api_client
    memo.adapter_tasks = set()
    memo.lorajob_seen = {}
    logger.info(
        "Started AdapterDeployment controller resyncSeconds=%s concurrency=%d agentPort=%d",
        RESYNC_SECONDS,
        runtime_settings.concurrency,
        runtime_settings.agent_port,
    )


def _new_api_client() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api_client = client.ApiClient()
    api_client.configuration.connection_pool_maxsize = 32
    return api_client


@kopf.on.cleanup()
async def stop_adapter_controller(memo: Any, **_: Any) -> None:
    for task in list(getattr(memo, "adapter_tasks", ())):
        task.cancel()
    http = getattr(memo, "http", None)
    if http is not None:
        await http.close()
    if getattr(memo, "adapter_owns_api_client", False):
        memo.adapter_api_client.close()


def _post(obj: Mapping[str, Any], event: Event) -> None:
    kopf.event(dict(obj), type=event.type, reason=event.reason, message=event.message)  # type: ignore[arg-type]


@kopf.on.create(*ADAPTERDEPLOYMENTS, errors=kopf.ErrorsMode.IGNORED)
@kopf.on.update(*ADAPTERDEPLOYMENTS, field="spec", errors=kopf.ErrorsMode.IGNORED)
@kopf.on.resume(*ADAPTERDEPLOYMENTS, errors=kopf.ErrorsMode.IGNORED)
async def reconcile_adapterdeployment(name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    # Errors are left to the resync timer, which runs the same pass a few seconds later.
    await adapterdeployments.reconcile(memo.adapters, namespace or "default", name, _post)


@kopf.timer(*ADAPTERDEPLOYMENTS, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
async def resync_adapterdeployment(name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    await adapterdeployments.reconcile(memo.adapters, namespace or "default", name, _post)


@kopf.on.delete(*ADAPTERDEPLOYMENTS, retries=3, backoff=2)
async def unload_adapterdeployment(body: kopf.Body, memo: Any, logger: Any, **_: Any) -> None:
    obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AdapterDeployment", **dict(body)}
    events, remaining = await adapterdeployments.cleanup(memo.adapters, obj)
    for event in events:
        _post(obj, event)
    logger.info("Unloaded adapterdeployment=%s remaining=%s", body.metadata.name, remaining)


@kopf.index(*ADAPTERDEPLOYMENTS)
def adapterdeployments_by_lorajob(
    namespace: str | None, name: str, spec: Mapping[str, Any], **_: Any
) -> dict[Any, Any] | None:
    job = (spec.get("adapter") or {}).get("loraJob")
    return {(namespace, job): name} if job else None


@kopf.on.event(*LORAJOBS)
async def lorajob_changed(body: kopf.Body, namespace: str | None, name: str | None, memo: Any, **kwargs: Any) -> None:
    runtime = getattr(memo, "adapters", None)
    if runtime is None or namespace is None or name is None:
        return
    status = body.get("status") or {}
    fingerprint = (
        status.get("phase"),
        (status.get("adapter") or {}).get("digest"),
        (status.get("eval") or {}).get("passed"),
    )
    key = (namespace, name)
    if (kwargs.get("event") or {}).get("type") == "DELETED":
        memo.lorajob_seen.pop(key, None)
    elif memo.lorajob_seen.get(key) == fingerprint:
        return
    else:
        memo.lorajob_seen[key] = fingerprint
    index = kwargs.get("adapterdeployments_by_lorajob") or {}
    for ad_name in set(index.get(key, [])):
        task = asyncio.create_task(adapterdeployments.reconcile(runtime, namespace, ad_name, _post))
        memo.adapter_tasks.add(task)
        task.add_done_callback(memo.adapter_tasks.discard)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the AdapterDeployment controller alone."""
    global STANDALONE
    parser = argparse.ArgumentParser(prog="python -m kubelora.operator.adapter_handlers", description=main.__doc__)
    parser.add_argument("--namespace", "-n", action="append", default=[], help="Watch only this namespace")
    parser.add_argument("--all-namespaces", "-A", action="store_true")
    parser.add_argument("--config", type=Path, default=None, help="Operator config file (YAML)")
    parser.add_argument("--health-port", type=int, default=None, help="Serve /healthz on this port")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    STANDALONE = True
    if args.config is not None:
        os.environ["KUBELORA_CONFIG"] = str(args.config)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    kopf.run(
        clusterwide=args.all_namespaces or not args.namespace,
        namespaces=args.namespace,
        standalone=True,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
