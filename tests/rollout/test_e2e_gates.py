"""Gates: an AdapterDeployment refuses what must not be served, and waits for what is not ready yet."""

from __future__ import annotations

import pytest

from tests.rollout.conftest import REPLICAS, ad_manifest, condition, served

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def assert_refused(env, name, reason):
    obj = env.wait_phase(name, "Refused")
    ready = condition(obj, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", reason)
    assert condition(obj, "Admitted")["reason"] == reason
    event = env.wait_event(name, reason)
    assert event["type"] == "Warning"
    assert obj["status"].get("loadedReplicas", 0) == 0
    return obj, event


def nothing_served(env, served_name):
    return all(served_name not in served(pod) for pod in env.pods().values())


def test_failed_eval_is_refused_naming_the_gate(rollout_env, adapters, track):
    env = rollout_env
    env.lorajob("gate-eval", adapters["good-a"], phase="Failed", passed=False)
    name = track(ad_manifest("gate-eval", "gate-eval", lora_job="gate-eval"))
    obj, event = assert_refused(env, name, "EvalFailed")
    for text in (obj["status"]["message"], event["message"]):
        assert "LoRAJob gate-eval failed evaluation" in text
        assert "exact_match min 0.9: adapter 0.2, base 0.25" in text, text
    assert nothing_served(env, "gate-eval")


def test_rank_above_the_servers_max_lora_rank_is_refused(rollout_env, adapters, track):
    env = rollout_env
    env.lorajob("gate-rank", adapters["rank32"])
    name = track(ad_manifest("gate-rank", "gate-rank", lora_job="gate-rank", max_rank=16))
    _, event = assert_refused(env, name, "RankTooHigh")
    assert "adapter rank 32 exceeds spec.target.maxLoraRank 16" in event["message"]
    assert nothing_served(env, "gate-rank")


def test_adapter_for_another_base_model_is_refused(rollout_env, adapters, track):
    env = rollout_env
    env.lorajob("gate-base", adapters["other-base"])
    name = track(ad_manifest("gate-base", "gate-base", lora_job="gate-base"))
    _, event = assert_refused(env, name, "BaseModelMismatch")
    assert "'someone/other-model'" in event["message"] and "'kubelora/tiny-llama'" in event["message"]
    assert nothing_served(env, "gate-base")


def test_pinned_digest_that_does_not_match_the_manifest_is_refused(rollout_env, adapters, track):
    env = rollout_env
    manifest = ad_manifest("gate-digest", "gate-digest", adapter=adapters["good-a"], require_eval=False)
    manifest["spec"]["adapter"]["digest"] = adapters["good-b"].digest
    name = track(manifest)
    _, event = assert_refused(env, name, "DigestMismatch")
    # The pinned digest is named; the manifest's actual digest is not (no digest probing).
    assert adapters["good-b"].digest in event["message"] and adapters["good-a"].digest not in event["message"]


def test_waits_for_a_training_lorajob_then_rolls_out(rollout_env, adapters, track):
    env, good = rollout_env, adapters["good-b"]
    env.lorajob("gate-wait", good, phase="Training")
    name = track(ad_manifest("gate-wait", "gate-wait", lora_job="gate-wait", strategy="AllAtOnce"))
    obj = env.wait_phase(name, "Pending")
    assert condition(obj, "Ready")["reason"] == "LoRAJobNotSucceeded"
    assert "phase Training" in obj["status"]["message"]
    assert not [e for e in env.events(name) if e["type"] == "Warning"]
    env.set_lorajob_status("gate-wait", good, phase="Succeeded")
    obj = env.wait_phase(name, "Ready", loaded=REPLICAS)
    assert obj["status"]["activeDigest"] == good.digest
