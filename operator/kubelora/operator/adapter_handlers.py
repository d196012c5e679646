"""Thin kopf handlers for AdapterDeployments; the work is in ``adapterdeployments.py``.

Watches feed one per-key work queue (``workqueue.WorkQueue``, keys ``(namespace, name)``); its workers run
the level-based pass, one at a time per AdapterDeployment, each with a timeout:

- an AdapterDeployment seen for the first time, or with a new generation;
- a LoRAJob whose status changes (phase, digest, eval verdict), for the AdapterDeployments that name it,
  so a rollout begins as soon as the adapter is published;
- a pod that turns Ready or not, restarts a container, changes IP or goes away, for the
  AdapterDeployments whose target selector matches it: a restarted or new vLLM pod gets its adapter back
  without polling;
- the pass itself asks for another look when time matters (a rollout in flight, a retry backoff, a source
  not yet readable); and every ``KUBELORA_ADAPTER_RESYNC_SECONDS`` (default 300) every AdapterDeployment
  is queued once more, the safety net for a missed event.

Delete unloads the adapter from every pod (kopf's finalizer holds the object until then): that is
cleanup outside the cluster, the one reason for a finalizer. Nothing else adds one.

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
from kubelora.operator import adapterdeployments, persistence
from kubelora.operator.config import OperatorConfig
from kubelora.operator.events import EventPoster
from kubelora.operator.lorajobs import Event
from kubelora.operator.server_pods import selector_matches
from kubelora.operator.workqueue import WorkQueue

ADAPTERDEPLOYMENTS = (GROUP, VERSION, "adapterdeployments")
LORAJOBS = (GROUP, VERSION, "lorajobs")
RESYNC_SECONDS = float(os.environ.get("KUBELORA_ADAPTER_RESYNC_SECONDS", "300"))
#: The longest one pass may take (downloads and loads have their own, shorter timeouts).
PASS_TIMEOUT_SECONDS = float(os.environ.get("KUBELORA_ADAPTER_PASS_TIMEOUT_SECONDS", "900"))
#: Set by main(): this process runs only the AdapterDeployment controller and owns kopf's settings.
STANDALONE = False


@kopf.on.startup()
async def start_adapter_controller(settings: kopf.OperatorSettings, memo: Any, logger: Any, **_: Any) -> None:
    import aiohttp

    if STANDALONE:
        # the same persistence as the full operator (handlers.py), so either can take over the objects
        persistence.configure(settings)
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
    _EVENTS_API["poster"] = EventPoster(api_client, "AdapterDeployment")
    memo.lorajob_seen = {}
    memo.ad_seen = {}  # (namespace, name) -> (uid, generation): what the queue was last asked for
    memo.pod_seen = {}  # pod uid -> readiness fingerprint
    runtime = memo.adapters

    async def reconcile_key(key: tuple[str, str]) -> float | None:
        return await adapterdeployments.reconcile(runtime, key[0], key[1], _post)

    queue: WorkQueue[tuple[str, str]] = WorkQueue(
        "adapterdeployments", reconcile_key, workers=runtime_settings.concurrency, timeout=PASS_TIMEOUT_SECONDS
    )
    memo.adapter_queue = queue
    queue.resync(lambda: list(memo.ad_seen), RESYNC_SECONDS)
    if not STANDALONE and os.environ.get("KUBELORA_PEERING_NAME"):
        # Like kopf, start paused until the peering says this replica leads (handlers.follow_peering resumes it).
        queue.pause()
    queue.start()
    logger.info(
        "Started AdapterDeployment controller resyncSeconds=%s workers=%d agentPort=%d",
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
    queue = getattr(memo, "adapter_queue", None)
    if queue is not None:
        await queue.stop()
    http = getattr(memo, "http", None)
    if http is not None:
        await http.close()
    poster = _EVENTS_API.pop("poster", None)
    if poster is not None:
        poster.shutdown()
    if getattr(memo, "adapter_owns_api_client", False):
        memo.adapter_api_client.close()


def _post(obj: Mapping[str, Any], event: Event) -> None:
    """Post an Event about an AdapterDeployment without blocking the loop, in order with its others (the queue's
    workers run outside kopf's handlers, where kopf's own event poster is not available)."""
    poster = _EVENTS_API.get("poster")
    if poster is not None:
        poster.post(obj, [event])


_EVENTS_API: dict[str, Any] = {}


@kopf.on.event(*ADAPTERDEPLOYMENTS)
async def adapterdeployment_changed(
    body: kopf.Body, namespace: str | None, name: str | None, memo: Any, **kwargs: Any
) -> None:
    queue = getattr(memo, "adapter_queue", None)
    if queue is None or namespace is None or name is None:
        return
    key = (namespace, name)
    if (kwargs.get("event") or {}).get("type") == "DELETED":
        memo.ad_seen.pop(key, None)
        queue.forget(key)
        memo.adapters.forget(namespace, name, (body.get("metadata") or {}).get("uid"))
        # One that lost a servedName conflict to it may serve now.
        for other in [k for k in memo.ad_seen if k[0] == namespace]:
            queue.add(other)
        return
    # Its own status writes come back as events too: only a new object, a new generation or a deletion
    # starting needs a pass (the pass itself schedules what time-driven work remains).
    meta = body.get("metadata") or {}
    fingerprint = (meta.get("uid"), meta.get("generation"), bool(meta.get("deletionTimestamp")))
    if memo.ad_seen.get(key) != fingerprint:
        memo.ad_seen[key] = fingerprint
        queue.add(key)


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
        memo.adapter_queue.add((namespace, ad_name))


def _pod_fingerprint(body: Mapping[str, Any]) -> tuple[Any, ...]:
    status = body.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
    return (status.get("podIP"), ready, restarts, bool((body.get("metadata") or {}).get("deletionTimestamp")))


@kopf.on.event("", "v1", "pods")
async def pod_changed(body: kopf.Body, namespace: str | None, memo: Any, **kwargs: Any) -> None:
    queue = getattr(memo, "adapter_queue", None)
    uid = (body.get("metadata") or {}).get("uid")
    if queue is None or namespace is None or not uid:
        return
    if (kwargs.get("event") or {}).get("type") == "DELETED":
        memo.pod_seen.pop(uid, None)
    else:
        fingerprint = _pod_fingerprint(body)
        if memo.pod_seen.get(uid) == fingerprint:
            return
        memo.pod_seen[uid] = fingerprint
    memo.adapters.drop_reads(namespace)  # the passes this queues must see the pod as it is now
    labels = (body.get("metadata") or {}).get("labels") or {}
    for (ad_namespace, ad_name), selector in list(memo.adapters.selectors.items()):
        if ad_namespace == namespace and selector_matches(selector, labels):
            queue.add((ad_namespace, ad_name))


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
