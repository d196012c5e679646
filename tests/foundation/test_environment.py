"""The local environment is the real thing: API server, scheduler, Job controller, kwok and MinIO."""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import pytest
import yaml

from kubelora.devenv import cluster
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.test.kubelora.dev}
spec:
  group: test.kubelora.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1}
"""


def gpu_job(name: str, gpus: int, outcome: str | None = None) -> str:
    annotations = {"kwok.kubelora.dev/outcome": outcome} if outcome else {}
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": annotations},
                "spec": {
                    "restartPolicy": "Never",
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [
                        {
                            "name": "train",
                            "image": "kubelora/trainer:dev",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ],
                },
            },
        },
    }
    return yaml.safe_dump(job)


def job_pods(kubectl: Any, namespace: str, job: str) -> list[dict[str, Any]]:
    out = kubectl("get", "pods", "-n", namespace, "-l", f"job-name={job}", "-o", "json").stdout
    return list(json.loads(out)["items"])


def job_condition(kubectl: Any, namespace: str, job: str, condition: str) -> bool:
    status = json.loads(kubectl("get", "job", job, "-n", namespace, "-o", "json").stdout).get("status", {})
    return any(c["type"] == condition and c["status"] == "True" for c in status.get("conditions", []))


def test_crd_and_custom_resource_round_trip(kubectl, api_client, namespace):
    from kubernetes import client

    kubectl("apply", "-f", "-", input=WIDGET_CRD)
    kubectl("wait", "--for=condition=Established", "crd/widgets.test.kubelora.dev", "--timeout=60s")
    widget = {"apiVersion": "test.kubelora.dev/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}}
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(widget))
    got = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        "test.kubelora.dev", "v1", namespace, "widgets", "w1"
    )
    assert got["spec"] == {"size": 3}
    rejected = kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(widget).replace('"size": 3', '"size": 0'), check=False
    )
    assert rejected.returncode != 0 and "spec.size" in rejected.stderr


def test_fake_nodes_look_like_gpu_nodes(kubectl):
    # Other tests add pools of their own; the default ones are two 8 x A100 nodes and one L4.
    selector = "nvidia.com/gpu.present=true,kubelora.dev/pool in (a100,l4)"
    nodes = json.loads(kubectl("get", "nodes", "-l", selector, "-o", "json").stdout)["items"]
    products = sorted(n["metadata"]["labels"]["nvidia.com/gpu.product"] for n in nodes)
    assert products == ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-SXM4-80GB", "NVIDIA-L4"]
    a100 = next(n for n in nodes if n["metadata"]["labels"]["nvidia.com/gpu.product"].startswith("NVIDIA-A100"))
    assert a100["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert a100["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert a100["metadata"]["labels"]["nvidia.com/gpu.memory"] == "81920"
    assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in a100["spec"]["taints"]


def test_scheduler_binds_gpu_pod_to_gpu_node(kubectl, namespace):
    kubectl("apply", "-n", namespace, "-f", "-", input=gpu_job("one-gpu", 1))
    pod = wait_for(
        "the pod to be bound", lambda: [p for p in job_pods(kubectl, namespace, "one-gpu") if p["spec"].get("nodeName")]
    )[0]
    node = json.loads(kubectl("get", "node", pod["spec"]["nodeName"], "-o", "json").stdout)
    assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
    wait_for("the pod to run", lambda: job_pods(kubectl, namespace, "one-gpu")[0]["status"].get("phase") == "Running")


def test_too_many_gpus_stays_pending_with_failed_scheduling(kubectl, namespace):
    kubectl("apply", "-n", namespace, "-f", "-", input=gpu_job("too-big", 16))

    def failed_scheduling() -> list[dict[str, Any]]:
        events = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
        return [e for e in events if e["reason"] == "FailedScheduling"]

    events = wait_for("a FailedScheduling event", failed_scheduling)
    assert "nvidia.com/gpu" in events[0]["message"]
    pods = job_pods(kubectl, namespace, "too-big")
    assert pods[0]["status"]["phase"] == "Pending" and not pods[0]["spec"].get("nodeName")


def test_kwok_drives_job_to_complete(kubectl, namespace):
    kubectl("apply", "-n", namespace, "-f", "-", input=gpu_job("ok", 1, outcome="Succeeded"))
    wait_for("the Job to be Complete", lambda: job_condition(kubectl, namespace, "ok", "Complete"), 90)
    assert job_pods(kubectl, namespace, "ok")[0]["status"]["phase"] == "Succeeded"


def test_pod_marked_to_fail_fails_its_job(kubectl, namespace):
    kubectl("apply", "-n", namespace, "-f", "-", input=gpu_job("bad", 1, outcome="Failed"))
    wait_for("the Job to be Failed", lambda: job_condition(kubectl, namespace, "bad", "Failed"), 90)
    pod = job_pods(kubectl, namespace, "bad")[0]
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 1


def test_minio_round_trips_50_mb(minio_client, bucket):
    payload = os.urandom(50 * 1024 * 1024)
    minio_client.put_object(bucket, "big.bin", io.BytesIO(payload), len(payload), part_size=16 * 1024 * 1024)
    response = minio_client.get_object(bucket, "big.bin")
    try:
        got = response.read()
    finally:
        response.close()
        response.release_conn()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_dev_up_reuses_running_environment(devenv):
    again = cluster.up()
    assert again.kubeconfig == devenv.kubeconfig and again.minio_pid == devenv.minio_pid
