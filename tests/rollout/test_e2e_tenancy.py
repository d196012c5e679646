"""Tenant B against tenant A: every way B could read, serve, probe or drive A's adapters is refused, and
B's status says nothing of A's.

Tenant A is the rollout environment's namespace: its vLLM pods (real vLLM with ``--api-key``, and agents
with their token), and its adapters in the adapter bucket, published by the trainer's publish step. Tenant
B is a second namespace that the same operator watches, with its own MinIO user whose policy reaches only
B's bucket, as a platform team sets up tenants. B's AdapterDeployments say their target's base model is
``team-b/model``: an operator that read A's manifest would answer ``BaseModelMismatch`` and name A's base
model, so "nothing disclosed" is a claim these tests can see fail.

The LoRAJob side (a Job named or labelled like A's is never adopted) is in tests/operator/test_e2e_tenancy.py.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for
from tests.rollout.adapters import Published
from tests.rollout.conftest import AGENT_TOKEN, API_KEY, GROUP, VERSION, RolloutEnv, agent_files, served

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

B_BASE_MODEL = "team-b/model"
B_SECRET = "team-b-s3"
B_AGENT_TOKEN = "team-b-agent-token"


@pytest.fixture(scope="module")
def tenant_b(rollout_env: RolloutEnv, minio_client: Any) -> Iterator[dict[str, str]]:
    """B's namespace with B's S3 Secret (a MinIO user limited to B's bucket) and B's agent token Secret."""
    from minio import MinioAdmin
    from minio.credentials import StaticProvider

    env = rollout_env
    devenv = env.devenv
    admin = MinioAdmin(
        endpoint=devenv.minio_endpoint,
        credentials=StaticProvider(devenv.minio_access_key, devenv.minio_secret_key),
        secure=False,
    )
    suffix = uuid.uuid4().hex[:8]
    bucket, user, policy = f"team-b-{suffix}", f"team-b-{suffix}", f"team-b-only-{suffix}"
    password = secrets.token_urlsafe(24)
    minio_client.make_bucket(bucket)
    admin.policy_add(
        policy,
        policy={
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["s3:*"],
                    "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                }
            ],
        },
    )
    admin.user_add(user, password)
    admin.attach_policy([policy], user=user)
    kubectl = env.kubectl
    kubectl(
        "create", "secret", "generic", B_SECRET, "-n", env.tenant_b,
        f"--from-literal=accessKey={user}", f"--from-literal=secretKey={password}",
        f"--from-literal=endpoint={devenv.minio_endpoint}",
    )  # fmt: skip
    kubectl(
        "create", "secret", "generic", B_AGENT_TOKEN, "-n", env.tenant_b,
        f"--from-literal=token={secrets.token_urlsafe(32)}",
    )  # fmt: skip
    try:
        yield {"bucket": bucket, "user": user}
    finally:
        kubectl("delete", "adapterdeployments,lorajobs", "--all", "-n", env.tenant_b, "--timeout=60s", check=False)
        admin.user_remove(user)
        admin.policy_remove(policy)
        for item in minio_client.list_objects(bucket, recursive=True):
            minio_client.remove_object(bucket, item.object_name)
        minio_client.remove_bucket(bucket)


def b_adapterdeployment(
    name: str, adapter: dict[str, Any], selector: dict[str, str] | None = None, base_model: str = B_BASE_MODEL
) -> dict[str, Any]:
    """B's AdapterDeployment; by default it targets pods labelled like A's (which live in A's namespace)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AdapterDeployment",
        "metadata": {"name": name},
        "spec": {
            "adapter": adapter,
            "servedName": f"b-{name}",
            "target": {
                "selector": selector or {"app": "vllm-tiny"},
                "baseModel": base_model,
                "agentTokenSecretRef": {"name": B_AGENT_TOKEN},
            },
            "gatePolicy": {"requireEvalPassed": False},
        },
    }


def apply_b(env: RolloutEnv, manifest: dict[str, Any], check: bool = True) -> Any:
    return env.kubectl("apply", "-n", env.tenant_b, "-f", "-", input=json.dumps(manifest), check=check)


def b_status(env: RolloutEnv, name: str, reason: str) -> dict[str, Any]:
    """B's AdapterDeployment once its Admitted condition has ``reason``."""

    def reached() -> dict[str, Any] | None:
        got = env.kubectl("get", "adapterdeployment", name, "-n", env.tenant_b, "-o", "json", check=False)
        if got.returncode != 0:
            return None
        obj = json.loads(got.stdout)
        admitted = next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Admitted"), None)
        return obj if admitted and admitted["reason"] == reason else None

    return dict(wait_for(f"{name}: Admitted {reason}", reached, timeout=60))


def assert_nothing_of_a(obj: dict[str, Any], a: Published) -> None:
    status = obj["status"]
    text = json.dumps(status)
    # Neither A's base model (only readable from A's manifest) nor anything served or loaded.
    assert a.base_model not in text and "BaseModelMismatch" not in text and "RankTooHigh" not in text, text
    assert "activeDigest" not in status and not status.get("loadedReplicas"), status
    assert obj["status"]["phase"] in ("Pending", "Refused")


def test_an_adapterdeployment_at_a_prefix_with_no_secret_is_refused(rollout_env, adapters, tenant_b):
    env, a = rollout_env, adapters["good-a"]
    apply_b(env, b_adapterdeployment("no-secret", {"uri": a.uri, "digest": a.digest}))
    obj = b_status(env, "no-secret", "AccessDenied")
    # No Secret: an anonymous read, never the operator's own keys.
    assert "access denied to an anonymous read (no Secret named)" in obj["status"]["message"]
    assert_nothing_of_a(obj, a)


def test_an_adapterdeployment_at_a_prefix_with_b_own_secret_is_refused(rollout_env, adapters, tenant_b):
    env, a = rollout_env, adapters["good-a"]
    apply_b(env, b_adapterdeployment("own-secret", {"uri": a.uri, "digest": a.digest, "secretRef": {"name": B_SECRET}}))
    obj = b_status(env, "own-secret", "AccessDenied")
    assert "access denied to these credentials" in obj["status"]["message"]
    assert_nothing_of_a(obj, a)


def test_digest_probing_learns_nothing(rollout_env, adapters, tenant_b):
    """A's real digest and a made-up one get the same answer: B cannot tell which one A published."""
    env, a = rollout_env, adapters["good-a"]
    guess = "sha256:" + secrets.token_hex(32)
    for name, digest in (("probe-right", a.digest), ("probe-wrong", guess)):
        apply_b(env, b_adapterdeployment(name, {"uri": a.uri, "digest": digest, "secretRef": {"name": B_SECRET}}))
    right, wrong = b_status(env, "probe-right", "AccessDenied"), b_status(env, "probe-wrong", "AccessDenied")
    assert right["status"]["message"] == wrong["status"]["message"]
    for obj in (right, wrong):
        assert_nothing_of_a(obj, a)
    # Nor does an output URI reach into A's content-addressed directories.
    output = a.uri.split("/sha256/")[0] + "/"
    apply_b(
        env, b_adapterdeployment("probe-output", {"uri": output, "digest": a.digest, "secretRef": {"name": B_SECRET}})
    )
    assert_nothing_of_a(b_status(env, "probe-output", "AccessDenied"), a)


@pytest.mark.parametrize("uri", ["file:///var/run/secrets/kubernetes.io/serviceaccount/", "pvc://models/team-a/"])
def test_file_and_pvc_uris_are_refused_by_the_api_server(rollout_env, adapters, tenant_b, uri):
    env, a = rollout_env, adapters["good-a"]
    refused = apply_b(env, b_adapterdeployment("paths", {"uri": uri, "digest": a.digest}), check=False)
    assert refused.returncode != 0 and "spec.adapter.uri" in refused.stderr, refused.stderr


def test_a_lorajob_whose_status_points_elsewhere_is_refused(rollout_env, adapters, tenant_b):
    """A LoRAJob's status comes from its trainer's report, which B controls: it cannot point B's rollout at a
    path on a pod, or at A's prefix outside B's own spec.output.uri."""
    env, a = rollout_env, adapters["good-a"]
    kubectl = env.kubectl
    for name, adapter_uri, reason in (
        ("b-job-file", "file:///var/run/secrets/kubernetes.io/serviceaccount/", "UnsupportedURI"),
        ("b-job-a-prefix", a.uri, "AdapterOutsideOutput"),
    ):
        job = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "LoRAJob",
            "metadata": {"name": name},
            "spec": {
                "baseModel": {"uri": f"s3://{tenant_b['bucket']}/base/", "secretRef": {"name": B_SECRET}},
                "dataset": {"train": f"s3://{tenant_b['bucket']}/data/train.jsonl"},
                "training": {"maxSteps": 1},
                "output": {"uri": f"s3://{tenant_b['bucket']}/adapters/{name}/", "secretRef": {"name": B_SECRET}},
            },
        }
        apply_b(env, job)
        generation = json.loads(kubectl("get", "lorajob", name, "-n", env.tenant_b, "-o", "json").stdout)["metadata"][
            "generation"
        ]
        status = {
            "phase": "Succeeded",
            "observedGeneration": generation,
            "adapter": {**a.status_adapter(), "uri": adapter_uri},
        }
        kubectl(
            "patch", "lorajob", name, "-n", env.tenant_b, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}),
        )  # fmt: skip
        apply_b(env, b_adapterdeployment(name, {"loraJob": name}))
        obj = b_status(env, name, reason)
        assert obj["status"]["phase"] == "Refused"
        assert_nothing_of_a(obj, a)


