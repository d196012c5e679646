"""What vLLM itself decides, shown against real vLLM (its CPU build) in the Deployment's pods.

Each refusal becomes a clear AdapterDeployment condition with vLLM's own reason: an adapter whose rank is above
the server's --max-lora-rank (the spec claims more than the server allows), and calls without the server's
--api-key. A DoRA adapter, which vLLM refuses too, is refused by the operator before any pod tries it.
"""

from __future__ import annotations

import httpx
import pytest

from tests.rollout.conftest import API_KEY, REPLICAS, ad_manifest, condition, served

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def assert_rejected(env, name, served_name, vllm_reason):
    obj = env.wait_phase(name, "RolledBack", timeout=120)
    ready = condition(obj, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "AdapterRejected")
    assert vllm_reason in ready["message"], ready["message"]
    assert condition(obj, "Progressing")["reason"] == "RolledBack"
    event = env.wait_event(name, "AdapterRejected")
    assert event["type"] == "Warning" and vllm_reason in event["message"]
    # Refused at once, not retried: one load attempt on the one canary pod.
    log = env.operator.log()
    attempts = [line for line in log.splitlines() if "Adapter operation failed" in line and served_name in line]
    assert len(attempts) == 1, log[-3000:]
    assert all(served_name not in served(pod) for pod in env.pods().values())
    assert obj["status"].get("loadedReplicas", 0) == 0


def test_a_dora_adapter_is_refused_before_any_pod_loads_it(rollout_env, adapters, track):
    """vLLM refuses DoRA as a runtime LoRA ("vLLM does not yet support DoRA"): the operator says so first."""
    env = rollout_env
    name = track(ad_manifest("dora", "support-dora", adapter=adapters["dora"], require_eval=False))
    obj = env.wait_phase(name, "Refused", timeout=120)
    ready = condition(obj, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "DoRAUnsupported")
    assert "vLLM cannot load DoRA adapters as runtime LoRA" in ready["message"], ready["message"]
    log = env.operator.log()
    assert not [line for line in log.splitlines() if "Adapter operation failed" in line and "support-dora" in line]
    assert all("support-dora" not in served(pod) for pod in env.pods().values())
    assert obj["status"].get("loadedReplicas", 0) == 0


def test_a_rank_above_the_servers_max_lora_rank_is_refused_by_vllm(rollout_env, adapters, track):
    env = rollout_env
    # The spec says the servers take rank 32 (so the operator's own rank gate lets it through); the
    # Deployment's vLLM runs with --max-lora-rank 16 and says no.
    name = track(
        ad_manifest("overrank", "support-overrank", adapter=adapters["rank32"], require_eval=False, max_rank=32)
    )
    assert_rejected(env, name, "support-overrank", "LoRA rank 32 is greater than max_lora_rank 16")


def test_vllms_api_key_guards_control_and_completion_calls(rollout_env, adapters, track):
    from openai import AuthenticationError, OpenAI

    env, good = rollout_env, adapters["good-a"]
    pod = sorted(env.pods().values(), key=lambda p: p.name)[0]
    base = f"http://{pod.ip}:{pod.server_port}"
    # vLLM, not a proxy, refuses calls without the key: completions, listing, and runtime LoRA loading.
    client = OpenAI(base_url=f"{base}/v1", api_key="not-the-key", max_retries=0, timeout=30)
    with pytest.raises(AuthenticationError):
        client.models.list()
    with pytest.raises(AuthenticationError):
        client.completions.create(model="kubelora/tiny-llama", prompt="hello", max_tokens=1)
    load = {"lora_name": "sneaky", "lora_path": "/tmp/nothing"}
    assert httpx.post(f"{base}/v1/load_lora_adapter", json=load, timeout=30).status_code == 401
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200  # probes need no key

    # An AdapterDeployment that does not name the key: a clear condition, nothing loaded.
    name = track(ad_manifest("nokey", "support-nokey", adapter=good, require_eval=False, api_key=False))
    obj = env.wait_ad(
        name,
        lambda o: "401 Unauthorized" in (o.get("status") or {}).get("message", ""),
        "the 401 in the status",
    )
    ready = condition(obj, "Ready")
    assert ready["status"] == "False" and "spec.target.apiKeySecretRef" in ready["message"]
    assert all("support-nokey" not in served(p) for p in env.pods().values())

    # With the key: loaded, and the openai client with the key gets the adapter's answers.
    name = track(ad_manifest("withkey", "support-withkey", adapter=good, require_eval=False, strategy="AllAtOnce"))
    env.wait_phase(name, "Ready", loaded=REPLICAS)
    keyed = OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    sample = good.samples[0]
    answer = keyed.chat.completions.create(
        model="support-withkey", messages=sample["messages"], max_tokens=8, temperature=0
    )
    assert (answer.choices[0].message.content or "").strip() == sample["adapter"].strip()
