"""The AdapterDeployment controller: gate an adapter, deliver it to vLLM pods, roll it out, keep it loaded.

Plain asyncio code with no kopf in it; ``adapter_handlers.py`` holds the thin kopf handlers. One pass
(:func:`reconcile`) reads the object fresh, resolves the adapter (from a LoRAJob or a URI pinned by
digest), checks the gates, lists the target pods, and moves the rollout on as far as it can, writing
status at each phase change. Passes of one object never overlap (a lock per object), so change
handlers, the resync timer and LoRAJob triggers can all call it.

Phases: Pending (waiting for the adapter) · Refused (a gate said no) · Canary (the new adapter on
``canaryReplicas`` pods, then a smoke check) · Promoting (on every pod) · Loading (AllAtOnce) · Ready ·
RolledBack (the rollout failed; the previous adapter serves everywhere) · Failed (the rollout failed
and autoRollback is off; pods are left as they are).

What each pod serves is read from vLLM's ``/v1/models``: the card named ``servedName`` has the adapter
path as ``root``, and the agent names each adapter directory after its digest, so the digest a pod
serves is known without keeping state. Every pass makes each Ready pod serve what it should (drift
repair): a restarted pod or a new one gets its adapter back. Failures are retried with a backoff per pod.

Split by concern: ``adapter_resolution`` (which adapter, read with the tenant's credentials, and its gates),
``server_pods`` (finding the pods, the vLLM and agent client, converging one pod, the smoke check),
``managed_server`` (the managed Deployment, its agent token and NetworkPolicy); this module holds the
rollout state machine and the Kubernetes reads and writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from kubelora.api.v1alpha1 import (
    GROUP,
    VERSION,
    AdapterDeployment,
    RolloutStep,
    RolloutStrategy,
    dump,
    short_digest,
)
from kubelora.operator.adapter_resolution import AdapterReader, Resolution, ResolvedAdapter, resolve
from kubelora.operator.conditions import get_condition, set_condition
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
from kubelora.operator.server_pods import (
    KEEP,
    Pod,
    PodClient,
    PodError,
    PodResult,
    PodTrack,
    Settings,
    Want,
    WantValue,
    converge,
    digest_of_root,
    smoke_check,
    target_pods,
)

log = logging.getLogger("kubelora.adapterdeployment")

MAX_REPLICA_ENTRIES = 50
ROLLOUT_PHASES = frozenset({"Loading", "Canary", "Promoting"})
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
        # (namespace, servedName) -> {AdapterDeployment name: (creationTimestamp, uids of its target pods)}
        self.claims: dict[tuple[str, str], dict[str, tuple[str, frozenset[str]]]] = {}
        self.to_thread: Callable[..., Awaitable[Any]] = asyncio.to_thread

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
        on any of them, if there is one (that one wins: the newer gets a Conflict and touches nothing)."""
        namespace, name, served = ad.metadata.namespace or "default", ad.metadata.name, ad.spec.served_name
        created = str((ad.metadata.model_extra or {}).get("creationTimestamp") or "")
        self.release_claims(namespace, name, keep=served)
        claimants = self.claims.setdefault((namespace, served), {})
        mine = frozenset(p.uid for p in pods)
        claimants[name] = (created, mine)
        older = sorted(
            (other_created, other)
            for other, (other_created, other_pods) in claimants.items()
            if other != name and other_pods & mine and (other_created, other) < (created, name)
        )
        return older[0][1] if older else None


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
# Adapter files: the manifest, adapter_config.json and eval samples (synchronous; through to_thread)


# ----------------------------------------------------------------------------------------------------------
# Pods and what they serve


# ----------------------------------------------------------------------------------------------------------
# Smoke check


# ----------------------------------------------------------------------------------------------------------
# Managed vLLM servers


# ----------------------------------------------------------------------------------------------------------
# The rollout state machine


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def parse(obj: Mapping[str, Any]) -> AdapterDeployment:
    return AdapterDeployment.model_validate({"metadata": dict(obj["metadata"]), "spec": dict(obj.get("spec") or {})})


def _replicas(results: Iterable[PodResult]) -> list[dict[str, Any]]:
    ordered = sorted(results, key=lambda r: (r.state != "Failed", r.pod.name))
    return [dump(r.replica()) for r in ordered[:MAX_REPLICA_ENTRIES]]


