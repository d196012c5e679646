"""The rollout transition function (kubelora.operator.rollout) on its own: observed state in, plan out.

No cluster, no HTTP, no fakes of either: a few lines below play the pods (what each serves) and the clock,
and every table row is one situation and what ``rollout.step`` must decide.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import pytest

from kubelora.operator import rollout
from kubelora.operator.rollout import KEEP, Observed, PodState, Source, Spec, Want

T0 = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC)
A = Want("sha256:" + "a" * 64, "s3://b/a/")
B = Want("sha256:" + "b" * 64, "s3://b/b/")
PODS = tuple(f"vllm-{i}" for i in range(5))


def ok(want: Want) -> Source:
    return Source("ok", "GatesPassed", "gates passed", want.digest, want.uri, "s3://b/x/")


def serving(want: Want) -> dict[str, Any]:
    """The status of an AdapterDeployment that serves ``want`` everywhere (Ready)."""
    return {
        "phase": "Ready",
        "activeDigest": want.digest,
        "activeUri": want.uri,
        "replicas": [{"pod": p, "digest": want.digest, "state": "Loaded"} for p in PODS],
        "conditions": [{"type": "Progressing", "status": "False", "reason": "RolloutComplete",
                        "lastTransitionTime": "2026-11-30T11:00:00Z", "observedGeneration": 1}],
    }  # fmt: skip


class World:
    """The pods: what each serves under servedName; ``broken`` digests fail to load, ``refused`` are refused."""

    def __init__(self, pods: tuple[str, ...], digest: str | None = None) -> None:
        self.served: dict[str, str | None] = dict.fromkeys(pods, digest)
        self.attempts: dict[str, int] = {}
        self.broken: set[str] = set()

    def converge(self, action: rollout.Converge) -> tuple[PodState, ...]:
        out = []
        for name, want in action.wants:
            if want == KEEP:
                digest = self.served[name]
                out.append(PodState(name, "Loaded" if digest else "Unloaded", digest))
            elif want is None:
                self.served[name] = None
                out.append(PodState(name, "Unloaded", None))
            elif isinstance(want, Want) and want.digest in self.broken:
                self.attempts[name] = self.attempts.get(name, 0) + 1
                out.append(PodState(name, "Failed", want.digest, "load failed", self.attempts[name], fatal=True))
            else:
                assert isinstance(want, Want)
                self.served[name] = want.digest
                out.append(PodState(name, "Loaded", want.digest))
        return tuple(out)

    def count(self, want: Want) -> int:
        return sum(1 for d in self.served.values() if d == want.digest)


def settle(observed: Observed, world: World, smoke: rollout.Smoke | None = None, steps: int = 8) -> list[rollout.Plan]:
    """What the controller glue does in one pass, with ``world`` as the pods: step, carry out what the plan
    needs, step again; follow ``again``. Returns the final plan of every step."""
    plans = []
    for _ in range(steps):
        current = observed
        while True:
            plan = rollout.step(current)
            need = plan.needs(current)
            if need is None:
                break
            if isinstance(need, rollout.Converge):
                current = dataclasses.replace(current, results=world.converge(need))
            else:
                assert smoke is not None, "no smoke check expected here"
                current = dataclasses.replace(current, smoke=smoke)
        plans.append(plan)
        observed = dataclasses.replace(observed, status=plan.status)
        if not plan.again:
            break
    return plans


def observed(spec: Spec, status: dict[str, Any], source: Source, now: datetime.datetime = T0, **kw: Any) -> Observed:
    return Observed(spec=spec, status=status, now=now, source=source, pods=PODS, **kw)


def reasons(plans: list[rollout.Plan]) -> list[str]:
    return [e.reason for p in plans for e in p.events]


def condition(plan: rollout.Plan, type_: str) -> dict[str, Any]:
    return next(c for c in plan.status["conditions"] if c["type"] == type_)


PASSED = rollout.Smoke(True, "Smoke check: 3/3 matched")
FAILED = rollout.Smoke(False, "Smoke check: 0/3 matched")


# ----------------------------------------------------------------------------------------------------------
# Single decisions, as a table: (situation, status, source, results, what the plan must say)


CASES = [
    pytest.param(
        Spec("svc", strategy="AllAtOnce"), {}, ok(A), None,
        {"phase": "Loading", "again": True, "events": ["RolloutStarted"], "converge": None},
        id="a new adapter starts an AllAtOnce rollout",
    ),
    pytest.param(
        Spec("svc"), serving(A), ok(B), None,
        {"phase": "Canary", "again": True, "events": ["RolloutStarted"], "converge": None},
        id="a changed adapter starts a canary",
    ),
    pytest.param(
        Spec("svc"), serving(A), ok(A), None,
        {"phase": "Ready", "again": False, "events": [], "needs": "Converge"},
        id="steady: look at the pods, nothing else",
    ),
    pytest.param(
        Spec("svc"), serving(A), ok(A), tuple(PodState(p, "Loaded", A.digest) for p in PODS),
        {"phase": "Ready", "again": False, "events": [], "needs": None, "preload": A},
        id="steady and converged: final, the preload names what is served",
    ),
    pytest.param(
        Spec("svc"), {}, Source("pending", "LoRAJobNotSucceeded", "waiting"), None,
        {"phase": "Pending", "again": False, "events": ["LoRAJobNotSucceeded"], "converge": None},
        id="no adapter yet: wait, touch no pod",
    ),
    pytest.param(
        Spec("svc"), serving(A), Source("refused", "RankTooHigh", "rank 32 exceeds 16"), None,
        {"phase": "Refused", "again": False, "events": ["RankTooHigh"], "keep": A},
        id="a refused adapter: say so, keep serving the active one",
    ),
    pytest.param(
        Spec("svc"), serving(A), ok(B), None,
        {"phase": "Refused", "again": False, "events": ["Conflict"], "converge": None, "conflict": "older"},
        id="servedName conflict: the newer one loads nothing",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "status", "source", "results", "expect"), CASES)
def test_one_step(spec, status, source, results, expect):
    kw = {"conflict_with": expect["conflict"]} if "conflict" in expect else {}
    seen = observed(spec, status, source, results=results, **kw)
    plan = rollout.step(seen)
    assert plan.phase == expect["phase"]
    assert plan.again == expect["again"]
    assert [e.reason for e in plan.events] == expect["events"]
    if "converge" in expect:
        assert plan.converge is expect["converge"]
    if "needs" in expect:
        need = plan.needs(seen)
        assert (type(need).__name__ if need else None) == expect["needs"]
    if "preload" in expect:
        assert plan.action(rollout.WritePreload) == rollout.WritePreload(expect["preload"])
    if "keep" in expect:
        assert plan.converge is not None and plan.converge.pods(expect["keep"]) == set(PODS)
    if "conflict" in expect:
        assert condition(plan, "Conflict")["reason"] == "ServedNameInUse"
        assert condition(plan, "Ready")["reason"] == "ServedNameConflict"


@pytest.mark.parametrize(
    ("phase", "status_extra", "expected"),
    [
        ("Loading", {}, {B: set(PODS)}),
        ("Promoting", {}, {B: set(PODS)}),
        ("Canary", {"currentStep": 0}, {B: {"vllm-0", "vllm-1"}, A: {"vllm-2", "vllm-3", "vllm-4"}}),
        ("Failed", {}, {KEEP: set(PODS)}),
        ("RolledBack", {"activeDigest": None, "activeUri": None}, {None: set(PODS)}),
    ],
)
def test_what_each_pod_should_serve_in_each_phase(phase, status_extra, expected):
    status = {**serving(A), "phase": phase, "activeDigest": B.digest, "activeUri": B.uri}
    status.update(previousDigest=A.digest, previousUri=A.uri, **status_extra)
    source = Source("pending", "LoRAJobNotFound", "gone") if phase in ("Failed", "RolledBack") else ok(B)
    plan = rollout.step(observed(Spec("svc", canary_replicas=2), status, source))
    assert plan.converge is not None
    assert {value: plan.converge.pods(value) for value in expected} == expected


# ----------------------------------------------------------------------------------------------------------
# Whole rollouts


def test_all_at_once_loads_every_pod_and_completes():
    world = World(PODS)
    plans = settle(observed(Spec("svc", strategy="AllAtOnce"), {}, ok(A)), world)
    final = plans[-1]
    assert [p.phase for p in plans] == ["Loading", "Ready"]
    assert (final.status["loadedReplicas"], final.status["desiredReplicas"]) == (5, 5)
    assert world.count(A) == 5
    assert reasons(plans) == ["RolloutStarted", "RolloutComplete"]
    assert final.action(rollout.RolloutComplete) == rollout.RolloutComplete(A.digest, 5)
    assert final.action(rollout.WritePreload) == rollout.WritePreload(A)
    assert condition(final, "Ready")["reason"] == "AdapterLoaded"
    assert final.requeue_after() is None


def test_a_three_step_canary_bakes_replicas_then_percent_then_all():
    spec = Spec(
        "svc",
        steps=(rollout.CanaryStep(replicas=1, bake_seconds=60), rollout.CanaryStep(percent=60, bake_seconds=120)),
    )
    world = World(PODS, A.digest)
    now = T0
    plans = settle(observed(spec, serving(A), ok(B), now), world, PASSED)
    status = plans[-1].status
    # started, canary loaded (written before the smoke check), smoke passed and baking
    assert [p.phase for p in plans] == ["Canary", "Canary", "Canary"]
    assert (status["currentStep"], world.count(B), status["stepStartedAt"]) == (0, 1, "2026-11-30T12:00:00Z")
    assert reasons(plans) == ["RolloutStarted", "CanaryPassed"]
    assert "Step 1/2" in status["message"] and "baking 60s more" in status["message"]
    assert plans[-1].requeue_after() == rollout.ROLLOUT_RECHECK_SECONDS

    timeline = [
        (30, 0, 1, "baking 30s more"),
        (61, 1, 3, "baking 120s more"),  # step 2: 60% of 5 pods, rounded up
        (61 + 119, 1, 3, "baking 1s more"),
    ]
    events = []
    for seconds, step, count, message in timeline:
        now = T0 + datetime.timedelta(seconds=seconds)
        plans = settle(observed(spec, status, ok(B), now), world)
        status = plans[-1].status
        events += reasons(plans)
        assert (status["phase"], status["currentStep"], world.count(B)) == ("Canary", step, count), seconds
        assert message in status["message"]
    assert events == ["RolloutStep"], "one step change, and no second smoke check"
    now = T0 + datetime.timedelta(seconds=61 + 121)
    plans = settle(observed(spec, status, ok(B), now), world)
    assert [p.phase for p in plans] == ["Promoting", "Ready"]
    assert world.count(B) == 5
    assert "currentStep" not in {k for k, v in plans[-1].status.items() if v is not None}


def test_max_unavailable_moves_at_most_that_many_pods_per_step():
    spec = Spec("svc", strategy="AllAtOnce", max_unavailable=2)
    world = World(PODS, A.digest)
    status = serving(A)
    counts = []
    for _ in range(4):
        before = world.count(B)
        plans = settle(observed(spec, status, ok(B)), world)
        status = plans[-1].status
        assert world.count(B) - before <= 2
        counts.append(world.count(B))
    assert counts == [2, 4, 5, 5]
    assert status["phase"] == "Ready"


def test_a_failed_smoke_check_rolls_back_to_the_previous_adapter():
    world = World(PODS, A.digest)
    plans = settle(observed(Spec("svc", canary_replicas=2), serving(A), ok(B)), world, FAILED)
    final = plans[-1]
    assert [p.phase for p in plans] == ["Canary", "Canary", "RolledBack", "RolledBack"]
    rollback = plans[-2].action(rollout.RollBack)
    assert rollback == rollout.RollBack(B.digest, A.digest, "SmokeCheckFailed")
    assert (final.status["activeDigest"], final.status["previousDigest"]) == (A.digest, B.digest)
    assert condition(final, "Ready")["reason"] == "SmokeCheckFailed"
    assert condition(final, "Progressing")["reason"] == "RolledBack"
    assert world.count(A) == 5, "the canary pods serve the previous adapter again"
    # The same spec does not try the rejected adapter again.
    again = settle(observed(Spec("svc", canary_replicas=2), dict(final.status), ok(B)), world)
    assert [p.phase for p in again] == ["RolledBack"] and world.count(B) == 0


def test_without_auto_rollback_a_failed_smoke_check_leaves_the_pods_as_they_are():
    world = World(PODS, A.digest)
    spec = Spec("svc", canary_replicas=2, auto_rollback=False)
    plans = settle(observed(spec, serving(A), ok(B)), world, FAILED)
    assert plans[-1].phase == "Failed" and plans[-1].action(rollout.RollBack) is None
    after = settle(observed(spec, dict(plans[-1].status), ok(B)), world)
    assert after[-1].converge is not None and after[-1].converge.pods(KEEP) == set(PODS)
    assert (world.count(A), world.count(B)) == (3, 2)


def test_a_load_failing_max_attempts_times_rolls_back():
    world = World(PODS, A.digest)
    world.broken = {B.digest}
    spec = Spec("svc", canary_replicas=2, max_attempts=2)
    status = serving(A)
    phases = []
    for _ in range(3):
        plans = settle(observed(spec, status, ok(B)), world)
        status = plans[-1].status
        phases.append(plans[-1].phase)
    assert phases == ["Canary", "RolledBack", "RolledBack"]
    assert condition(settle(observed(spec, status, ok(B)), world)[-1], "Ready")["reason"] == "LoadFailed"


def test_a_source_that_disappears_mid_rollout_keeps_converging_then_the_deadline_rolls_back():
    spec = Spec("svc", canary_replicas=2, timeout_seconds=30, steps=(rollout.CanaryStep(replicas=2, bake_seconds=60),))
    world = World(PODS, A.digest)
    plans = settle(observed(spec, serving(A), ok(B)), world, PASSED)
    status = plans[-1].status
    assert (status["phase"], world.count(B)) == ("Canary", 2) and "baking" in status["message"]
    gone = Source("pending", "AdapterNotFound", "s3://b/b/ does not exist")
    # A canary pod restarts and comes back without the adapter: the rollout still converges it.
    world.served["vllm-0"] = None
    for seconds in (10, 60 + 20):  # before the deadline (timeout 30 s + the 60 s bake)
        plans = settle(observed(spec, status, gone, T0 + datetime.timedelta(seconds=seconds)), world)
        status = plans[-1].status
        assert status["phase"] == "Canary", seconds
        assert plans[-1].converge is not None and plans[-1].converge.pods(B) == {"vllm-0", "vllm-1"}
        assert world.count(B) == 2
        assert "source unavailable: s3://b/b/ does not exist" in status["message"]
        assert condition(plans[-1], "Admitted")["reason"] == "AdapterNotFound"
    # the bake is over, but without the source the rollout does not step on
    assert status["currentStep"] == 0
    plans = settle(observed(spec, status, gone, T0 + datetime.timedelta(seconds=91)), world)
    assert [p.phase for p in plans] == ["RolledBack", "RolledBack"]
    assert plans[0].action(rollout.RollBack) == rollout.RollBack(B.digest, A.digest, "RolloutTimedOut")
    final = plans[-1]
    assert condition(final, "Ready")["reason"] == "RolloutTimedOut"
    assert "within 90s" in condition(final, "Ready")["message"]
    assert world.count(A) == 5
    assert "RolloutTimedOut" in reasons(plans)


def test_a_first_rollout_that_fails_unloads_the_adapter_everywhere():
    world = World(PODS)
    spec = Spec("svc", canary_replicas=1)
    plans = settle(observed(spec, {}, ok(B)), world, FAILED)
    assert plans[-1].phase == "RolledBack" and plans[-1].status.get("activeDigest") is None
    assert plans[-1].converge is not None and plans[-1].converge.pods(None) == set(PODS)
    assert world.count(B) == 0


def test_no_ready_pods_waits_until_the_deadline():
    spec = Spec("svc", strategy="AllAtOnce", timeout_seconds=60)
    seen = dataclasses.replace(observed(spec, {}, ok(A)), pods=(), target_problem="No Ready pods match app=vllm")
    plans = settle(seen, World(()))
    assert plans[-1].phase == "Loading" and condition(plans[-1], "Ready")["reason"] == "NoReadyPods"
    later = dataclasses.replace(seen, status=plans[-1].status, now=T0 + datetime.timedelta(seconds=61))
    plans = settle(later, World(()))
    assert plans[0].phase == "RolledBack" and condition(plans[-1], "Ready")["reason"] == "RolloutTimedOut"


def test_a_conflict_abandons_a_running_rollout_and_clears_when_the_other_goes():
    status = {**serving(A), "phase": "Canary", "activeDigest": B.digest, "activeUri": B.uri,
              "previousDigest": A.digest, "previousUri": A.uri, "currentStep": 0}  # fmt: skip
    plan = rollout.step(observed(Spec("svc"), status, ok(B), conflict_with="older"))
    assert plan.phase == "Refused" and plan.converge is None
    assert [e.reason for e in plan.events] == ["RolloutSuperseded", "Conflict"]
    assert plan.status["activeDigest"] == A.digest
    plans = settle(observed(Spec("svc"), dict(plan.status), ok(B)), World(PODS, A.digest), PASSED)
    assert condition(plans[0], "Conflict")["status"] == "False"
    assert plans[-1].phase == "Ready" and plans[-1].status["activeDigest"] == B.digest


def test_delete_unloads_from_every_pod():
    world = World(PODS, A.digest)
    seen = observed(Spec("svc"), serving(A), Source("pending"))
    plan = rollout.delete(seen)
    assert plan.needs(seen) == rollout.Converge(tuple((p, None) for p in PODS))
    done = rollout.delete(dataclasses.replace(seen, results=world.converge(plan.converge)))
    assert [(e.type, e.reason) for e in done.events] == [("Normal", "Unloaded")]
    assert world.count(A) == 0
    stuck = (PodState("vllm-0", "Failed", A.digest, "unreachable"), *(PodState(p, "Unloaded", None) for p in PODS[1:]))
    failed = rollout.delete(dataclasses.replace(seen, results=stuck))
    assert [(e.type, e.reason) for e in failed.events] == [("Warning", "UnloadFailed")]
    assert "vllm-0" in failed.events[0].message


def test_steps_round_percentages_up_and_never_go_below_one_pod():
    spec = Spec("svc", steps=(rollout.CanaryStep(percent=10), rollout.CanaryStep(replicas=9, bake_seconds=5)))
    assert rollout.rollout_steps(spec, 5) == [(1, 0), (5, 5)]
    assert rollout.rollout_steps(spec, 25) == [(3, 0), (9, 5)]
    assert rollout.rollout_steps(Spec("svc", canary_replicas=3), 0) == [(1, 0)]


def test_the_step_is_pure():
    status = serving(A)
    frozen = repr(status)
    seen = observed(Spec("svc"), status, ok(B))
    assert rollout.step(seen) == rollout.step(seen)
    assert repr(status) == frozen, "the observed status is not changed in place"


def test_while_the_source_is_gone_the_status_message_does_not_grow_pass_after_pass():
    spec = Spec("svc", canary_replicas=2, steps=(rollout.CanaryStep(replicas=2, bake_seconds=5),))
    world = World(PODS, A.digest)
    status = settle(observed(spec, serving(A), ok(B)), world, PASSED)[-1].status
    gone = Source("pending", "AdapterNotFound", "s3://b/b/ does not exist")
    messages = []
    for seconds in (1, 2, 10, 11):
        status = settle(observed(spec, status, gone, T0 + datetime.timedelta(seconds=seconds)), world)[-1].status
        messages.append(status["message"])
    assert messages[2] == messages[3] and messages[3].count("source unavailable") == 1, messages
    assert "the next step waits for the source" in messages[3]


def test_a_first_rollout_whose_adapter_becomes_refused_unloads_its_canary_pods():
    # B is on the canary pod of a first rollout (nothing served before) when it turns out to be refused
    world = World(PODS)
    world.served[PODS[0]] = B.digest
    spec = Spec("svc", canary_replicas=1)
    status = {"phase": "Canary", "activeDigest": B.digest, "activeUri": B.uri, "currentStep": 0,
              "replicas": [{"pod": PODS[0], "digest": B.digest, "state": "Loaded"}]}  # fmt: skip
    refused = Source("refused", "EvalFailed", "exact_match min 0.9: adapter 0.2, base 0.25")
    plans = settle(observed(spec, status, refused), world)
    assert plans[-1].phase == "Refused" and plans[-1].status.get("activeDigest") is None
    assert plans[-1].converge is not None and plans[-1].converge.pods(None) == set(PODS)
    assert world.count(B) == 0, "nothing admits B any more, so no pod may serve it under servedName"
    # and once nothing is loaded, later passes leave the pods alone
    later = settle(observed(spec, dict(plans[-1].status), refused), world)
    assert later[-1].converge is None and later[-1].status["replicas"] == []
