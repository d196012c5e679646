"""spec.target.managed: the operator runs the vLLM Deployment (with the agent sidecar) and rolls out to it."""

from __future__ import annotations

import pytest

from kubelora.devenv import podrunner
from kubelora.serving import vllm as vllm_module
from tests.conftest import wait_for
from tests.rollout.adapters import BASE_MODEL
from tests.rollout.conftest import API_KEY_SECRET, SERVER_PORT, ad_manifest, served

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_managed_server_deployment_is_created_owned_and_served(rollout_env, adapters, track):
    env, good = rollout_env, adapters["good-a"]
    env.lorajob("managed-a", good)
    target = {
        "baseModel": BASE_MODEL,
        "port": SERVER_PORT,
        "maxLoras": 2,
        "maxLoraRank": 16,
        "apiKeySecretRef": {"name": API_KEY_SECRET},
        "managed": {
            "baseModel": {"uri": f"hf://{BASE_MODEL}", "revision": "main"},
            "args": list(vllm_module.CPU_ARGS),
            "replicas": 1,
            "gpus": 1,
            "gpuType": podrunner.SERVING_POOL.product,
        },
    }
    name = track(ad_manifest("managed", "support-managed", lora_job="managed-a", canary=1, smoke=2, target=target))
    deployment = wait_for("the managed Deployment", lambda: env.get("deployment", "managed-vllm"), timeout=60)
    owner = deployment["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("AdapterDeployment", "managed", True)
    pod_spec = deployment["spec"]["template"]["spec"]
    vllm, agent = pod_spec["containers"]
    assert (vllm["name"], agent["name"]) == ("vllm", "kubelora-agent")
    # No image in the spec: the operator's configured vllmImage (the chart's is vllm/vllm-openai:v<pinned>).
    assert vllm["image"] == env.images["vllm-cpu"]
    args = vllm["args"]
    assert args[: args.index("--served-model-name")] == ["--model", BASE_MODEL, "--revision", "main"]
    assert "--enable-lora" in args
    assert args[args.index("--served-model-name") + 1] == BASE_MODEL and args[args.index("--port") + 1] == "8000"
    assert args[args.index("--max-loras") + 1] == "2" and args[args.index("--max-lora-rank") + 1] == "16"
    assert args[args.index("--max-cpu-loras") + 1] == "4"
    assert args[-len(vllm_module.CPU_ARGS) :] == list(vllm_module.CPU_ARGS)  # spec.target.managed.args, last
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in vllm["env"]
    api_key_env = {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": API_KEY_SECRET, "key": "apiKey"}}}
    assert api_key_env in vllm["env"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert vllm[probe]["httpGet"] == {"path": "/health", "port": SERVER_PORT, "scheme": "HTTP"}
    assert pod_spec["nodeSelector"] == {"nvidia.com/gpu.product": podrunner.SERVING_POOL.product}
    assert {"name": "adapters", "emptyDir": {}} in pod_spec["volumes"]
    assert {m["mountPath"] for m in vllm["volumeMounts"]} == {"/adapters"}
    assert agent["volumeMounts"] == [{"name": "adapters", "mountPath": "/adapters"}]
    assert agent["args"] == ["--host", "0.0.0.0", "--port", "8001", "--dir", "/adapters"]
    secret_refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in agent["env"] if "valueFrom" in e}
    assert secret_refs == {
        "AWS_ACCESS_KEY_ID": "minio-creds",
        "AWS_SECRET_ACCESS_KEY": "minio-creds",
        "S3_ENDPOINT": "minio-creds",
    }
    # podrunner runs the pod's containers from their images (real vLLM, the agent); the rollout reaches it.
    obj = env.wait_phase(name, "Ready", loaded=1, timeout=300)
    assert obj["status"]["activeDigest"] == good.digest
    pod = next(p for n, p in env.runner.running().items() if n.startswith("managed-vllm"))
    assert served(pod)["support-managed"].endswith(good.hex)