def rollout_steps(strategy: RolloutStrategy, pod_count: int) -> list[tuple[int, int]]:
    """(pods, bake seconds) of each Canary step before "all pods": spec.rollout.steps, else one step of
    canaryReplicas with no bake. Percentages round up; every step has at least one pod."""
    steps = strategy.steps or [RolloutStep(replicas=strategy.canary_replicas)]
    out = []
    for step in steps:
        count = step.replicas if step.replicas is not None else math.ceil(pod_count * (step.percent or 0) / 100)
        out.append((max(1, min(count, max(pod_count, 1))), step.bake_seconds))
    return out


def limit_switching(
    wants: dict[str, WantValue], before: Mapping[str, str | None], digest: str, most: int | None
) -> dict[str, WantValue]:
    """At most ``most`` pods move to ``digest`` in one pass (spec.rollout.maxUnavailable); the others keep
    what they serve until a later pass. Pods already serving it count as done."""
    if most is None:
        return wants
    out = dict(wants)
    moving = [
        n for n, w in sorted(wants.items()) if isinstance(w, Want) and w.digest == digest and before.get(n) != digest
    ]
    for name in moving[most:]:
        out[name] = KEEP
    return out


def choose_canary(pods: Sequence[Pod], results_before: Mapping[str, str | None], digest: str, count: int) -> list[Pod]:
    """``count`` pods, preferring those that already serve ``digest`` (so a rescheduled canary stays put)."""
    ordered = sorted(pods, key=lambda p: (results_before.get(p.name) != digest, p.name))
    return ordered[: max(1, min(count, len(pods)))]


@dataclasses.dataclass
class Step:
    status: dict[str, Any]
    events: list[Event]
    again: bool = False
    observed: Observed | None = None


@dataclasses.dataclass
class Observed:
    """What a step read (the adapter and the pods); the next step of the same pass reuses it."""

    resolution: Resolution
    pods: list[Pod]
    target_problem: str | None


