"""kopf's peering object, created by the operator itself before kopf's peering starts.

With ``--peering=NAME`` kopf keeps this replica paused until it has seen the peering object (a
``ClusterKopfPeering`` when it watches every namespace, a ``KopfPeering`` in each namespace it
watches): if the object does not exist, kopf patches keep-alives into nothing and the operator
handles nothing, without an error. So the operator creates the objects at startup when they are
missing (an existing one is left as it is: it holds the other replicas' keep-alives). A Helm hook
used to create them, and every Argo CD sync deleted and re-created it.

The startup handler runs before any of kopf's own tasks (peering, watching) start. A missing CRD,
a namespace that does not exist or a missing ``create`` permission (when the object does not exist
either) stop the operator with a message that says so, rather than leave it paused for ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

import kopf

log = logging.getLogger("kubelora.peering")

GROUP = "kopf.dev"
VERSION = "v1"
CLUSTER_PLURAL = "clusterkopfpeerings"
NAMESPACED_PLURAL = "kopfpeerings"
LABELS = {"app.kubernetes.io/managed-by": "kubelora-operator"}
# kopf accepts namespace patterns (team-*, !kube-system); a peering object is made only in named ones.
_PATTERN_CHARS = set("*?[]!,")


class PeeringError(RuntimeError):
    """The peering object is missing and cannot be created."""


def peering_namespaces(namespaces: Sequence[str], clusterwide: bool) -> list[str | None]:
    """Where the peering objects go: None for the ClusterKopfPeering, else each named namespace."""
    if clusterwide:
        return [None]
    named = [ns for ns in namespaces if not (_PATTERN_CHARS & set(ns))]
    for pattern in sorted(set(namespaces) - set(named)):
        log.warning("No peering object for a namespace pattern pattern=%s", pattern)
    return list(dict.fromkeys(named))


def body(name: str, namespace: str | None) -> dict[str, Any]:
    kind = "ClusterKopfPeering" if namespace is None else "KopfPeering"
    metadata: dict[str, Any] = {"name": name, "labels": dict(LABELS)}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": metadata}


def ensure(api_client: Any, name: str, namespaces: Sequence[str | None]) -> dict[str | None, str]:
    """Create the peering object in each place that lacks one; returns "created" or "exists" by namespace.

    Creating and treating 409 AlreadyExists as success needs no read first and cannot race with another
    replica starting at the same time. A 403 on create is fine when the object exists anyway (RBAC
    managed by hand without ``create``); otherwise, and on 404 (no peering CRD, or no such
    namespace), it raises :class:`PeeringError`. Other API errors propagate, for the caller to retry.
    """
    from kubernetes import client

    api = client.CustomObjectsApi(api_client)
    outcome: dict[str | None, str] = {}
    for namespace in namespaces:
        where = f"namespace={namespace}" if namespace else "cluster-wide"
        kind = "ClusterKopfPeering" if namespace is None else "KopfPeering"
        try:
            if namespace is None:
                api.create_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL, body(name, None))
            else:
                api.create_namespaced_custom_object(GROUP, VERSION, namespace, NAMESPACED_PLURAL, body(name, namespace))
            outcome[namespace] = "created"
            log.info("Created the peering object kind=%s name=%s %s", kind, name, where)
        except client.ApiException as exc:
            if exc.status == 409:
                outcome[namespace] = "exists"
                continue
            if exc.status == 403 and _exists(api, name, namespace):
                outcome[namespace] = "exists"
                continue
            if exc.status in (403, 404, 422):
                hint = {
                    403: "grant the operator create on kopf.dev peering objects, or create the object yourself",
                    404: "install kopf's peering CRDs (the chart's crds.kopfPeering) and check the namespace exists",
                    422: "the API server refused the object",
                }[exc.status]
                raise PeeringError(
                    f"Cannot create {kind} {name} ({where}): {_api_message(exc)}; {hint}. Without it kopf "
                    f"keeps the operator paused; run with peering off (no --peering) for a single replica"
                ) from exc
            raise
    return outcome


def _api_message(exc: Any) -> str:
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (TypeError, ValueError, AttributeError):
        message = None
    return f"{exc.status} {message or exc.reason}"


def _exists(api: Any, name: str, namespace: str | None) -> bool:
    from kubernetes import client

    try:
        if namespace is None:
            api.get_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL, name)
        else:
            api.get_namespaced_custom_object(GROUP, VERSION, namespace, NAMESPACED_PLURAL, name)
    except client.ApiException:
        return False
    return True


def _new_api_client() -> Any:
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def register(name: str, namespaces: Sequence[str], clusterwide: bool) -> None:
    """Add the kopf startup handler that creates the peering objects (call before kopf.run)."""
    places = peering_namespaces(namespaces, clusterwide)

    @kopf.on.startup(id="kubelora-peering-object", backoff=5)
    async def create_peering_objects(**_: Any) -> None:
        api_client = await asyncio.to_thread(_new_api_client)
        try:
            await asyncio.to_thread(ensure, api_client, name, places)
        except PeeringError as exc:
            raise kopf.PermanentError(str(exc)) from exc
        finally:
            await asyncio.to_thread(api_client.close)
