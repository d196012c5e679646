"""Rollouts against real vLLM behind kwok pods: canary, rollback, GitOps swaps, drift repair, delete."""

from __future__ import annotations

import time

import pytest

from tests.conftest import wait_for
from tests.rollout.adapters import MAX_NEW_TOKENS
from tests.rollout.conftest import API_KEY, REPLICAS, StatusRecorder, ad_manifest, agent_files, condition, served

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def serves(env, served_name, digest):
    """True when every pod of the Deployment serves ``digest`` under ``served_name``."""
    pods = env.pods()
    assert len(pods) == REPLICAS
    return all(served(pod).get(served_name, "").endswith(digest.split(":", 1)[1]) for pod in pods.values())


def answers(pod, served_name, adapter):
    """What the pod answers to the adapter's eval prompts, through the openai client."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{pod.ip}:{pod.server_port}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    out = []
    for sample in adapter.samples:
        response = client.chat.completions.create(
            model=served_name, messages=sample["messages"], max_tokens=MAX_NEW_TOKENS, temperature=0
        )
        out.append((response.choices[0].message.content or "").strip())
    return out


def expected(adapter):
    return [s["adapter"].strip() for s in adapter.samples]


def test_canary_rollout_to_three_replicas_then_openai_client(rollout_env, adapters, api_client, track):
    env, good = rollout_env, adapters["good-a"]
    env.lorajob("canary-a", good)
    with StatusRecorder(api_client, env.namespace, "canary") as recorder:
        track(ad_manifest("canary", "support-canary", lora_job="canary-a", canary=1, smoke=3))
        obj = env.wait_phase("canary", "Ready", loaded=REPLICAS)
    status = obj["status"]
    assert status["activeDigest"] == good.digest
    assert "previousDigest" not in status
    assert status["loaded"] == f"{REPLICAS}/{REPLICAS}"
    assert sorted(r["state"] for r in status["replicas"]) == ["Loaded"] * REPLICAS
    assert {r["digest"] for r in status["replicas"]} == {good.digest}
    assert condition(obj, "Ready")["status"] == "True"
    assert condition(obj, "Admitted")["reason"] == "GatesPassed"
    # The status went through the canary: one pod loaded, smoke-tested, then promoted to all three.
    phases = recorder.phases()
    assert phases[phases.index("Canary") :] == ["Canary", "Promoting", "Ready"], recorder.seen
    canary = [s for s in recorder.seen if s["phase"] == "Canary" and s["loadedReplicas"]]
    assert canary and canary[-1]["loadedReplicas"] == 1 and canary[-1]["desiredReplicas"] == REPLICAS, recorder.seen
    reasons = [e["reason"] for e in env.events("canary")]
    assert {"RolloutStarted", "CanaryPassed", "RolloutComplete"} <= set(reasons), reasons
    passed = env.wait_event("canary", "CanaryPassed")
    assert "3/3 answers matched" in passed["message"]
    assert serves(env, "support-canary", good.digest)
    # Clients use the OpenAI API with model=servedName and get the adapter's answers from every replica.
    for pod in env.pods().values():
        assert answers(pod, "support-canary", good) == expected(good), pod.name


def test_failed_smoke_check_rolls_back_and_old_adapter_keeps_serving(rollout_env, adapters, api_client, track):
    env, good, bad = rollout_env, adapters["good-a"], adapters["bad-samples"]
    env.lorajob("rb-good", good)
    env.lorajob("rb-bad", bad)
    name = track(ad_manifest("rollback", "support-rb", lora_job="rb-good", smoke=3, min_match=0.8))
    env.wait_phase(name, "Ready", loaded=REPLICAS)
    with StatusRecorder(api_client, env.namespace, name) as recorder:
        env.apply(ad_manifest("rollback", "support-rb", lora_job="rb-bad", smoke=3, min_match=0.8))
        obj = env.wait_phase(name, "RolledBack", loaded=REPLICAS)
    status = obj["status"]
    assert status["activeDigest"] == good.digest
    assert status["previousDigest"] == bad.digest
    assert "Canary" in recorder.phases(), recorder.seen
    event = env.wait_event(name, "SmokeCheckFailed")
    assert event["type"] == "Warning"
    assert "0/3 answers matched" in event["message"] and "rolled back to" in event["message"], event["message"]
    assert condition(obj, "Ready")["reason"] == "SmokeCheckFailed"
    assert condition(obj, "Progressing")["reason"] == "RolledBack"
    # The old adapter serves everywhere, and answers as it did.
    wait_for("good-a on every pod", lambda: serves(env, "support-rb", good.digest), timeout=30)
    for pod in env.pods().values():
        assert answers(pod, "support-rb", good) == expected(good), pod.name
    # The rejected adapter is not tried again for the same spec (the phase stays put over several resyncs).
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert env.ad(name)["status"]["phase"] == "RolledBack"
        time.sleep(0.5)
    assert [e["reason"] for e in env.events(name)].count("RolloutStarted") == 2


def test_gitops_update_swaps_active_and_previous_digests(rollout_env, adapters, track):
    env, first, second = rollout_env, adapters["good-a"], adapters["good-b"]
    # Pinned by URI and digest, as a GitOps repository would; AllAtOnce.
    manifest = ad_manifest("gitops", "support-gitops", adapter=first, strategy="AllAtOnce", require_eval=False)
    name = track(manifest)
    obj = env.wait_phase(name, "Ready", loaded=REPLICAS)
    assert obj["status"]["activeDigest"] == first.digest
    env.apply(ad_manifest("gitops", "support-gitops", adapter=second, strategy="AllAtOnce", require_eval=False))
    obj = env.wait_ad(
        name,
        lambda o: o.get("status", {}).get("activeDigest") == second.digest and o["status"].get("phase") == "Ready",
        "the second adapter to be active",
    )
    status = obj["status"]
    assert status["previousDigest"] == first.digest
    assert status["previousUri"] == first.uri and status["activeUri"] == second.uri
    assert status["loadedReplicas"] == REPLICAS
    assert serves(env, "support-gitops", second.digest)
    pod = sorted(env.pods().values(), key=lambda p: p.name)[0]
    assert answers(pod, "support-gitops", second) == expected(second)


def test_restarted_pod_gets_its_adapter_back(rollout_env, adapters, track):
    env, good = rollout_env, adapters["good-b"]
    name = track(ad_manifest("drift", "support-drift", adapter=good, strategy="AllAtOnce", require_eval=False))
    env.wait_phase(name, "Ready", loaded=REPLICAS)
    victim = sorted(env.pods())[1]
    loads_before = env.operator.log().count(f"Loaded adapter pod={victim} ")
    env.runner.restart(victim)  # a container restart: the API hears nothing about it
    wait_for("the restarted vLLM container", lambda: env.runner.healthy(victim), timeout=180)
    pod = env.pods()[victim]
    wait_for(
        "the adapter back on the restarted pod",
        lambda: served(pod).get("support-drift", "").endswith(good.hex),
        timeout=60,
    )
    # The operator put it back (its log line is written after vLLM lists the adapter, so wait for it)
    wait_for(
        "the operator's reload of the restarted pod",
        lambda: env.operator.log().count(f"Loaded adapter pod={victim} ") > loads_before,
        timeout=30,
    )
    env.wait_phase(name, "Ready", loaded=REPLICAS)
    assert answers(pod, "support-drift", good) == expected(good)


def test_delete_unloads_everywhere(rollout_env, adapters, track):
    env, good = rollout_env, adapters["good-a"]
    name = track(ad_manifest("bye", "support-bye", adapter=good, strategy="AllAtOnce", require_eval=False))
    env.wait_phase(name, "Ready", loaded=REPLICAS)
    assert serves(env, "support-bye", good.digest)
    env.kubectl("delete", "adapterdeployment", name, "-n", env.namespace, "--timeout=60s")
    assert env.get("adapterdeployment", name) is None
    for pod in env.pods().values():
        models = served(pod)
        assert "support-bye" not in models, pod.name
        # The files go too, unless another served adapter still uses them.
        if not any(root.endswith(good.hex) for root in models.values()):
            assert good.digest not in agent_files(pod)
    assert env.wait_event(name, "Unloaded")["message"] == f"Unloaded support-bye from {REPLICAS} pods"


def test_a_three_step_canary_bakes_on_real_pods_then_promotes(rollout_env, adapters, api_client, track):
    """1 pod (smoke-checked), then 50% (2 of 3, rounded up), then all; each step holds its bake time."""
    env, good = rollout_env, adapters["good-b"]
    env.lorajob("steps-b", good)
    manifest = ad_manifest("steps", "support-steps", lora_job="steps-b", smoke=2)
    manifest["spec"]["rollout"]["steps"] = [{"replicas": 1, "bakeSeconds": 3}, {"percent": 50, "bakeSeconds": 3}]
    with StatusRecorder(api_client, env.namespace, "steps") as recorder:
        track(manifest)
        obj = env.wait_phase("steps", "Ready", loaded=REPLICAS, timeout=180)
    assert obj["status"]["activeDigest"] == good.digest and "currentStep" not in obj["status"]
    baking = [s for s in recorder.seen if s["phase"] == "Canary" and "baking" in (s.get("message") or "")]
    steps_seen = sorted({(s.get("currentStep"), s["loadedReplicas"]) for s in baking})
    assert steps_seen == [(0, 1), (1, 2)], recorder.seen  # each step baked with its own pod count
    phases = recorder.phases()
    assert phases[phases.index("Canary") :] == ["Canary", "Promoting", "Ready"], recorder.seen
    assert [e["reason"] for e in env.events("steps")].count("RolloutStep") == 1
    assert serves(env, "support-steps", good.digest)


def test_a_second_adapterdeployment_for_the_same_served_name_gets_a_conflict(rollout_env, adapters, track):
    env, first, second = rollout_env, adapters["good-a"], adapters["good-b"]
    env.lorajob("owner-a", first)
    env.lorajob("intruder-b", second)
    track(ad_manifest("owner", "support-shared", lora_job="owner-a", strategy="AllAtOnce", smoke=0))
    env.wait_phase("owner", "Ready", loaded=REPLICAS)
    track(ad_manifest("intruder", "support-shared", lora_job="intruder-b", strategy="AllAtOnce", smoke=0))
    obj = env.wait_ad("intruder", lambda o: o.get("status", {}).get("phase") == "Refused", "the Conflict")
    conflict = condition(obj, "Conflict")
    assert conflict["status"] == "True" and conflict["reason"] == "ServedNameInUse"
    assert "AdapterDeployment owner (older) already serves support-shared" in conflict["message"]
    assert condition(obj, "Ready")["reason"] == "ServedNameConflict"
    assert env.wait_event("intruder", "Conflict")["type"] == "Warning"
    assert serves(env, "support-shared", first.digest)  # the owner's adapter, not swapped
    env.kubectl("delete", "adapterdeployment", "owner", "-n", env.namespace, "--timeout=60s")
    obj = env.wait_phase("intruder", "Ready", loaded=REPLICAS, timeout=120)
    assert condition(obj, "Conflict")["status"] == "False"
    assert serves(env, "support-shared", second.digest)