class Pass:
    """One reconcile step over an AdapterDeployment with status ``old``."""

    def __init__(
        self, runtime: Runtime, ad: AdapterDeployment, old: Mapping[str, Any], observed: Observed | None = None
    ) -> None:
        self.runtime = runtime
        self.ad = ad
        self.generation = ad.metadata.generation
        self.status: dict[str, Any] = {k: copy.deepcopy(v) for k, v in old.items() if k != "kopf"}
        self.status.setdefault("phase", "Pending")
        self.events: list[Event] = []
        self.observed = observed

    # -- small helpers --------------------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        return str(self.status.get("phase") or "Pending")

    @property
    def active(self) -> Want | None:
        digest, uri = self.status.get("activeDigest"), self.status.get("activeUri")
        return Want(digest, uri) if digest and uri else None

    @property
    def previous(self) -> Want | None:
        digest, uri = self.status.get("previousDigest"), self.status.get("previousUri")
        return Want(digest, uri) if digest and uri else None

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        conditions = list(self.status.get("conditions") or [])
        before = get_condition(conditions, type_)
        unchanged = (
            before is not None
            and before.get("status") == ("True" if status else "False")
            and before.get("reason") == reason
            and before.get("message") == message[:1024]
            and before.get("observedGeneration") == self.generation
        )
        if unchanged:
            return
        self.status["conditions"] = set_condition(conditions, type_, status, reason, message, self.generation)

    def event(self, kind: str, reason: str, message: str) -> None:
        self.events.append(Event(kind, reason, message[:1024]))

    def set_digests(self, active: Want | None, previous: Want | None) -> None:
        self.status["activeDigest"] = active.digest if active else None
        self.status["activeUri"] = active.uri if active else None
        self.status["previousDigest"] = previous.digest if previous else None
        self.status["previousUri"] = previous.uri if previous else None

    def restart_progress_clock(self) -> None:
        conditions = [c for c in self.status.get("conditions") or [] if c.get("type") != "Progressing"]
        self.status["conditions"] = conditions

    # -- the step -------------------------------------------------------------------------------------------

    async def run(self) -> Step:
        ad, runtime = self.ad, self.runtime
        spec = ad.spec
        self.status["observedGeneration"] = self.generation
        if self.observed is None:
            resolution = await resolve(runtime, ad)
            if spec.target.managed:
                managed_problem = await self.ensure_managed(resolution.secret_name)
            else:
                managed_problem = None
                await self.retire_managed()
            pods, target_problem = await target_pods(runtime, ad)
            self.observed = Observed(resolution, pods, managed_problem or target_problem)
        resolution, pods, target_problem = self.observed.resolution, self.observed.pods, self.observed.target_problem
        rolling = self.phase in ROLLOUT_PHASES
        owner = runtime.claim(ad, pods)
        if owner is not None:
            return self.conflict(owner)
        if self.reason_of("Conflict") == "ServedNameInUse":
            self.condition(
                "Conflict", False, "NoConflict", f"No other AdapterDeployment serves {spec.served_name} here"
            )

        if resolution.state == "refused":
            self.condition("Admitted", False, resolution.reason, resolution.message)
            if rolling:
                self.abandon_rollout(f"spec.adapter now names an adapter that is refused ({resolution.reason})")
            if self.phase != "Refused" or self.reason_changed("Ready", resolution.reason):
                self.event("Warning", resolution.reason, resolution.message)
            self.status["phase"] = "Refused"
            serving = f"; still serving {short_digest(self.active.digest)}" if self.active else ""
            self.status["message"] = resolution.message + serving
            self.condition("Ready", False, resolution.reason, resolution.message + serving)
        elif resolution.state == "pending":
            if rolling:
                # The source went away or cannot be read now (storage, a deleted LoRAJob): keep converging the
                # pods with what the status names; the smoke check waits for the source, the deadline does not.
                self.condition("Admitted", False, resolution.reason, resolution.message)
                step = await self.drive(pods, target_problem, None)
                if self.phase in ROLLOUT_PHASES:
                    self.status["message"] = f"{self.status.get('message')}; source unavailable: {resolution.message}"
                return step
            if self.reason_changed("Admitted", resolution.reason):
                kind = "Warning" if resolution.reason.endswith(("NotFound", "Unavailable")) else "Normal"
                self.event(kind, resolution.reason, resolution.message)
            self.condition("Admitted", False, resolution.reason, resolution.message)
            if not (self.phase in ("RolledBack", "Failed") and self._decided_here()):
                # (a rollout that failed for this spec keeps saying so; Admitted says the source is gone too)
                serving = f"; still serving {short_digest(self.active.digest)}" if self.active else ""
                self.status["phase"] = "Pending"
                self.status["message"] = resolution.message + serving
                self.condition("Ready", False, resolution.reason, resolution.message + serving)
        else:
            adapter = resolution.adapter
            assert adapter is not None
            self.condition("Admitted", True, "GatesPassed", resolution.message)
            if rolling and self.active and self.active.digest != adapter.digest:
                self.abandon_rollout(f"spec.adapter changed to {short_digest(adapter.digest)}")
                rolling = False
            if not rolling and self.should_roll_out(adapter):
                self.start_rollout(adapter, len(pods))
                return Step(self.status, self.events, again=True, observed=self.observed)
            if self.phase in ("Pending", "Refused") and self.active and self.active.digest == adapter.digest:
                self.status["phase"] = "Ready"  # the gate passes again for what is already served
        return await self.drive(pods, target_problem, resolution.adapter if resolution.state == "ok" else None)

    def conflict(self, owner: str) -> Step:
        """Another, older AdapterDeployment serves this servedName on the same pods: do nothing, and say so."""
        served = self.ad.spec.served_name
        message = (
            f"AdapterDeployment {owner} (older) already serves {served} on these pods; this one loads nothing "
            f"until that one is gone or serves another name"
        )
        if self.phase in ROLLOUT_PHASES:
            self.abandon_rollout(message)
        if self.reason_of("Conflict") != "ServedNameInUse":
            self.event("Warning", "Conflict", message)
        self.condition("Conflict", True, "ServedNameInUse", message)
        self.condition("Ready", False, "ServedNameConflict", message)
        self.status["phase"] = "Refused"
        self.status["message"] = message
        return Step(self.status, self.events)

    def reason_of(self, type_: str) -> str | None:
        condition = get_condition(list(self.status.get("conditions") or []), type_)
        return condition.get("reason") if condition else None

    def reason_changed(self, type_: str, reason: str) -> bool:
        condition = get_condition(list(self.status.get("conditions") or []), type_)
        return condition is None or condition.get("reason") != reason

    def should_roll_out(self, adapter: ResolvedAdapter) -> bool:
        active = self.active
        if active is not None and active.digest == adapter.digest:
            return False
        if self._decided_here():
            # A rollout failed for this very spec: do not try the same adapter again until the spec changes.
            if self.phase == "RolledBack" and self.status.get("previousDigest") == adapter.digest:
                return False
            if self.phase == "Failed":
                return False
        return True

    def _decided_here(self) -> bool:
        """The last rollout decision (RolledBack/Failed) was made for the current spec generation."""
        progressing = get_condition(list(self.status.get("conditions") or []), "Progressing")
        return progressing is not None and progressing.get("observedGeneration") == self.generation

    def start_rollout(self, adapter: ResolvedAdapter, pod_count: int) -> None:
        rollout = self.ad.spec.rollout
        old = self.active
        new = Want(adapter.digest, adapter.uri)
        self.set_digests(new, old)
        self.restart_progress_clock()
        canary = rollout.strategy == "Canary"
        self.status["phase"] = "Canary" if canary else "Loading"
        self.status["currentStep"] = 0 if canary else None
        self.status["stepStartedAt"] = None
        steps = rollout_steps(rollout, pod_count)
        how = (
            f"Canary on {steps[0][0]} of {pod_count} pods" + (f", {len(steps)} steps" if len(steps) > 1 else "")
            if canary
            else f"AllAtOnce on {pod_count} pods"
        )
        replacing = f", replacing {short_digest(old.digest)}" if old else ""
        message = f"Rolling out {adapter.source} {short_digest(adapter.digest)} ({how}){replacing}"
        self.status["message"] = message
        self.condition("Progressing", True, "RolloutStarted", message)
        self.condition("Ready", False, "RolloutInProgress", message)
        self.event("Normal", "RolloutStarted", message)
        log.info(
            "Rollout started adapterdeployment=%s/%s digest=%s previous=%s strategy=%s",
            self.ad.metadata.namespace,
            self.ad.metadata.name,
            adapter.digest,
            old.digest if old else None,
            rollout.strategy,
        )

    def abandon_rollout(self, why: str) -> None:
        """Stop an unfinished rollout: the previous adapter is what counts as active again."""
        unfinished = self.active
        previous = self.previous
        self.set_digests(previous, unfinished)
        self.status["currentStep"] = self.status["stepStartedAt"] = None
        self.status["phase"] = "Ready" if previous else "Pending"
        message = f"Rollout of {short_digest(unfinished.digest) if unfinished else 'nothing'} stopped: {why}"
        self.condition("Progressing", False, "RolloutSuperseded", message)
        self.event("Normal", "RolloutSuperseded", message)

    async def retire_managed(self) -> None:
        """The target is no longer managed: delete the Deployment and NetworkPolicy this object ran, if any.
        Checked once per spec generation, so a steady AdapterDeployment costs no extra reads."""
        runtime, ad = self.runtime, self.ad
        key = (ad.metadata.uid or ad.metadata.name, self.generation)
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
            self.event(
                "Normal", "ManagedServerDeleted", f"spec.target is no longer managed: deleted {', '.join(deleted)}"
            )

    async def ensure_managed(self, secret_name: str | None) -> str | None:
        runtime = self.runtime
        namespace = self.ad.metadata.namespace or "default"
        owner = owner_reference(self.ad)
        if self.ad.spec.target.agent_token_secret_ref is None:
            token_secret = agent_token_secret(self.ad.metadata.name)
            try:
                made = await runtime.to_thread(
                    runtime.kube.ensure_token_secret, namespace, token_secret, AGENT_TOKEN_KEY, owner
                )
            except Exception as exc:
                return f"Cannot create the agent token Secret {token_secret}: {exc}"
            if made == "created":
                self.event("Normal", "AgentTokenCreated", f"Secret {token_secret} holds the agent's token")
        policy = managed_network_policy(self.ad, runtime.settings, runtime.config)
        if policy is not None:
            try:
                outcome = await runtime.to_thread(runtime.kube.apply_networkpolicy, namespace, policy)
            except Exception as exc:
                return f"Cannot create the NetworkPolicy {policy['metadata']['name']}: {exc}"
            if outcome != "unchanged":
                self.event(
                    "Normal",
                    f"NetworkPolicy{outcome.capitalize()}",
                    f"NetworkPolicy {policy['metadata']['name']} {outcome}",
                )
        body = managed_deployment(
            self.ad,
            runtime.settings,
            self.ad.metadata.uid,
            secret_name=secret_name,
            default_s3_endpoint=runtime.config.default_s3_endpoint,
            s3_secure=runtime.config.s3_secure,
            image_pull_secrets=runtime.config.image_pull_secrets,
            vllm_image=runtime.config.vllm_image,
            adapter_cache_size=runtime.config.adapter_cache_size_limit,
            shm_size=runtime.config.vllm_shm_size,
        )
        try:
            outcome = await self.runtime.to_thread(self.runtime.kube.apply_deployment, namespace, body)
        except Exception as exc:
            return f"Cannot create the managed vLLM Deployment {body['metadata']['name']}: {exc}"
        if outcome != "unchanged":
            self.event(
                "Normal", f"ManagedServer{outcome.capitalize()}", f"Deployment {body['metadata']['name']} {outcome}"
            )
        return None

    async def record_preload(self, serving: Want | None) -> None:  # preload:
        """Managed servers: what a pod that starts now should serve, in the ConfigMap its agent preloads from."""
        if self.ad.spec.target.managed is None:
            return
        namespace = self.ad.metadata.namespace or "default"
        body = preload_configmap(self.ad, self.ad.metadata.uid, dataclasses.asdict(serving) if serving else None)
        try:
            outcome = await self.runtime.to_thread(self.runtime.kube.apply_configmap, namespace, body)
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

    def wants(self, pods: Sequence[Pod], before: Mapping[str, str | None]) -> tuple[dict[str, WantValue], list[Pod]]:
        phase, active, previous = self.phase, self.active, self.previous
        canary: list[Pod] = []
        most = self.ad.spec.rollout.max_unavailable
        if phase == "Canary" and active is not None:
            steps = rollout_steps(self.ad.spec.rollout, len(pods))
            count = steps[min(int(self.status.get("currentStep") or 0), len(steps) - 1)][0]
            canary = choose_canary(pods, before, active.digest, count)
            names = {p.name for p in canary}
            split: dict[str, WantValue] = {p.name: (active if p.name in names else previous) for p in pods}
            return limit_switching(split, before, active.digest, most), canary
        if phase == "Failed":
            return dict.fromkeys((p.name for p in pods), KEEP), canary
        if active is None:
            value: WantValue = None if phase == "RolledBack" else KEEP
            return dict.fromkeys((p.name for p in pods), value), canary
        wanted: dict[str, WantValue] = dict.fromkeys((p.name for p in pods), active)
        if phase in ("Promoting", "Loading"):
            wanted = limit_switching(wanted, before, active.digest, most)
        return wanted, canary

    async def drive(self, pods: list[Pod], target_problem: str | None, adapter: ResolvedAdapter | None) -> Step:
        runtime, ad = self.runtime, self.ad
        uid = ad.metadata.uid or ad.metadata.name
        served_name = ad.spec.served_name
        if self.active is None and self.phase in ("Pending", "Refused"):
            self.status.update(desiredReplicas=len(pods), loadedReplicas=0, replicas=[])
            return Step(self.status, self.events)
        # What pods served on the last pass decides the canary set; read it from status.
        before = {r["pod"]: r.get("digest") for r in self.status.get("replicas") or [] if r.get("state") == "Loaded"}
        if self.phase in ("Ready", "RolledBack"):  # preload: a completed rollback (or unload), before pods unload
            await self.record_preload(self.active)  # preload:
        wants, canary = self.wants(pods, before)
        results = await converge(runtime, uid, served_name, pods, wants)
        active = self.active
        loaded = sum(1 for r in results.values() if r.state == "Loaded" and active and r.digest == active.digest)
        self.status.update(desiredReplicas=len(pods), loadedReplicas=loaded, replicas=_replicas(results.values()))
        phase = self.phase
        failures = [r for r in results.values() if r.state == "Failed"]
        if phase in ROLLOUT_PHASES:
            return await self.drive_rollout(pods, target_problem, adapter, results, canary, loaded)
        if phase in ("Ready", "RolledBack", "Pending", "Refused") and active is not None:
            summary = f"{short_digest(active.digest)} loaded on {loaded}/{len(pods)} pods as {served_name}"
            if phase == "Ready":
                if pods and loaded == len(pods):
                    self.condition("Ready", True, "AdapterLoaded", summary)
                    self.status["message"] = summary
                else:
                    detail = target_problem or (f"{failures[0].pod.name}: {failures[0].message}" if failures else "")
                    self.condition("Ready", False, "ReplicasNotLoaded", summary + (f"; {detail}" if detail else ""))
                    self.status["message"] = summary + (f"; {detail}" if detail else "")
        return Step(self.status, self.events)

    async def drive_rollout(
        self,
        pods: list[Pod],
        target_problem: str | None,
        adapter: ResolvedAdapter | None,
        results: Mapping[str, PodResult],
        canary: list[Pod],
        loaded: int,
    ) -> Step:
        ad = self.ad
        active = self.active
        assert active is not None
        settings = self.runtime.settings
        targets = canary if self.phase == "Canary" else pods
        if not pods:
            self.status["message"] = f"Rollout waiting: {target_problem or 'no Ready pods'}"
            self.condition("Ready", False, "NoReadyPods", self.status["message"])
            return await self.check_deadline()
        refused = [results[p.name] for p in targets if results[p.name].refusal]
        if refused:
            first = refused[0]
            return self.fail(
                "AdapterRejected",
                f"vLLM on pod {first.pod.name} refused {short_digest(active.digest)}: {first.refusal}",
            )
        broken = [
            results[p.name]
            for p in targets
            if results[p.name].fatal and results[p.name].attempts >= settings.rollout_max_attempts
        ]
        if broken:
            first = broken[0]
            return self.fail(
                "LoadFailed",
                f"Loading {short_digest(active.digest)} failed {first.attempts} times on pod {first.pod.name}: "
                f"{first.message}",
            )
        done = [p for p in targets if results[p.name].state == "Loaded" and results[p.name].digest == active.digest]
        if len(done) < len(targets):
            waiting = [results[p.name] for p in targets if p not in done]
            detail = "; ".join(f"{r.pod.name}: {r.message}" for r in waiting if r.message)[:300]
            self.status["message"] = (
                f"{self.phase}: {short_digest(active.digest)} loaded on {len(done)}/{len(targets)} target pods"
                + (f"; {detail}" if detail else "")
            )
            self.condition("Ready", False, "RolloutInProgress", self.status["message"])
            if self.phase == "Canary" and self.reason_of("Progressing") == "SmokeCheck":
                self.condition("Progressing", True, "CanaryLoading", self.status["message"])
            return await self.check_deadline()
        if self.phase == "Canary":
            if adapter is None:
                return await self.check_deadline()
            steps = rollout_steps(ad.spec.rollout, len(pods))
            index = min(int(self.status.get("currentStep") or 0), len(steps) - 1)
            label = f"Step {index + 1}/{len(steps)}" if len(steps) > 1 else "Canary"
            if not self.status.get("stepStartedAt"):
                if index == 0:
                    if self.reason_of("Progressing") != "SmokeCheck":
                        # Write the loaded canary first (status shows it), then smoke-test it in the next step.
                        message = (
                            f"{label}: {short_digest(active.digest)} loaded on {', '.join(p.name for p in canary)} "
                            f"({loaded}/{len(pods)} pods); running the smoke check"
                        )
                        self.status["message"] = message
                        self.condition("Progressing", True, "SmokeCheck", message)
                        self.condition("Ready", False, "RolloutInProgress", message)
                        return Step(self.status, self.events, again=True, observed=self.observed)
                    smoke = await smoke_check(self.runtime, ad, adapter, canary)
                    if not smoke.passed:
                        return self.fail("SmokeCheckFailed", smoke.message)
                    self.event("Normal", "SmokeCheckSkipped" if smoke.skipped else "CanaryPassed", smoke.message)
                self.status["stepStartedAt"] = _now().strftime("%Y-%m-%dT%H:%M:%SZ")
            started = _parse_time(self.status.get("stepStartedAt")) or _now()
            left = steps[index][1] - (_now() - started).total_seconds()
            if left > 0:
                message = (
                    f"{label}: {short_digest(active.digest)} on {len(canary)}/{len(pods)} pods, baking "
                    f"{math.ceil(left)}s more"
                )
                self.status["message"] = message
                self.condition("Progressing", True, "Baking", message)
                self.condition("Ready", False, "RolloutInProgress", message)
                return await self.check_deadline()
            if index + 1 < len(steps):
                self.status["currentStep"] = index + 1
                self.status["stepStartedAt"] = None
                message = (
                    f"Step {index + 2}/{len(steps)}: loading {short_digest(active.digest)} on "
                    f"{steps[index + 1][0]} of {len(pods)} pods"
                )
                self.status["message"] = message
                self.condition("Progressing", True, "StepStarted", message)
                self.condition("Ready", False, "RolloutInProgress", message)
                self.event("Normal", "RolloutStep", message)
                return Step(self.status, self.events, again=True, observed=self.observed)
            self.status["phase"] = "Promoting"
            self.status["currentStep"] = self.status["stepStartedAt"] = None
            message = f"Promoting {short_digest(active.digest)} to all {len(pods)} pods after {len(steps)} step(s)"
            self.status["message"] = message
            self.condition("Progressing", True, "Promoting", message)
            self.condition("Ready", False, "RolloutInProgress", message)
            return Step(self.status, self.events, again=True, observed=self.observed)
        summary = f"{short_digest(active.digest)} loaded on {loaded}/{len(pods)} pods as {ad.spec.served_name}"
        self.status["phase"] = "Ready"
        await self.record_preload(active)  # preload: the rollout completed
        self.status["message"] = summary
        self.condition("Progressing", False, "RolloutComplete", f"Rollout of {short_digest(active.digest)} complete")
        self.condition("Ready", True, "AdapterLoaded", summary)
        self.event("Normal", "RolloutComplete", f"Rollout complete: {summary}")
        log.info(
            "Rollout complete adapterdeployment=%s/%s digest=%s pods=%d",
            ad.metadata.namespace,
            ad.metadata.name,
            active.digest,
            len(pods),
        )
        return Step(self.status, self.events)

    async def check_deadline(self) -> Step:
        progressing = get_condition(list(self.status.get("conditions") or []), "Progressing")
        started = _parse_time(progressing.get("lastTransitionTime") if progressing else None)
        limit = self.runtime.settings.rollout_timeout_seconds
        if self.ad.spec.rollout.strategy == "Canary":
            # Bake times are the rollout's own waiting, not slowness: they extend the deadline.
            limit += sum(bake for _, bake in rollout_steps(self.ad.spec.rollout, 1))
        if started is not None and (_now() - started).total_seconds() > limit:
            return self.fail(
                "RolloutTimedOut", f"The rollout did not finish within {limit:.0f}s: {self.status.get('message')}"
            )
        return Step(self.status, self.events)

    def fail(self, reason: str, message: str) -> Step:
        ad = self.ad
        failed, previous = self.active, self.previous
        assert failed is not None
        self.status["currentStep"] = self.status["stepStartedAt"] = None
        if ad.spec.rollout.auto_rollback:
            self.set_digests(previous, failed)
            self.status["phase"] = "RolledBack"
            restored = (
                f"rolled back to {short_digest(previous.digest)}" if previous else "unloaded it (no previous adapter)"
            )
            text = f"Rollout of {short_digest(failed.digest)} failed ({reason}): {message}; {restored}"
            # Progressing says what happened, Ready says why: the failure's own reason.
            self.condition("Progressing", False, "RolledBack", text)
            self.condition("Ready", False, reason, text)
            self.status["message"] = text
            self.event("Warning", reason, text)
            log.warning(
                "Rollout rolled back adapterdeployment=%s/%s failed=%s restored=%s reason=%s",
                ad.metadata.namespace,
                ad.metadata.name,
                failed.digest,
                previous.digest if previous else None,
                reason,
            )
            return Step(self.status, self.events, again=True, observed=self.observed)
        text = f"Rollout of {short_digest(failed.digest)} failed ({reason}): {message}; autoRollback is off"
        self.status["phase"] = "Failed"
        self.condition("Progressing", False, reason, text)
        self.condition("Ready", False, reason, text)
        self.status["message"] = text
        self.event("Warning", reason, text)
        return Step(self.status, self.events)


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


