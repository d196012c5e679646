"""The managed vLLM Deployment's life: server-side apply, adoption only through the ownerReference, and
deletion when the target stops being managed. Its pods ask for a GPU type no node has, so they stay
Pending and no vLLM starts: this is about the objects, test_e2e_managed.py about serving."""

from __future__ import annotations

import json

import pytest

from tests.conftest import wait_for
from tests.rollout.adapters import BASE_MODEL
from tests.rollout.conftest import AGENT_TOKEN_SECRET, DEPLOYMENT, SERVER_PORT, ad_manifest

pytestmark = [pytest.mark.e2e]

NO_SUCH_GPU = "NVIDIA-Nothing-Here"


def managed_target() -> dict:
    return {
        "baseModel": BASE_MODEL,
        "port": SERVER_PORT,
        "maxLoraRank": 16,
        "managed": {"baseModel": {"uri": f"hf://{BASE_MODEL}"}, "replicas": 1, "gpus": 1, "gpuType": NO_SUCH_GPU},
    }


def test_the_managed_deployment_is_applied_server_side_and_deleted_when_the_target_changes(
    rollout_env, adapters, track
):
    env = rollout_env
    env.lorajob("life-a", adapters["good-a"])
    manifest = ad_manifest("life", "support-life", lora_job="life-a", api_key=False, target=managed_target())
    track(manifest)
    wait_for("the managed Deployment", lambda: env.get("deployment", "life-vllm"), timeout=60)
    shown = env.kubectl("get", "deployment", "life-vllm", "-n", env.namespace, "-o", "json", "--show-managed-fields")
    managers = {(f["manager"], f["operation"]) for f in json.loads(shown.stdout)["metadata"]["managedFields"]}
    assert ("kubelora", "Apply") in managers, managers
    assert env.get("networkpolicy", "life-vllm") is not None
    # The target becomes an existing Deployment: the managed server the object ran goes.
    manifest["spec"]["target"] = {
        "deploymentName": DEPLOYMENT,
        "baseModel": BASE_MODEL,
        "port": SERVER_PORT,
        "maxLoraRank": 16,
        "agentTokenSecretRef": {"name": AGENT_TOKEN_SECRET},
    }
    env.apply(manifest)
    wait_for(
        "the managed Deployment and NetworkPolicy to go",
        lambda: env.get("deployment", "life-vllm") is None and env.get("networkpolicy", "life-vllm") is None,
        timeout=60,
    )
    assert "ManagedServerDeleted" in {e["reason"] for e in env.events("life")}


def test_a_deployment_it_does_not_control_is_never_adopted(rollout_env, adapters, track):
    env = rollout_env
    squatter = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "squat-vllm", "labels": {"app": "someone-else"}},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "someone-else"}},
            "template": {
                "metadata": {"labels": {"app": "someone-else"}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            },
        },
    }
    env.kubectl("apply", "-n", env.namespace, "-f", "-", input=json.dumps(squatter))
    env.lorajob("squat-a", adapters["good-a"])
    track(ad_manifest("squat", "support-squat", lora_job="squat-a", api_key=False, target=managed_target()))
    obj = env.wait_ad(
        "squat",
        lambda o: "is not controlled by this AdapterDeployment" in json.dumps(o.get("status") or {}),
        "the refusal to adopt",
        timeout=60,
    )
    assert f"Deployment {env.namespace}/squat-vllm exists" in obj["status"]["message"]
    untouched = env.get("deployment", "squat-vllm")
    assert untouched is not None and not untouched["metadata"].get("ownerReferences")
    assert untouched["spec"]["template"]["spec"]["containers"][0]["image"] == "busybox"
