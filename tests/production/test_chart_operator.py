"""`helm install` as a platform team runs it: the operator pod from the operator image, under the chart's
own ServiceAccount and RBAC, takes a LoRAJob to Succeeded and an AdapterDeployment to Ready; the
self-service API (api.enabled) runs from the same image under its own ServiceAccount and takes an upload
from the openai client with a tenant's Kubernetes token.

Any permission the chart lacks shows up here as a stuck object or a 403 in the operator's log; the
exact rule set is asserted in tests/helm/test_chart.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from kubelora import demo
from kubelora.devenv import podrunner
from kubelora.operator import peering
from kubelora.trainer import tiny
from tests.conftest import wait_for
from tests.helm.conftest import CHART, run_helm, set_args, unique_release
from tests.operator.harness import create_s3_secret, free_port, get, wait_phase
from tests.production.test_job_path import lorajob, upload
from tests.selfservice.conftest import CHAT_ROW, STORAGE_SECRET, TENANT_RULES, jsonl, token

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.trainer]


# kopf's peering CRDs come from the chart (crds.enabled is off here: the kubelora CRDs are the suite's own),
# so this test does not depend on tests/helm having run first.
@pytest.mark.usefixtures("chart_crds_in_cluster")
def test_chart_operator_from_its_image_trains_and_serves(
    devenv, kubectl, namespace, other_namespace, images, crds, minio_client, bucket, tmp_path
):
    tenant = other_namespace
    release = unique_release()
    fullname = f"{release}-kubelora"
    values: dict[str, Any] = {
        "crds": {"enabled": False},
        "watchNamespaces": [tenant],
        "config": {"progressIntervalSeconds": 1},
        # The pod shares the host's network here, so it gets ports nothing else holds.
        "ports": {"metrics": free_port(), "health": free_port()},
        # kwok gives pods on the serving pool loopback addresses, which the kubelet can probe.
        "nodeSelector": podrunner.NODE_SELECTOR,
        "tolerations": podrunner.TOLERATIONS,
        "extraEnv": [{"name": "KUBELORA_RECONCILE_INTERVAL", "value": "1"}],
        "api": {
            "enabled": True,
            "port": free_port(),
            "nodeSelector": podrunner.NODE_SELECTOR,
            "tolerations": podrunner.TOLERATIONS,
        },
    }
    podrunner.ensure_serving_nodes(devenv)
    operator_kubelet = podrunner.image_runner(devenv, tmp_path / "operator-pod", namespace=namespace, selectors=None)
    trainer_kubelet = podrunner.image_runner(devenv, tmp_path / "trainer-pods", namespace=tenant)
    operator_kubelet.start()
    trainer_kubelet.start()
    servers = None
    try:
        result = run_helm(
            "install", release, str(CHART), "--namespace", namespace,
            "--wait", "--timeout", "300s", *set_args(values), kubeconfig=devenv.kubeconfig, check=False,
        )  # fmt: skip
        assert result.returncode == 0, (result.stderr, operator_kubelet.logs(namespace))
        pod = get_operator_pod(kubectl, namespace)
        assert pod["spec"]["serviceAccountName"] == fullname
        assert pod["spec"]["containers"][0]["image"] == images["operator"]
        # The chart has no peering object: the operator creates its KopfPeering at startup, before kopf's
        # peering starts (without it kopf would keep the operator paused and nothing below would happen).
        peering_object = wait_for(
            "the operator's KopfPeering",
            lambda: json.loads(kubectl("get", "kopfpeering", fullname, "-n", tenant, "-o", "json").stdout),
            timeout=60,
        )
        assert peering_object["metadata"]["labels"] == peering.LABELS

        # The self-service API from the chart: TokenReview, SubjectAccessReview and the tenant's storage Secret
        # through the API's own ServiceAccount, and the upload validated in the operator image.
        check_api_upload(devenv, kubectl, namespace, tenant, bucket, minio_client, values["api"]["port"])

        # A LoRAJob, trained by a Job that the chart's operator created, in a trainer-image pod.
        create_s3_secret(kubectl, tenant, devenv)
        task_dir = tmp_path / "task"
        model = tiny.build_tiny_model(task_dir / "model")
        task = tiny.write_task(task_dir / "data", n_train=320, n_test=32)
        uris = upload(minio_client, bucket, {"model": model, "train": task["train"], "test": task["test"]})
        manifest = lorajob("support", bucket, uris["base"], uris["train"], uris["test"])
        kubectl("apply", "-n", tenant, "-f", "-", input=json.dumps(manifest))
        done = wait_phase(kubectl, tenant, "support", "Succeeded", "Failed", timeout=900)
        assert done["status"]["phase"] == "Succeeded", done["status"]
        digest = done["status"]["adapter"]["digest"]

        # An AdapterDeployment onto stand-in vLLM pods whose agent sidecar runs from the agent image.
        config = podrunner.RunnerConfig(workdir=tmp_path / "servers", model_dir=model)
        servers = podrunner.PodRunner(devenv.kubeconfig, config, namespace=tenant).start()
        kubectl("apply", "-n", tenant, "-f", "-", input=json.dumps(demo.agent_token_secret()))
        kubectl("apply", "-n", tenant, "-f", "-", input=yaml.safe_dump(
            demo.vllm_deployment(uris["base"], replicas=1, agent_image=images["agent"])
        ))  # fmt: skip
        servers.wait_healthy(1, timeout=300)
        ad = demo.adapter_deployment("support", uris["base"])
        ad["spec"]["rollout"] = {"strategy": "AllAtOnce"}
        kubectl("apply", "-n", tenant, "-f", "-", input=yaml.safe_dump(ad))

        def ready() -> dict[str, Any] | None:
            status = get(kubectl, tenant, "adapterdeployment", "support").get("status", {})
            return status if status.get("phase") == "Ready" else None

        status = wait_for("the AdapterDeployment to be Ready", ready, timeout=300, interval=1)
        assert status["activeDigest"] == digest, status

        logs = operator_kubelet.logs(namespace)
        forbidden = [line for line in logs.splitlines() if "forbidden" in line.lower() or " 403" in line]
        known = ("namespaces", "permissions to list namespaces", "permissions to watch for namespaces")
        assert [line for line in forbidden if not any(k in line for k in known)] == [], forbidden[:5]
    finally:
        if servers is not None:
            servers.stop()
        run_helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s",
                 kubeconfig=devenv.kubeconfig, check=False)  # fmt: skip
        trainer_kubelet.stop()
        operator_kubelet.stop()


def check_api_upload(devenv, kubectl, namespace: str, tenant: str, bucket: str, minio_client, port: int) -> None:
    import openai

    values_audience = "kubelora-api"  # the chart's default api.audience

    if not minio_client.bucket_exists(bucket):
        minio_client.make_bucket(bucket)
    kubectl(
        "create", "secret", "generic", STORAGE_SECRET, "-n", tenant,
        f"--from-literal=accessKey={devenv.minio_access_key}", f"--from-literal=secretKey={devenv.minio_secret_key}",
        f"--from-literal=endpoint={devenv.minio_endpoint}", f"--from-literal=bucket={bucket}",
        "--from-literal=prefix=self-service/",
    )  # fmt: skip
    kubectl("create", "serviceaccount", "alice", "-n", tenant)
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "rules": TENANT_RULES,
            "metadata": {"name": "fine-tuning", "namespace": tenant}}  # fmt: skip
    kubectl("apply", "-f", "-", input=json.dumps(role))
    kubectl(
        "create", "rolebinding", "fine-tuning", "-n", tenant, "--role=fine-tuning", f"--serviceaccount={tenant}:alice"
    )
    pods = json.loads(
        kubectl("get", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=api", "-o", "json").stdout
    )["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    base_url = f"http://{pods[0]['status']['podIP']}:{port}/v1"
    # A token for the API's audience (the chart's api.audience); a plain API-server token is refused.
    bearer = token(kubectl, tenant, "alice", audience=values_audience)
    client = openai.OpenAI(base_url=base_url, api_key=bearer, max_retries=0, timeout=60)
    uploaded = client.files.create(file=("train.jsonl", jsonl([CHAT_ROW] * 3)), purpose="fine-tune")
    assert uploaded.bytes == len(jsonl([CHAT_ROW] * 3)), uploaded
    assert [f.id for f in client.files.list()] == [uploaded.id]
    stored = [o.object_name for o in minio_client.list_objects(bucket, prefix="self-service/files/", recursive=True)]
    assert f"self-service/files/{uploaded.id}.jsonl" in stored, stored
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="not-a-token", max_retries=0, timeout=60).files.list()
    plain = token(kubectl, tenant, "alice", audience=None)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key=plain, max_retries=0, timeout=60).files.list()


def get_operator_pod(kubectl, namespace: str) -> dict[str, Any]:
    pods = json.loads(
        kubectl("get", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=operator", "-o", "json").stdout
    )["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return dict(pods[0])
