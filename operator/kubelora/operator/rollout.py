"""The AdapterDeployment rollout as a pure transition function: observed state in, the next actions out.

:func:`step` reads nothing and writes nothing. The controller glue (``adapterdeployments.reconcile``)
gathers an :class:`Observed` (the spec's essentials, the status, the Ready target pods, the adapter the
spec resolves to, a servedName conflict, the clock), calls :func:`step`, and carries out the
:class:`Plan`: the new status (phase, conditions, digests, replica list), the events, and actions.

Observations that depend on actions come back as a second call. A plan that asks to
:class:`Converge` pods (load, unload or only look) while ``Observed.results`` is None, or to run a
:class:`SmokeCheck` while ``Observed.smoke`` is None, is not final: the glue does it, puts what it
saw into the observation (``dataclasses.replace``) and calls :func:`step` again. Every call recomputes
the whole decision from the same status, so the second call's plan names the same actions, and only
the final plan's status is written. ``Plan.again`` asks for another step at once on top of the new
status (a phase change: rollout started, a canary step reached, a rollback to converge).

Phases: Pending (waiting for the adapter) · Refused (a gate said no, or a servedName conflict) ·
Canary (the new adapter on the pods of the current step, smoke-checked on the first, each step baking)
· Promoting (on every pod) · Loading (AllAtOnce) · Ready · RolledBack (the rollout failed; the previous
adapter serves everywhere, or nothing if there was none) · Failed (the rollout failed and autoRollback
is off; pods are left as they are).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from kubelora.api.v1alpha1 import AdapterDeployment, ReplicaState, dump, short_digest
from kubelora.operator.conditions import get_condition, set_condition
from kubelora.operator.lorajobs import Event

ROLLOUT_PHASES = frozenset({"Loading", "Canary", "Promoting"})
MAX_REPLICA_ENTRIES = 50
SOURCE_UNAVAILABLE = "source unavailable"

#: How soon to look again at an AdapterDeployment whose source is not there yet (storage, a Secret, a manifest).
PENDING_RECHECK_SECONDS = 15.0
#: Admission problems that can go away without any Kubernetes object changing (storage, a manifest not yet
#: uploaded); gate refusals and a LoRAJob still training come back through events instead.
RECHECKED_REASONS = frozenset({"SecretNotFound", "AdapterNotFound", "AccessDenied", "StorageUnavailable",
                               "InvalidManifest", "NoAdapter"})  # fmt: skip
#: How soon to look again while a rollout runs (loads in flight, canary steps, the deadline).
ROLLOUT_RECHECK_SECONDS = 1.0


# ----------------------------------------------------------------------------------------------------------
# What a pod should serve


@dataclasses.dataclass(frozen=True)
class Want:
    digest: str
    uri: str


KEEP = "keep"  # observe only
WantValue = Want | None | str  # Want: serve it; None: serve nothing under servedName; KEEP


# ----------------------------------------------------------------------------------------------------------
# Observations


@dataclasses.dataclass(frozen=True)
class CanaryStep:
    replicas: int | None = None
    percent: int | None = None
    bake_seconds: int = 0


@dataclasses.dataclass(frozen=True)
class Spec:
    """The essentials of spec (and the operator's settings) that the rollout decides with."""

    served_name: str
    generation: int | None = 1
    strategy: Literal["AllAtOnce", "Canary"] = "Canary"
    canary_replicas: int = 1
    steps: tuple[CanaryStep, ...] = ()
    max_unavailable: int | None = None
    auto_rollback: bool = True
    timeout_seconds: float = 600.0  # KUBELORA_ROLLOUT_TIMEOUT_SECONDS (bake times extend it)
    max_attempts: int = 3  # KUBELORA_ROLLOUT_MAX_ATTEMPTS: failed loads of one pod before a rollout fails

    @classmethod
    def of(cls, ad: AdapterDeployment, timeout_seconds: float, max_attempts: int) -> Spec:
        rollout = ad.spec.rollout
        return cls(
            served_name=ad.spec.served_name,
            generation=ad.metadata.generation,
            strategy=rollout.strategy,
            canary_replicas=rollout.canary_replicas,
            steps=tuple(CanaryStep(s.replicas, s.percent, s.bake_seconds) for s in rollout.steps),
            max_unavailable=rollout.max_unavailable,
            auto_rollback=rollout.auto_rollback,
            timeout_seconds=timeout_seconds,
            max_attempts=max_attempts,
        )


@dataclasses.dataclass(frozen=True)
class Source:
    """What spec.adapter resolved to: ok (``digest``/``uri`` set), pending (not there or not readable now),
    or refused (a gate said no)."""

    state: Literal["ok", "pending", "refused"]
    reason: str = ""
    message: str = ""
    digest: str | None = None
    uri: str | None = None
    label: str = ""  # "LoRAJob x" or the URI, for messages


@dataclasses.dataclass(frozen=True)
class PodState:
    """One pod after converging it: what it serves under servedName, and its retry bookkeeping."""

    name: str
    state: Literal["Pending", "Loading", "Loaded", "Failed", "Unloaded"]
    digest: str | None
    message: str | None = None
    attempts: int = 0
    fatal: bool = False  # a load error (not an unreachable pod): counts toward failing a rollout
    refusal: str | None = None  # vLLM refused the adapter itself: fails a rollout at once


@dataclasses.dataclass(frozen=True)
class Smoke:
    passed: bool
    message: str
    skipped: bool = False


@dataclasses.dataclass(frozen=True)
class Observed:
    spec: Spec
    status: Mapping[str, Any]
    now: datetime.datetime
    source: Source
    pods: tuple[str, ...] = ()  # the Ready target pods, by name
    target_problem: str | None = None  # why there are no (or not all) pods: a missing Deployment, Secret, ...
    conflict_with: str | None = None  # an older AdapterDeployment serving servedName on the same pods
    results: tuple[PodState, ...] | None = None  # after the plan's Converge; None: not converged yet
    smoke: Smoke | None = None  # after the plan's SmokeCheck; None: not run yet


# ----------------------------------------------------------------------------------------------------------
# Actions and the plan


@dataclasses.dataclass(frozen=True)
class Converge:
    """Make every target pod serve what ``wants`` says under servedName (load, unload, or only look: KEEP)."""

    wants: tuple[tuple[str, WantValue], ...]

    def pods(self, value: WantValue) -> set[str]:
        return {name for name, want in self.wants if want == value}


@dataclasses.dataclass(frozen=True)
class SmokeCheck:
    """Ask the canary pods the adapter's eval prompts and compare with its eval predictions."""

    pods: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class WritePreload:
    """Managed servers: what a pod that starts now should serve (the agent's preload ConfigMap)."""

    serving: Want | None


@dataclasses.dataclass(frozen=True)
class RolloutStarted:
    digest: str
    previous: str | None
    strategy: str


@dataclasses.dataclass(frozen=True)
class RollBack:
    """The rollout failed: ``restored`` (None: nothing) serves again; the next step converges the pods."""

    failed: str
    restored: str | None
    reason: str


@dataclasses.dataclass(frozen=True)
class RolloutComplete:
    digest: str
    pods: int


Action = Converge | SmokeCheck | WritePreload | RolloutStarted | RollBack | RolloutComplete


@dataclasses.dataclass(frozen=True)
class Plan:
    status: Mapping[str, Any]
    events: tuple[Event, ...] = ()
    actions: tuple[Action, ...] = ()
    again: bool = False  # step once more at once, on the new status

    def action(self, kind: type[Any]) -> Any:
        return next((a for a in self.actions if isinstance(a, kind)), None)

    @property
    def converge(self) -> Converge | None:
        return self.action(Converge)

    @property
    def smoke(self) -> SmokeCheck | None:
        return self.action(SmokeCheck)

    @property
    def phase(self) -> str:
        return str(self.status.get("phase") or "Pending")

    def needs(self, observed: Observed) -> Converge | SmokeCheck | None:
        """The observation this plan waits for (the glue carries it out and steps again), or None: final."""
        if observed.results is None and self.converge is not None:
            return self.converge
        if observed.smoke is None and self.smoke is not None:
            return self.smoke
        return None

    def requeue_after(self) -> float | None:
        return recheck_after(self.status)


def recheck_after(status: Mapping[str, Any]) -> float | None:
    """Seconds until time-driven work needs another look (a rollout's progress and deadline, a source that
    is not readable yet), or None: only a change (a watch event) should bring the object back."""
    if status.get("phase") in ROLLOUT_PHASES:
        return ROLLOUT_RECHECK_SECONDS
    admitted = get_condition(list(status.get("conditions") or []), "Admitted")
    if admitted is not None and admitted.get("status") == "False" and admitted.get("reason") in RECHECKED_REASONS:
        return PENDING_RECHECK_SECONDS
    return None


# ----------------------------------------------------------------------------------------------------------
# Pure helpers


def timestamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def rollout_steps(spec: Spec, pod_count: int) -> list[tuple[int, int]]:
    """(pods, bake seconds) of each Canary step before "all pods": spec.rollout.steps, else one step of
    canaryReplicas with no bake. Percentages round up; every step has at least one pod."""
    steps = spec.steps or (CanaryStep(replicas=spec.canary_replicas),)
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


def choose_canary(pods: Sequence[str], before: Mapping[str, str | None], digest: str, count: int) -> list[str]:
    """``count`` pods, preferring those that already serve ``digest`` (so a rescheduled canary stays put)."""
    ordered = sorted(pods, key=lambda name: (before.get(name) != digest, name))
    return ordered[: max(1, min(count, len(pods)))]


def replicas(results: Sequence[PodState]) -> list[dict[str, Any]]:
    """status.replicas: failures first, at most MAX_REPLICA_ENTRIES."""
    ordered = sorted(results, key=lambda r: (r.state != "Failed", r.name))
    return [
        dump(
            ReplicaState(
                pod=r.name,
                digest=r.digest,
                state=r.state,
                message=(r.message or None) and r.message[:512],
                attempts=r.attempts,
            )
        )
        for r in ordered[:MAX_REPLICA_ENTRIES]
    ]


# ----------------------------------------------------------------------------------------------------------
# The transition function


def step(observed: Observed) -> Plan:
    """The next actions for an AdapterDeployment, from what was observed. Pure: no I/O, no clock."""
    return _Step(observed).run()


def delete(observed: Observed) -> Plan:
    """The AdapterDeployment is being deleted: serve nothing under servedName on any target pod."""
    converge = Converge(tuple((name, None) for name in observed.pods))
    if observed.results is None:
        return Plan(observed.status, actions=(converge,))
    remaining = [r.name for r in observed.results if r.state != "Unloaded"]
    served = observed.spec.served_name
    if remaining:
        event = Event("Warning", "UnloadFailed", f"Could not unload {served} from {', '.join(remaining)}")
    else:
        event = Event("Normal", "Unloaded", f"Unloaded {served} from {len(observed.pods)} pods")
    return Plan(observed.status, events=(event,), actions=(converge,))


class _Step:
    """One step's decision, built up in place (private: :func:`step` hands out only the frozen Plan)."""

    def __init__(self, observed: Observed) -> None:
        self.observed = observed
        self.spec = observed.spec
        self.generation = observed.spec.generation
        self.now = observed.now
        self.status: dict[str, Any] = {k: copy.deepcopy(v) for k, v in observed.status.items() if k != "kopf"}
        self.status.setdefault("phase", "Pending")
        self.events: list[Event] = []
        self.actions: list[Action] = []
        self.results = {r.name: r for r in observed.results} if observed.results is not None else None

    # -- building the plan ----------------------------------------------------------------------------------

    def plan(self, again: bool = False) -> Plan:
        return Plan(self.status, tuple(self.events), tuple(self.actions), again)

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
        text = "True" if status else "False"
        if (
            before is not None
            and before.get("status") == text
            and before.get("reason") == reason
            and before.get("message") == message[:1024]
            and before.get("observedGeneration") == self.generation
        ):
            return
        conditions = set_condition(conditions, type_, status, reason, message, self.generation)
        if before is None or before.get("status") != text:
            # the transition happened at the observed time, not when this function ran
            conditions[-1]["lastTransitionTime"] = timestamp(self.now)
        self.status["conditions"] = conditions

    def progress(self, reason: str, message: str) -> None:
        """The rollout moves on: the message, Progressing True with ``reason``, Ready False meanwhile."""
        self.status["message"] = message
        self.condition("Progressing", True, reason, message)
        self.condition("Ready", False, "RolloutInProgress", message)

    def condition_of(self, type_: str) -> dict[str, Any] | None:
        return get_condition(list(self.status.get("conditions") or []), type_)

    def reason_of(self, type_: str) -> str | None:
        condition = self.condition_of(type_)
        return condition.get("reason") if condition else None

    def reason_changed(self, type_: str, reason: str) -> bool:
        return self.reason_of(type_) != reason

    def event(self, kind: str, reason: str, message: str) -> None:
        self.events.append(Event(kind, reason, message[:1024]))

    def set_digests(self, active: Want | None, previous: Want | None) -> None:
        self.status["activeDigest"] = active.digest if active else None
        self.status["activeUri"] = active.uri if active else None
        self.status["previousDigest"] = previous.digest if previous else None
        self.status["previousUri"] = previous.uri if previous else None

    def _decided_here(self) -> bool:
        """The last rollout decision (RolledBack/Failed) was made for the current spec generation."""
        progressing = self.condition_of("Progressing")
        return progressing is not None and progressing.get("observedGeneration") == self.generation

    # -- the decision ---------------------------------------------------------------------------------------

    def run(self) -> Plan:
        observed, spec = self.observed, self.spec
        source = observed.source
        self.status["observedGeneration"] = self.generation
        rolling = self.phase in ROLLOUT_PHASES
        if observed.conflict_with is not None:
            return self.conflict(observed.conflict_with)
        if self.reason_of("Conflict") == "ServedNameInUse":
            self.condition(
                "Conflict", False, "NoConflict", f"No other AdapterDeployment serves {spec.served_name} here"
            )

        if source.state == "refused":
            self.condition("Admitted", False, source.reason, source.message)
            if rolling:
                self.abandon_rollout(f"spec.adapter now names an adapter that is refused ({source.reason})")
            if self.phase != "Refused" or self.reason_changed("Ready", source.reason):
                self.event("Warning", source.reason, source.message)
            self.status["phase"] = "Refused"
            serving = f"; still serving {short_digest(self.active.digest)}" if self.active else ""
            self.status["message"] = source.message + serving
            self.condition("Ready", False, source.reason, source.message + serving)
        elif source.state == "pending":
            if rolling:
                # The source went away or cannot be read now (storage, a deleted LoRAJob): keep converging the
                # pods with what the status names; the smoke check and the next step wait for the source, the
                # deadline does not.
                self.condition("Admitted", False, source.reason, source.message)
                plan = self.drive(None)
                message = str(self.status.get("message") or "")
                if self.phase in ROLLOUT_PHASES and SOURCE_UNAVAILABLE not in message:
                    self.status["message"] = f"{message}; {SOURCE_UNAVAILABLE}: {source.message}"
                return plan
            if self.reason_changed("Admitted", source.reason):
                kind = "Warning" if source.reason.endswith(("NotFound", "Unavailable")) else "Normal"
                self.event(kind, source.reason, source.message)
            self.condition("Admitted", False, source.reason, source.message)
            if not (self.phase in ("RolledBack", "Failed") and self._decided_here()):
                # (a rollout that failed for this spec keeps saying so; Admitted says the source is gone too)
                serving = f"; still serving {short_digest(self.active.digest)}" if self.active else ""
                self.status["phase"] = "Pending"
                self.status["message"] = source.message + serving
                self.condition("Ready", False, source.reason, source.message + serving)
        else:
            assert source.digest is not None and source.uri is not None
            self.condition("Admitted", True, "GatesPassed", source.message)
            if rolling and self.active and self.active.digest != source.digest:
                self.abandon_rollout(f"spec.adapter changed to {short_digest(source.digest)}")
                rolling = False
            if not rolling and self.should_roll_out(source.digest):
                self.start_rollout(source, len(observed.pods))
                return self.plan(again=True)
            if self.phase in ("Pending", "Refused") and self.active and self.active.digest == source.digest:
                self.status["phase"] = "Ready"  # the gate passes again for what is already served
        return self.drive(source if source.state == "ok" else None)

    def conflict(self, owner: str) -> Plan:
        """Another, older AdapterDeployment serves this servedName on the same pods: do nothing, and say so."""
        served = self.spec.served_name
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
        return self.plan()

    def should_roll_out(self, digest: str) -> bool:
        active = self.active
        if active is not None and active.digest == digest:
            return False
        if self._decided_here():
            # A rollout failed for this very spec: do not try the same adapter again until the spec changes.
            if self.phase == "RolledBack" and self.status.get("previousDigest") == digest:
                return False
            if self.phase == "Failed":
                return False
        return True

    def start_rollout(self, source: Source, pod_count: int) -> None:
        assert source.digest is not None and source.uri is not None
        spec = self.spec
        old = self.active
        self.set_digests(Want(source.digest, source.uri), old)
        # a new Progressing condition: its lastTransitionTime starts the deadline
        self.status["conditions"] = [c for c in self.status.get("conditions") or [] if c.get("type") != "Progressing"]
        canary = spec.strategy == "Canary"
        self.status["phase"] = "Canary" if canary else "Loading"
        self.status["currentStep"] = 0 if canary else None
        self.status["stepStartedAt"] = None
        steps = rollout_steps(spec, pod_count)
        how = (
            f"Canary on {steps[0][0]} of {pod_count} pods" + (f", {len(steps)} steps" if len(steps) > 1 else "")
            if canary
            else f"AllAtOnce on {pod_count} pods"
        )
        replacing = f", replacing {short_digest(old.digest)}" if old else ""
        message = f"Rolling out {source.label} {short_digest(source.digest)} ({how}){replacing}"
        self.progress("RolloutStarted", message)
        self.event("Normal", "RolloutStarted", message)
        self.actions.append(RolloutStarted(source.digest, old.digest if old else None, spec.strategy))

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

    def wants(self, before: Mapping[str, str | None]) -> tuple[dict[str, WantValue], list[str]]:
        """What each pod should serve now, and the canary pods (Canary phase)."""
        pods = self.observed.pods
        phase, active, previous = self.phase, self.active, self.previous
        most = self.spec.max_unavailable
        if phase == "Canary" and active is not None:
            steps = rollout_steps(self.spec, len(pods))
            count = steps[min(int(self.status.get("currentStep") or 0), len(steps) - 1)][0]
            canary = choose_canary(pods, before, active.digest, count)
            split: dict[str, WantValue] = {p: (active if p in canary else previous) for p in pods}
            return limit_switching(split, before, active.digest, most), canary
        if phase == "Failed":
            return dict.fromkeys(pods, KEEP), []
        if active is None:
            return dict.fromkeys(pods, None if phase == "RolledBack" else KEEP), []
        wanted: dict[str, WantValue] = dict.fromkeys(pods, active)
        if phase in ("Promoting", "Loading"):
            wanted = limit_switching(wanted, before, active.digest, most)
        return wanted, []

    def drive(self, source: Source | None) -> Plan:
        """Converge the pods, then move the rollout on from what they serve."""
        pods = self.observed.pods
        # What pods served on the last pass decides the canary set; read it from status.
        before = {r["pod"]: r.get("digest") for r in self.status.get("replicas") or [] if r.get("state") == "Loaded"}
        if self.active is None and self.phase in ("Pending", "Refused"):
            if not before:
                self.status.update(desiredReplicas=len(pods), loadedReplicas=0, replicas=[])
                return self.plan()
            # A first rollout stopped half-way (its adapter refused, the spec changed to one still pending) left
            # its canary pods serving an adapter nothing admits any more: unload it, so servedName serves nothing.
            self.actions.append(Converge(tuple((pod, None) for pod in sorted(pods))))
            if self.results is None:
                return self.plan()
            # a pod whose unload failed stays Loaded here and is unloaded again on the next pass
            self.status.update(
                desiredReplicas=len(pods), loadedReplicas=0, replicas=replicas(list(self.results.values()))
            )
            return self.plan()
        if self.phase in ("Ready", "RolledBack"):
            # a completed rollback (or unload) is what a starting pod preloads, before the pods unload
            self.actions.append(WritePreload(self.active))
        wants, canary = self.wants(before)
        self.actions.append(Converge(tuple(sorted(wants.items()))))
        if self.results is None:
            return self.plan()
        results = self.results
        active = self.active
        loaded = sum(1 for r in results.values() if r.state == "Loaded" and active and r.digest == active.digest)
        self.status.update(desiredReplicas=len(pods), loadedReplicas=loaded, replicas=replicas(list(results.values())))
        phase = self.phase
        if phase in ROLLOUT_PHASES:
            return self.drive_rollout(source, canary, loaded)
        if phase == "Ready" and active is not None:
            summary = f"{short_digest(active.digest)} loaded on {loaded}/{len(pods)} pods as {self.spec.served_name}"
            if pods and loaded == len(pods):
                self.condition("Ready", True, "AdapterLoaded", summary)
                self.status["message"] = summary
            else:
                failures = [r for r in results.values() if r.state == "Failed"]
                detail = self.observed.target_problem or (
                    f"{failures[0].name}: {failures[0].message}" if failures else ""
                )
                self.condition("Ready", False, "ReplicasNotLoaded", summary + (f"; {detail}" if detail else ""))
                self.status["message"] = summary + (f"; {detail}" if detail else "")
        return self.plan()

    def drive_rollout(self, source: Source | None, canary: list[str], loaded: int) -> Plan:
        spec, pods = self.spec, self.observed.pods
        active = self.active
        assert active is not None and self.results is not None
        results = self.results
        targets = canary if self.phase == "Canary" else list(pods)
        if not pods:
            self.status["message"] = f"Rollout waiting: {self.observed.target_problem or 'no Ready pods'}"
            self.condition("Ready", False, "NoReadyPods", self.status["message"])
            return self.check_deadline()
        refused = [results[p] for p in targets if results[p].refusal]
        if refused:
            first = refused[0]
            return self.fail(
                "AdapterRejected", f"vLLM on pod {first.name} refused {short_digest(active.digest)}: {first.refusal}"
            )
        broken = [results[p] for p in targets if results[p].fatal and results[p].attempts >= spec.max_attempts]
        if broken:
            first = broken[0]
            return self.fail(
                "LoadFailed",
                f"Loading {short_digest(active.digest)} failed {first.attempts} times on pod {first.name}: "
                f"{first.message}",
            )
        done = [p for p in targets if results[p].state == "Loaded" and results[p].digest == active.digest]
        if len(done) < len(targets):
            waiting = [results[p] for p in targets if p not in done]
            detail = "; ".join(f"{r.name}: {r.message}" for r in waiting if r.message)[:300]
            self.status["message"] = (
                f"{self.phase}: {short_digest(active.digest)} loaded on {len(done)}/{len(targets)} target pods"
                + (f"; {detail}" if detail else "")
            )
            self.condition("Ready", False, "RolloutInProgress", self.status["message"])
            if self.phase == "Canary" and self.reason_of("Progressing") == "SmokeCheck":
                self.condition("Progressing", True, "CanaryLoading", self.status["message"])
            return self.check_deadline()
        if self.phase == "Canary":
            return self.drive_canary(source, canary, loaded)
        summary = f"{short_digest(active.digest)} loaded on {loaded}/{len(pods)} pods as {spec.served_name}"
        self.status["phase"] = "Ready"
        self.actions.append(WritePreload(active))  # the rollout completed
        self.status["message"] = summary
        self.condition("Progressing", False, "RolloutComplete", f"Rollout of {short_digest(active.digest)} complete")
        self.condition("Ready", True, "AdapterLoaded", summary)
        self.event("Normal", "RolloutComplete", f"Rollout complete: {summary}")
        self.actions.append(RolloutComplete(active.digest, len(pods)))
        return self.plan()

    def drive_canary(self, source: Source | None, canary: list[str], loaded: int) -> Plan:
        """Every pod of the current step serves the new adapter: smoke-check (first step), bake, step on."""
        pods, active = self.observed.pods, self.active
        assert active is not None
        steps = rollout_steps(self.spec, len(pods))
        index = min(int(self.status.get("currentStep") or 0), len(steps) - 1)
        label = f"Step {index + 1}/{len(steps)}" if len(steps) > 1 else "Canary"
        if source is None:
            # The source is not readable: no smoke check, no next step; the deadline decides (and its message
            # says why the rollout stood still).
            self.status["message"] = (
                f"{label}: {short_digest(active.digest)} on {len(canary)}/{len(pods)} pods; the next step waits "
                f"for the source; {SOURCE_UNAVAILABLE}: {self.observed.source.message}"
            )
            return self.check_deadline()
        if not self.status.get("stepStartedAt"):
            if index == 0:
                if self.reason_of("Progressing") != "SmokeCheck":
                    # Write the loaded canary first (status shows it), then smoke-test it in the next step.
                    message = (
                        f"{label}: {short_digest(active.digest)} loaded on {', '.join(canary)} "
                        f"({loaded}/{len(pods)} pods); running the smoke check"
                    )
                    self.progress("SmokeCheck", message)
                    return self.plan(again=True)
                self.actions.append(SmokeCheck(tuple(canary)))
                smoke = self.observed.smoke
                if smoke is None:
                    return self.plan()
                if not smoke.passed:
                    return self.fail("SmokeCheckFailed", smoke.message)
                self.event("Normal", "SmokeCheckSkipped" if smoke.skipped else "CanaryPassed", smoke.message)
            self.status["stepStartedAt"] = timestamp(self.now)
        started = parse_time(self.status.get("stepStartedAt")) or self.now
        left = steps[index][1] - (self.now - started).total_seconds()
        if left > 0:
            message = (
                f"{label}: {short_digest(active.digest)} on {len(canary)}/{len(pods)} pods, baking "
                f"{math.ceil(left)}s more"
            )
            self.progress("Baking", message)
            return self.check_deadline()
        if index + 1 < len(steps):
            self.status["currentStep"] = index + 1
            self.status["stepStartedAt"] = None
            message = (
                f"Step {index + 2}/{len(steps)}: loading {short_digest(active.digest)} on "
                f"{steps[index + 1][0]} of {len(pods)} pods"
            )
            self.progress("StepStarted", message)
            self.event("Normal", "RolloutStep", message)
            return self.plan(again=True)
        self.status["phase"] = "Promoting"
        self.status["currentStep"] = self.status["stepStartedAt"] = None
        message = f"Promoting {short_digest(active.digest)} to all {len(pods)} pods after {len(steps)} step(s)"
        self.progress("Promoting", message)
        return self.plan(again=True)

    def deadline(self) -> float:
        """Seconds a rollout may take from its start: the timeout, plus the bake times (the rollout's own
        waiting, not slowness)."""
        limit = self.spec.timeout_seconds
        if self.spec.strategy == "Canary":
            limit += sum(bake for _, bake in rollout_steps(self.spec, 1))
        return limit

    def check_deadline(self) -> Plan:
        progressing = self.condition_of("Progressing")
        started = parse_time(progressing.get("lastTransitionTime") if progressing else None)
        limit = self.deadline()
        if started is not None and (self.now - started).total_seconds() > limit:
            return self.fail(
                "RolloutTimedOut", f"The rollout did not finish within {limit:.0f}s: {self.status.get('message')}"
            )
        return self.plan()

    def fail(self, reason: str, message: str) -> Plan:
        failed, previous = self.active, self.previous
        assert failed is not None
        self.status["currentStep"] = self.status["stepStartedAt"] = None
        if self.spec.auto_rollback:
            self.set_digests(previous, failed)
            self.status["phase"] = "RolledBack"
            outcome = (
                f"rolled back to {short_digest(previous.digest)}" if previous else "unloaded it (no previous adapter)"
            )
            self.actions.append(RollBack(failed.digest, previous.digest if previous else None, reason))
        else:
            self.status["phase"] = "Failed"
            outcome = "autoRollback is off"
        text = f"Rollout of {short_digest(failed.digest)} failed ({reason}): {message}; {outcome}"
        # Progressing says what happened, Ready says why: the failure's own reason.
        self.condition("Progressing", False, "RolledBack" if self.spec.auto_rollback else reason, text)
        self.condition("Ready", False, reason, text)
        self.status["message"] = text
        self.event("Warning", reason, text)
        return self.plan(again=self.spec.auto_rollback)  # a rollback: converge the pods back at once