#: How soon to look again at an AdapterDeployment whose source is not there yet (storage, a Secret, a manifest).
PENDING_RECHECK_SECONDS = 15.0
#: Admission problems that can go away without any Kubernetes object changing (storage, a manifest not yet
#: uploaded); gate refusals and a LoRAJob still training come back through events instead.
RECHECKED_REASONS = frozenset({"SecretNotFound", "AdapterNotFound", "AccessDenied", "StorageUnavailable",
                               "InvalidManifest", "NoAdapter"})  # fmt: skip
#: How soon to look again while a rollout runs (loads in flight, canary steps, the deadline).
ROLLOUT_RECHECK_SECONDS = 1.0


def next_look(runtime: Runtime, uid: str, status: Mapping[str, Any]) -> float | None:
    """Seconds until the AdapterDeployment needs another pass without any watch event, or None.

    Pod, AdapterDeployment and LoRAJob changes arrive as events; only time-driven work is scheduled: a
    rollout's progress and deadline, per-pod retry backoffs, and sources that are not readable yet.
    """
    phase = status.get("phase")
    if phase in ROLLOUT_PHASES:
        return ROLLOUT_RECHECK_SECONDS
    admitted = get_condition(list(status.get("conditions") or []), "Admitted")
    if admitted is not None and admitted.get("status") == "False" and admitted.get("reason") in RECHECKED_REASONS:
        return PENDING_RECHECK_SECONDS
    retries = [t.next_try for t in runtime.tracks.get(uid, {}).values() if t.attempts]
    if retries:
        return max(0.2, min(retries) - time.monotonic())
    return None