def test_agent_and_vllm_control_calls_without_the_token_are_refused(rollout_env, adapters, tenant_b):
    """Straight to A's pods, as anything in the cluster network could: the agent wants its token, vLLM its key."""
    env, a = rollout_env, adapters["good-b"]
    pod = next(iter(env.pods().values()))
    before = agent_files(pod)
    agent = f"http://{pod.ip}:{pod.agent_port}"
    for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": f"Bearer {API_KEY}"}):
        fetch = httpx.post(f"{agent}/v1/adapters", json={"uri": a.uri, "digest": a.digest}, headers=headers, timeout=10)
        assert fetch.status_code == 401, fetch.text
        for method, path in (("GET", "/v1/adapters"), ("DELETE", f"/v1/adapters/{'0' * 64}")):
            assert httpx.request(method, f"{agent}{path}", headers=headers, timeout=10).status_code == 401
    assert agent_files(pod) == before  # nothing was fetched
    server = f"http://{pod.ip}:{pod.server_port}"
    for headers in ({}, {"Authorization": f"Bearer {AGENT_TOKEN}"}):
        load = httpx.post(
            f"{server}/v1/load_lora_adapter",
            json={"lora_name": "intruder", "lora_path": "/tmp"},
            headers=headers,
            timeout=10,
        )
        assert load.status_code == 401, load.text
        unload = httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "x"}, headers=headers, timeout=10)
        assert unload.status_code == 401
    assert "intruder" not in served(pod)


