"""The AdapterDeployment controller glue: observe, decide with :mod:`rollout`, act.

Plain asyncio code with no kopf in it; ``adapter_handlers.py`` holds the thin kopf handlers. One pass
(:func:`reconcile`) reads the object fresh, observes (:func:`observe`: resolves the adapter from a
LoRAJob or a URI pinned by digest, keeps a managed server as the spec says, lists the Ready target
pods), then takes steps (:func:`take_step`): ``rollout.step`` — a pure function of what was observed —
says what to do (converge pods, run the smoke check, write the preload ConfigMap, the new status and
events), and this module does it, asking ``rollout.step`` again with what converging the pods and the
smoke check saw. Status is written at each phase change. Passes of one object never overlap (a lock
per object), so watch events, resyncs and the pass's own requeues can all call it.

What each pod serves is read from vLLM's ``/v1/models``: the card named ``servedName`` has the adapter
path as ``root``, and the agent names each adapter directory after its digest, so the digest a pod
serves is known without keeping state. Every pass makes each Ready pod serve what it should (drift
repair): a restarted pod or a new one gets its adapter back. Failures are retried with a backoff per pod.

Split by concern: ``rollout`` (the phases and the transition function, no I/O), ``adapter_resolution``
(which adapter, read with the tenant's credentials, and its gates), ``server_pods`` (finding the pods,
the vLLM and agent client, converging one pod, the smoke check), ``managed_server`` (the managed
Deployment, its agent token and NetworkPolicy); this module holds the Kubernetes reads and writes and
the glue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from kubelora.api.v1alpha1 import GROUP, VERSION, AdapterDeployment, short_digest
from kubelora.operator import rollout
from kubelora.operator.adapter_resolution import AdapterReader, Resolution, ResolvedAdapter, resolve
from kubelora.operator.conditions import set_condition
from kubelora.operator.config import OperatorConfig
from kubelora.operator.lorajobs import Event
from kubelora.operator.managed_server import (
    AGENT_TOKEN_KEY,
    MANAGED_LABEL,
    SPEC_HASH_ANNOTATION,
    agent_token_secret,
    managed_deployment,
    managed_name,
    managed_network_policy,
    owner_reference,
    preload_configmap,  # preload:
)
from kubelora.operator.rollout import MAX_REPLICA_ENTRIES, ROLLOUT_PHASES, Plan, Want
from kubelora.operator.server_pods import (
    Pod,
    PodClient,
    PodError,
    PodTrack,
    Settings,
    converge,
    digest_of_root,
    smoke_check,
    target_pods,
)

log = logging.getLogger("kubelora.adapterdeployment")

__all__ = ["MAX_REPLICA_ENTRIES", "ROLLOUT_PHASES", "Pod", "PodError", "PodTrack", "Settings", "Want"]

PLURAL = "adapterdeployments"
DIGEST_HEX = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------------------------------------
# Settings and the runtime the handlers keep in memo


class Runtime:
    """What the service layer needs, built once at operator startup (see adapter_handlers)."""

    def __init__(self, kube: Any, http: Any, config: OperatorConfig, settings: Settings | None = None) -> None:
        self.kube = kube
        self.settings = settings or Settings.from_env(config.agent_image)
        self.pods = PodClient(http, self.settings)
        self.config = config
        self.reader = AdapterReader()
        self.semaphore = asyncio.Semaphore(self.settings.concurrency)
        self.locks: dict[str, asyncio.Lock] = {}
        self.tracks: dict[str, dict[str, PodTrack]] = {}
        self.adapters: dict[tuple[str, str | None, str, str, str | None], ResolvedAdapter] = {}
        self.selectors: dict[tuple[str, str], str] = {}  # (namespace, name) -> the target pods' label selector
        self.retired: set[tuple[str, int | None]] = set()  # (uid, generation) checked for a managed server to delete
        # (namespace, servedName) -> {AdapterDeployment name: (creationTimestamp, first claim, uids of its pods)}
        self.claims: dict[tuple[str, str], dict[str, tuple[str, int, frozenset[str]]]] = {}
        self.claim_seq = 0  # the order claims were first made in: breaks ties of creationTimestamp
        self.to_thread: Callable[..., Awaitable[Any]] = asyncio.to_thread
        # (kind, namespace, name or selector) -> (expiry, the read in flight or done): see shared_read
        self.reads: dict[tuple[str, str, str], tuple[float, asyncio.Future[Any]]] = {}

    async def shared_read(self, key: tuple[str, str, str], read: Callable[..., Any], *args: Any) -> Any:
        """``read(*args)`` in a thread, shared for ``settings.shared_read_seconds`` by every pass that asks for
        the same ``key``: a resync, or a pod event that concerns many AdapterDeployments of one Deployment, costs
        one GET or LIST per target, not one per AdapterDeployment. A failed read is not kept."""
        ttl = self.settings.shared_read_seconds
        if ttl <= 0:
            return await self.to_thread(read, *args)
        now = time.monotonic()
        entry = self.reads.get(key)
        if entry is None or entry[0] <= now:
            if len(self.reads) > 4096:
                self.reads = {k: v for k, v in self.reads.items() if v[0] > now}
            entry = (now + ttl, asyncio.ensure_future(self.to_thread(read, *args)))
            self.reads[key] = entry
        try:
            return await asyncio.shield(entry[1])
        except Exception:
            if self.reads.get(key) is entry:
                del self.reads[key]
            raise

    def drop_reads(self, namespace: str) -> None:
        """Something changed in ``namespace`` (a pod): the next pass reads afresh."""
        for key in [k for k in self.reads if k[1] == namespace]:
            del self.reads[key]

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self.locks.setdefault(f"{namespace}/{name}", asyncio.Lock())

    def forget(self, namespace: str, name: str, uid: str | None) -> None:
        self.locks.pop(f"{namespace}/{name}", None)
        self.selectors.pop((namespace, name), None)
        self.release_claims(namespace, name)
        if uid:
            self.tracks.pop(uid, None)

    def release_claims(self, namespace: str, name: str, keep: str | None = None) -> None:
        """Drop what ``name`` claims, except under the served name ``keep``."""
        for (claim_namespace, served), claimants in list(self.claims.items()):
            if claim_namespace != namespace or served == keep or name not in claimants:
                continue
            del claimants[name]
            if not claimants:
                del self.claims[(claim_namespace, served)]

    def claim(self, ad: AdapterDeployment, pods: Sequence[Pod]) -> str | None:
        """Record that ``ad`` serves its servedName on ``pods``; the older AdapterDeployment that already does
        on any of them, if there is one (that one wins: the newer gets a Conflict and touches nothing).

        Older is by creationTimestamp; it has whole seconds, so two made in the same second are told apart by
        which this operator saw claiming first (the one already serving keeps serving)."""
        namespace, name, served = ad.metadata.namespace or "default", ad.metadata.name, ad.spec.served_name
        created = str((ad.metadata.model_extra or {}).get("creationTimestamp") or "")
        self.release_claims(namespace, name, keep=served)
        claimants = self.claims.setdefault((namespace, served), {})
        mine = frozenset(p.uid for p in pods)
        if name in claimants:
            seq = claimants[name][1]
        else:
            self.claim_seq += 1
            seq = self.claim_seq
        claimants[name] = (created, seq, mine)
        older = sorted(
            (other_created, other_seq, other)
            for other, (other_created, other_seq, other_pods) in claimants.items()
            if other != name and other_pods & mine and (other_created, other_seq) < (created, seq)
        )
        return older[0][2] if older else None


# ----------------------------------------------------------------------------------------------------------
# Kubernetes reads and writes (synchronous; called through asyncio.to_thread)


class ManagedServerConflictError(Exception):
    """A Deployment of the managed server's name exists and another controls it."""