async def reconcile(
    runtime: Runtime, namespace: str, name: str, post: Callable[[Mapping[str, Any], Event], None] | None = None
) -> float | None:
    """One level-based pass over the AdapterDeployment ``namespace/name``; returns when to look again (seconds),
    or None when only a change (an event) should bring it back."""
    all_events: list[Event] = []
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
                all_events.append(event)
            return None
        observed: Observed | None = None
        for _ in range(8):
            step = await Pass(runtime, ad, status, observed).run()
            observed = step.observed
            new = {k: v for k, v in step.status.items() if v is not None}
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
            for event in step.events:
                if post:
                    post(obj, event)
            all_events += step.events
            status = _wire_status(new)
            if not step.again:
                break
        return next_look(runtime, ad.metadata.uid or name, status)


async def cleanup(runtime: Runtime, obj: Mapping[str, Any], attempts: int = 3) -> tuple[list[Event], list[str]]:
    """Unload the AdapterDeployment's adapter from every target pod. Returns events and pods still failing."""
    namespace = obj["metadata"].get("namespace") or "default"
    name = obj["metadata"]["name"]
    events: list[Event] = []
    try:
        ad = parse(obj)
    except ValidationError:
        return events, []
    status = obj.get("status") or {}
    digests = {d for d in (status.get("activeDigest"), status.get("previousDigest")) if d}
    remaining: list[str] = []
    async with runtime.lock(namespace, name):
        pods, _ = await target_pods(runtime, ad)
        uid = ad.metadata.uid or name
        for attempt in range(attempts):
            runtime.tracks.pop(uid, None)
            results = await converge(
                runtime, uid, ad.spec.served_name, pods, dict.fromkeys((p.name for p in pods), None)
            )
            remaining = [r.pod.name for r in results.values() if r.state != "Unloaded"]
            if not remaining:
                break
            await asyncio.sleep(runtime.settings.backoff(attempt + 1))
        unloaded = [p for p in pods if p.name not in remaining]
        await asyncio.gather(*(_forget_unused(runtime, p, digests) for p in unloaded if not p.blocked))
    runtime.forget(namespace, name, ad.metadata.uid)
    if remaining:
        events.append(
            Event("Warning", "UnloadFailed", f"Could not unload {ad.spec.served_name} from {', '.join(remaining)}")
        )
    else:
        events.append(Event("Normal", "Unloaded", f"Unloaded {ad.spec.served_name} from {len(pods)} pods"))
    return events, remaining


async def _forget_unused(runtime: Runtime, pod: Pod, digests: set[str]) -> None:
    """Delete adapter files from the pod's agent when no served model uses them any more."""
    if not digests:
        return
    with contextlib.suppress(PodError):
        served = await runtime.pods.models(pod)
        in_use = {digest_of_root(root) for root in served.values()}
        for digest in digests - in_use:
            await runtime.pods.forget(pod, digest)
