"""spec.target.managed: the operator runs the vLLM Deployment (with the agent sidecar) and rolls out to it."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from kubelora.devenv import podrunner
from kubelora.serving import vllm as vllm_module
from tests.conftest import wait_for
from tests.rollout.adapters import BASE_MODEL
from tests.rollout.conftest import (
    API_KEY_SECRET,
    OPERATOR_NAMESPACE,
    OPERATOR_POD_LABELS,
    SERVER_PORT,
    ad_manifest,
    agent_files,
    managed_target,
    served,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_managed_server_deployment_is_created_owned_and_served(rollout_env, adapters, track):
    env, good = rollout_env, adapters["good-a"]
    env.lorajob("managed-a", good)
    target = managed_target()
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
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes["adapters"]["emptyDir"] == {"sizeLimit": "10Gi"}  # the operator config's default
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}
    assert {m["mountPath"] for m in vllm["volumeMounts"]} == {"/adapters", "/dev/shm", "/home/vllm"}
    assert agent["volumeMounts"] == [
        {"name": "adapters", "mountPath": "/adapters"},
        {"name": "preload", "mountPath": "/etc/kubelora/preload", "readOnly": True},
    ]
    assert agent["args"] == [
        *("--host", "0.0.0.0", "--port", "8001", "--dir", "/adapters"),
        *("--preload", "/etc/kubelora/preload/adapters.json", "--base-model", BASE_MODEL),
    ]
    # Preload: the agent links what the ConfigMap lists for vLLM's filesystem resolver; /ready gates the pod.
    assert volumes["preload"]["configMap"] == {"name": "managed-vllm-adapters", "optional": True, "defaultMode": 420}
    assert agent["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert {"name": "VLLM_PLUGINS", "value": "lora_filesystem_resolver"} in vllm["env"]
    assert {"name": "VLLM_LORA_RESOLVER_CACHE_DIR", "value": "/adapters"} in vllm["env"]
    secret_refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in agent["env"] if "valueFrom" in e}
    assert secret_refs == {
        "KUBELORA_AGENT_TOKEN": "managed-vllm-agent-token",
        "AWS_ACCESS_KEY_ID": "minio-creds",
        "AWS_SECRET_ACCESS_KEY": "minio-creds",
        "S3_ENDPOINT": "minio-creds",
    }
    # The agent's token: generated once, in a Secret the AdapterDeployment owns (so it goes with it).
    token_secret = env.get("secret", "managed-vllm-agent-token")
    assert token_secret is not None
    token_owner = token_secret["metadata"]["ownerReferences"][0]
    assert (token_owner["kind"], token_owner["name"], token_owner["controller"]) == (
        "AdapterDeployment",
        "managed",
        True,
    )
    token = base64.b64decode(token_secret["data"]["token"]).decode()
    assert len(token) >= 32
    # Both containers meet the restricted Pod Security Standard: the API server's own admission says so.
    restricted = f"{env.namespace}-restricted"
    env.kubectl("create", "namespace", restricted)
    try:
        env.kubectl("label", "namespace", restricted, "pod-security.kubernetes.io/enforce=restricted")
        pod_manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "managed-vllm-check"},
            "spec": pod_spec,
        }
        checked = env.kubectl(
            "apply", "--dry-run=server", "-n", restricted, "-f", "-", input=json.dumps(pod_manifest), check=False
        )
        assert checked.returncode == 0, checked.stderr
        unsafe = {**pod_manifest, "spec": {**pod_spec, "securityContext": {}}}
        unsafe["spec"]["containers"] = [{**c, "securityContext": {}} for c in pod_spec["containers"]]
        refused = env.kubectl(
            "apply", "--dry-run=server", "-n", restricted, "-f", "-", input=json.dumps(unsafe), check=False
        )
        assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr  # the check can fail
    finally:
        env.kubectl("delete", "namespace", restricted, "--wait=false", check=False)
    # The agent port admits only the operator's pods; vLLM's port (completions) anyone.
    policy = env.get("networkpolicy", "managed-vllm")
    assert policy is not None
    assert policy["metadata"]["ownerReferences"][0]["name"] == "managed"
    assert policy["spec"]["podSelector"] == {"matchLabels": {"kubelora.dev/adapterdeployment": "managed"}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    agent_rule, vllm_rule = policy["spec"]["ingress"]
    assert agent_rule == {
        "from": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE}},
                "podSelector": {"matchLabels": OPERATOR_POD_LABELS},
            }
        ],
        "ports": [{"port": 8001, "protocol": "TCP"}],
    }
    assert vllm_rule == {"ports": [{"port": SERVER_PORT, "protocol": "TCP"}]}
    # podrunner runs the pod's containers from their images (real vLLM, the agent); the rollout reaches it.
    obj = env.wait_phase(name, "Ready", loaded=1, timeout=300)
    assert obj["status"]["activeDigest"] == good.digest
    pod = next(p for n, p in env.runner.running().items() if n.startswith("managed-vllm"))
    assert served(pod)["support-managed"].endswith(good.hex)
    # The agent in the pod answers only the generated token.
    assert agent_files(pod, token) == {good.digest}
    with pytest.raises(httpx.HTTPStatusError) as refused_call:
        agent_files(pod, "not-the-token")
    assert refused_call.value.response.status_code == 401