class KubeApi:
    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    @staticmethod
    def _missing(exc: Exception) -> bool:
        return getattr(exc, "status", None) == 404

    def get_adapterdeployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: Any = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            return dict(obj)
        except Exception as exc:
            if self._missing(exc):
                return None
            raise

    def get_lorajob(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: Any = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "lorajobs", name)
            return dict(obj)
        except Exception as exc:
            if self._missing(exc):
                return None
            raise

    def get_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        import base64

        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except Exception as exc:
            if self._missing(exc):
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            deployment = self.apps.read_namespaced_deployment(name, namespace)
        except Exception as exc:
            if self._missing(exc):
                return None
            raise
        return dict(self.api_client.sanitize_for_serialization(deployment))

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        result: Any = self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        return list(json.loads(result.data)["items"])

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": status}
            )
        except Exception as exc:
            if not self._missing(exc):
                raise

    def ensure_token_secret(self, namespace: str, name: str, key: str, owner: dict[str, Any]) -> str:
        """Create the agent token Secret once (a random token); returns created|exists. Raises if another owns it."""
        import base64
        import secrets

        from kubernetes.client.exceptions import ApiException

        token = base64.b64encode(secrets.token_urlsafe(32).encode()).decode()
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "labels": {MANAGED_LABEL: owner["name"], "app.kubernetes.io/managed-by": "kubelora"},
                "ownerReferences": [owner],
            },
            "data": {key: token},
        }
        try:
            self.core.create_namespaced_secret(namespace, body)  # type: ignore[arg-type]
            return "created"
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = self.core.read_namespaced_secret(name, namespace)
        owners = (existing.metadata.owner_references if existing.metadata else None) or []
        if not any(o.uid == owner["uid"] and o.controller for o in owners):
            raise ValueError(f"Secret {namespace}/{name} exists and is not owned by this AdapterDeployment")
        return "exists"

    def apply_networkpolicy(self, namespace: str, body: dict[str, Any]) -> str:
        """Create the NetworkPolicy, or patch its spec when it differs. Returns created|updated|unchanged."""
        from kubernetes import client

        networking = client.NetworkingV1Api(self.api_client)
        return self._create_or_patch(
            namespace,
            body,
            "spec",
            networking.read_namespaced_network_policy,
            networking.create_namespaced_network_policy,
            networking.patch_namespaced_network_policy,
        )

    def apply_configmap(self, namespace: str, body: dict[str, Any]) -> str:  # preload:
        """Create the ConfigMap, or patch its data when it differs. Returns created|updated|unchanged."""
        core = self.core
        return self._create_or_patch(
            namespace,
            body,
            "data",
            core.read_namespaced_config_map,
            core.create_namespaced_config_map,
            core.patch_namespaced_config_map,
        )

    def _create_or_patch(
        self, namespace: str, body: dict[str, Any], field: str, read: Any, create: Any, patch: Any
    ) -> str:
        """Create ``body``, or patch its ``field`` when the stored one differs; a creation race reads again."""
        from kubernetes.client.exceptions import ApiException

        name = body["metadata"]["name"]
        try:
            existing = read(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                create(namespace, body)
                return "created"
            except ApiException as raced:
                if raced.status != 409:
                    raise
                existing = read(name, namespace)
        stored = self.api_client.sanitize_for_serialization(getattr(existing, field)) or {}
        if stored == body[field]:
            return "unchanged"
        patch(name, namespace, {field: body[field]})
        return "updated"

    def apply_deployment(self, namespace: str, body: dict[str, Any]) -> str:
        """Server-side apply of the managed Deployment when its spec hash changed. Returns created|updated|unchanged.

        A Deployment of that name that this AdapterDeployment does not control is never taken over: adoption
        is only through the controller ownerReference (ManagedServerConflictError otherwise)."""
        name = body["metadata"]["name"]
        owner = body["metadata"]["ownerReferences"][0]["uid"]
        existing = self.get_deployment(namespace, name)
        if existing is not None:
            refs: list[dict[str, Any]] = existing["metadata"].get("ownerReferences") or []
            controller = next((r for r in refs if r.get("controller")), {})
            if controller.get("uid") != owner:
                raise ManagedServerConflictError(
                    f"Deployment {namespace}/{name} exists and is not controlled by this AdapterDeployment; "
                    "rename or delete it"
                )
            wanted = body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
            if (existing["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION) == wanted:
                return "unchanged"
        # Server-side apply: kubelora owns the fields it sets; fields others own (an HPA's replicas would be
        # one, were there one) are left alone, and conflicts over kubelora's own fields are taken back.
        self.apps.patch_namespaced_deployment(
            name,
            namespace,
            body,
            field_manager="kubelora",
            force=True,
            _content_type="application/apply-patch+yaml",
        )
        return "created" if existing is None else "updated"

    def delete_owned(self, namespace: str, name: str, owner_uid: str) -> list[str]:
        """Delete the managed Deployment and NetworkPolicy ``name`` if ``owner_uid`` controls them."""
        from kubernetes import client

        networking = client.NetworkingV1Api(self.api_client)
        deleted = []
        for kind, read, delete in (
            ("Deployment", self.apps.read_namespaced_deployment, self.apps.delete_namespaced_deployment),
            (
                "NetworkPolicy",
                networking.read_namespaced_network_policy,
                networking.delete_namespaced_network_policy,
            ),
        ):
            try:
                existing = read(name, namespace)
            except Exception as exc:
                if self._missing(exc):
                    continue
                raise
            owners = (existing.metadata.owner_references if existing.metadata else None) or []
            if any(o.uid == owner_uid and o.controller for o in owners):
                delete(name, namespace, propagation_policy="Background")
                deleted.append(f"{kind} {name}")
        return deleted


# ----------------------------------------------------------------------------------------------------------
# Controller glue: observe, call the transition function (rollout.step), carry out its plan


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def parse(obj: Mapping[str, Any]) -> AdapterDeployment:
    return AdapterDeployment.model_validate({"metadata": dict(obj["metadata"]), "spec": dict(obj.get("spec") or {})})


@dataclasses.dataclass
class Observation:
    """What the first step of a pass read (the adapter, the pods); the next steps of the same pass reuse it."""

    resolution: Resolution
    pods: list[Pod]
    target_problem: str | None


async def observe(
    runtime: Runtime, ad: AdapterDeployment, status: Mapping[str, Any]
) -> tuple[Observation, list[Event]]:
    """Resolve the adapter, keep the managed server (if any) as the spec says, and list the target pods."""
    events: list[Event] = []
    if status.get("phase") in ROLLOUT_PHASES:
        # While a rollout runs its source is read again on every pass, not taken from the cache: one that
        # disappears (its objects deleted, its Secret revoked) must keep the rollout from stepping on.
        namespace, digest = ad.metadata.namespace or "default", status.get("activeDigest")
        for key in [k for k in runtime.adapters if k[0] == namespace and k[3] == digest]:
            del runtime.adapters[key]
    resolution = await resolve(runtime, ad)
    if ad.spec.target.managed:
        managed_problem = await ensure_managed(runtime, ad, resolution.secret_name, events)
    else:
        managed_problem = None
        await retire_managed(runtime, ad, events)
    pods, target_problem = await target_pods(runtime, ad)
    return Observation(resolution, pods, managed_problem or target_problem), events


def _source(resolution: Resolution) -> rollout.Source:
    adapter = resolution.adapter if resolution.state == "ok" else None
    if adapter is None:
        return rollout.Source(resolution.state, resolution.reason, resolution.message)
    return rollout.Source(
        resolution.state, resolution.reason, resolution.message, adapter.digest, adapter.uri, adapter.source
    )


async def take_step(runtime: Runtime, ad: AdapterDeployment, status: Mapping[str, Any], seen: Observation) -> Plan:
    """One step: the transition function's plan, with the pod loads, the smoke check and the preload
    ConfigMap writes it asks for carried out (everything but the status write and the events)."""
    settings = runtime.settings
    spec = rollout.Spec.of(ad, settings.rollout_timeout_seconds, settings.rollout_max_attempts)
    observed = rollout.Observed(
        spec=spec,
        status=status,
        now=_now(),
        source=_source(seen.resolution),
        pods=tuple(p.name for p in seen.pods),
        target_problem=seen.target_problem,
        conflict_with=runtime.claim(ad, seen.pods),
    )
    by_name = {p.name: p for p in seen.pods}
    uid = ad.metadata.uid or ad.metadata.name
    written: set[rollout.WritePreload] = set()
    while True:
        plan = rollout.step(observed)
        need = plan.needs(observed)
        for action in plan.actions:
            if action is need:
                break
            if isinstance(action, rollout.WritePreload) and action not in written:
                written.add(action)
                await record_preload(runtime, ad, action.serving)
        if need is None:
            break
        if isinstance(need, rollout.Converge):
            results = await converge(runtime, uid, spec.served_name, seen.pods, dict(need.wants))
            observed = dataclasses.replace(observed, results=tuple(results.values()), now=_now())
        else:
            adapter = seen.resolution.adapter
            assert adapter is not None
            smoke = await smoke_check(runtime, ad, adapter, [by_name[name] for name in need.pods])
            observed = dataclasses.replace(
                observed, smoke=rollout.Smoke(smoke.passed, smoke.message, smoke.skipped), now=_now()
            )
    _log_plan(ad, plan)
    return plan


def _log_plan(ad: AdapterDeployment, plan: Plan) -> None:
    namespace, name = ad.metadata.namespace, ad.metadata.name
    for action in plan.actions:
        if isinstance(action, rollout.RolloutStarted):
            log.info("Rollout started adapterdeployment=%s/%s digest=%s previous=%s strategy=%s",
                     namespace, name, action.digest, action.previous, action.strategy)  # fmt: skip
        elif isinstance(action, rollout.RollBack):
            log.warning("Rollout rolled back adapterdeployment=%s/%s failed=%s restored=%s reason=%s",
                        namespace, name, action.failed, action.restored, action.reason)  # fmt: skip
        elif isinstance(action, rollout.RolloutComplete):
            log.info("Rollout complete adapterdeployment=%s/%s digest=%s pods=%d",
                     namespace, name, action.digest, action.pods)  # fmt: skip


async def retire_managed(runtime: Runtime, ad: AdapterDeployment, events: list[Event]) -> None:
    """The target is no longer managed: delete the Deployment and NetworkPolicy this object ran, if any.
    Checked once per spec generation, so a steady AdapterDeployment costs no extra reads."""
    key = (ad.metadata.uid or ad.metadata.name, ad.metadata.generation)
    if key in runtime.retired or not ad.metadata.uid:
        return
    namespace = ad.metadata.namespace or "default"
    try:
        deleted = await runtime.to_thread(
            runtime.kube.delete_owned, namespace, managed_name(ad.metadata.name), ad.metadata.uid
        )
    except Exception as exc:
        log.warning("Could not delete the managed server adapterdeployment=%s/%s error=%s", namespace,
                    ad.metadata.name, exc)  # fmt: skip
        return
    runtime.retired.add(key)
    if deleted:
        message = f"spec.target is no longer managed: deleted {', '.join(deleted)}"
        events.append(Event("Normal", "ManagedServerDeleted", message))


async def ensure_managed(
    runtime: Runtime, ad: AdapterDeployment, secret_name: str | None, events: list[Event]
) -> str | None:
    """Create or update the managed Deployment (and its agent token and NetworkPolicy); a problem, or None."""
    namespace = ad.metadata.namespace or "default"
    owner = owner_reference(ad)
    if ad.spec.target.agent_token_secret_ref is None:
        token_secret = agent_token_secret(ad.metadata.name)
        try:
            made = await runtime.to_thread(
                runtime.kube.ensure_token_secret, namespace, token_secret, AGENT_TOKEN_KEY, owner
            )
        except Exception as exc:
            return f"Cannot create the agent token Secret {token_secret}: {exc}"
        if made == "created":
            events.append(Event("Normal", "AgentTokenCreated", f"Secret {token_secret} holds the agent's token"))
    policy = managed_network_policy(ad, runtime.settings, runtime.config)
    if policy is not None:
        try:
            outcome = await runtime.to_thread(runtime.kube.apply_networkpolicy, namespace, policy)
        except Exception as exc:
            return f"Cannot create the NetworkPolicy {policy['metadata']['name']}: {exc}"
        if outcome != "unchanged":
            events.append(
                Event(
                    "Normal",
                    f"NetworkPolicy{outcome.capitalize()}",
                    f"NetworkPolicy {policy['metadata']['name']} {outcome}",
                )
            )
    body = managed_deployment(
        ad,
        runtime.settings,
        ad.metadata.uid,
        secret_name=secret_name,
        default_s3_endpoint=runtime.config.default_s3_endpoint,
        s3_secure=runtime.config.s3_secure,
        image_pull_secrets=runtime.config.image_pull_secrets,
        vllm_image=runtime.config.vllm_image,
        adapter_cache_size=runtime.config.adapter_cache_size_limit,
        shm_size=runtime.config.vllm_shm_size,
    )
    try:
        outcome = await runtime.to_thread(runtime.kube.apply_deployment, namespace, body)
    except Exception as exc:
        return f"Cannot create the managed vLLM Deployment {body['metadata']['name']}: {exc}"
    if outcome != "unchanged":
        events.append(
            Event("Normal", f"ManagedServer{outcome.capitalize()}", f"Deployment {body['metadata']['name']} {outcome}")
        )
    return None


async def record_preload(runtime: Runtime, ad: AdapterDeployment, serving: Want | None) -> None:
    """Managed servers: what a pod that starts now should serve, in the ConfigMap its agent preloads from."""
    if ad.spec.target.managed is None:
        return
    namespace = ad.metadata.namespace or "default"
    body = preload_configmap(ad, ad.metadata.uid, dataclasses.asdict(serving) if serving else None)
    try:
        outcome = await runtime.to_thread(runtime.kube.apply_configmap, namespace, body)
    except Exception as exc:
        log.warning(
            "Cannot write the preload ConfigMap configmap=%s/%s error=%s", namespace, body["metadata"]["name"], exc
        )
        return
    if outcome != "unchanged":
        log.info(
            "Preload ConfigMap %s configmap=%s/%s digest=%s",
            outcome,
            namespace,
            body["metadata"]["name"],
            serving.digest if serving else None,
        )


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch turning status ``old`` into ``new`` (None removes a field); kopf's own field is left alone."""
    patch = {k: v for k, v in new.items() if old.get(k) != v and k != "kopf"}
    for key in old:
        if key not in new and key != "kopf":
            patch[key] = None
    return patch


def _normalise(status: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in status.items() if v is not None and k != "kopf"}
    # derived on serialisation by the API model; never compared
    out.pop("activeShortDigest", None)
    out.pop("loaded", None)
    return out


def _wire_status(status: Mapping[str, Any]) -> dict[str, Any]:
    out = _normalise(status)
    if out.get("activeDigest"):
        out["activeShortDigest"] = short_digest(out["activeDigest"])
    out["loaded"] = f"{out.get('loadedReplicas', 0)}/{out.get('desiredReplicas', 0)}"
    return out


def next_look(runtime: Runtime, uid: str, status: Mapping[str, Any]) -> float | None:
    """Seconds until the AdapterDeployment needs another pass without any watch event, or None.

    Pod, AdapterDeployment and LoRAJob changes arrive as events; only time-driven work is scheduled: a
    rollout's progress and deadline and sources that are not readable yet (:func:`rollout.recheck_after`),
    and per-pod retry backoffs.
    """
    after = rollout.recheck_after(status)
    if after is not None:
        return after
    retries = [t.next_try for t in runtime.tracks.get(uid, {}).values() if t.attempts]
    if retries:
        return max(0.2, min(retries) - time.monotonic())
    return None


async def reconcile(
    runtime: Runtime, namespace: str, name: str, post: Callable[[Mapping[str, Any], Event], None] | None = None
) -> float | None:
    """One level-based pass over the AdapterDeployment ``namespace/name``; returns when to look again (seconds),
    or None when only a change (an event) should bring it back."""
    async with runtime.lock(namespace, name):
        obj = await runtime.to_thread(runtime.kube.get_adapterdeployment, namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None
        status = {k: v for k, v in (obj.get("status") or {}).items() if k != "kopf"}
        try:
            ad = parse(obj)
        except ValidationError as exc:
            message = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())[:1024]
            new = dict(status)
            new["phase"] = "Failed"
            new["message"] = message
            new["conditions"] = set_condition(
                list(status.get("conditions") or []),
                "Ready",
                False,
                "InvalidSpec",
                message,
                obj["metadata"].get("generation"),
            )
            if _normalise(new) != _normalise(status):
                await runtime.to_thread(
                    runtime.kube.patch_status, namespace, name, status_patch(status, _wire_status(new))
                )
                event = Event("Warning", "InvalidSpec", message)
                if post:
                    post(obj, event)
            return None
        seen: Observation | None = None
        for _ in range(8):
            events: list[Event] = []
            if seen is None:
                seen, events = await observe(runtime, ad, status)
            plan = await take_step(runtime, ad, status, seen)
            events += plan.events
            new = {k: v for k, v in plan.status.items() if v is not None}
            if _normalise(new) != _normalise(status):
                await runtime.to_thread(
                    runtime.kube.patch_status, namespace, name, status_patch(status, _wire_status(new))
                )
                if new.get("phase") != status.get("phase"):
                    log.info(
                        "Phase changed adapterdeployment=%s/%s phase=%s message=%s",
                        namespace,
                        name,
                        new.get("phase"),
                        new.get("message"),
                    )
            for event in events:
                if post:
                    post(obj, event)
            status = _wire_status(new)
            if not plan.again:
                break
        return next_look(runtime, ad.metadata.uid or name, status)


async def cleanup(runtime: Runtime, obj: Mapping[str, Any], attempts: int = 3) -> tuple[list[Event], list[str]]:
    """Unload the AdapterDeployment's adapter from every target pod (:func:`rollout.delete`), with retries.
    Returns events and pods still failing."""
    namespace = obj["metadata"].get("namespace") or "default"
    name = obj["metadata"]["name"]
    try:
        ad = parse(obj)
    except ValidationError:
        return [], []
    status = obj.get("status") or {}
    digests = {d for d in (status.get("activeDigest"), status.get("previousDigest")) if d}
    settings = runtime.settings
    async with runtime.lock(namespace, name):
        pods, _ = await target_pods(runtime, ad)
        uid = ad.metadata.uid or name
        observed = rollout.Observed(
            spec=rollout.Spec.of(ad, settings.rollout_timeout_seconds, settings.rollout_max_attempts),
            status=status,
            now=_now(),
            source=rollout.Source("pending"),
            pods=tuple(p.name for p in pods),
        )
        plan = rollout.delete(observed)
        for attempt in range(attempts):
            need = plan.needs(observed)
            assert isinstance(need, rollout.Converge)
            runtime.tracks.pop(uid, None)
            results = await converge(runtime, uid, ad.spec.served_name, pods, dict(need.wants))
            observed = dataclasses.replace(observed, results=tuple(results.values()))
            plan = rollout.delete(observed)
            if plan.events[0].reason == "Unloaded" or attempt + 1 == attempts:
                break
            observed = dataclasses.replace(observed, results=None)
            await asyncio.sleep(settings.backoff(attempt + 1))  # a retry backoff, not synchronisation
        assert observed.results is not None
        remaining = [r.name for r in observed.results if r.state != "Unloaded"]
        unloaded = [p for p in pods if p.name not in remaining]
        await asyncio.gather(*(_forget_unused(runtime, p, digests) for p in unloaded if not p.blocked))
    runtime.forget(namespace, name, ad.metadata.uid)
    return list(plan.events), remaining


async def _forget_unused(runtime: Runtime, pod: Pod, digests: set[str]) -> None:
    """Delete adapter files from the pod's agent when no served model uses them any more."""
    if not digests:
        return
    with contextlib.suppress(PodError):
        served = await runtime.pods.models(pod)
        in_use = {digest_of_root(root) for root in served.values()}
        for digest in digests - in_use:
            await runtime.pods.forget(pod, digest)