def test_b_cannot_target_a_pods(rollout_env, adapters, tenant_b, minio_client):
    """B's own copy of an adapter, readable with B's keys, and a selector matching A's pod labels: it finds no
    pods, because an AdapterDeployment's target is in its own namespace."""
    from minio.commonconfig import CopySource

    env, a = rollout_env, adapters["good-a"]
    source_bucket, _, source_prefix = a.uri.removeprefix("s3://").partition("/")
    for item in minio_client.list_objects(source_bucket, prefix=source_prefix, recursive=True):
        key = "adapters/copy/" + item.object_name[len(source_prefix) :]
        minio_client.copy_object(tenant_b["bucket"], key, CopySource(source_bucket, item.object_name))
    manifest = {"uri": f"s3://{tenant_b['bucket']}/adapters/copy/", "digest": a.digest, "secretRef": {"name": B_SECRET}}
    apply_b(env, b_adapterdeployment("a-pods", manifest, base_model=a.base_model))
    b_status(env, "a-pods", "GatesPassed")  # B may read its own copy

    def no_pods() -> dict[str, Any] | None:
        obj = json.loads(env.kubectl("get", "adapterdeployment", "a-pods", "-n", env.tenant_b, "-o", "json").stdout)
        ready = next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"), None)
        return obj if ready and ready["reason"] == "NoReadyPods" else None

    obj = wait_for("B's Ready condition NoReadyPods", no_pods, timeout=60)
    assert not obj["status"].get("loadedReplicas"), obj["status"]
    for pod in env.pods().values():
        assert "b-a-pods" not in served(pod)
