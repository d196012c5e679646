"""A 2-node LoRAJob against the dev control plane: an Indexed Job of 2 pods and a headless Service, owned together."""

from __future__ import annotations

import json
import signal

import pytest

from kubelora.trainer import distributed
from tests.conftest import wait_for
from tests.operator.harness import (
    OperatorProcess,
    create_s3_secret,
    get,
    install_crds,
    lorajob_manifest,
    seed_inputs,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def operator(devenv, namespace, tmp_path, kubectl, minio_client, bucket):
    install_crds(devenv)
    create_s3_secret(kubectl, namespace, devenv)
    seed_inputs(minio_client, bucket)
    proc = OperatorProcess(devenv, namespace, tmp_path)
    proc.start()
    yield proc
    proc.kill(signal.SIGTERM)


def owned_by(obj, uid):
    return any(o.get("uid") == uid and o.get("controller") for o in obj["metadata"].get("ownerReferences") or [])


def test_a_two_node_lorajob_is_an_indexed_job_of_two_pods_and_a_headless_service(operator, kubectl, namespace, bucket):
    manifest = lorajob_manifest("multi", bucket, resources={"gpus": 1, "nodes": 2})
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    lorajob = get(kubectl, namespace, "lorajob", "multi")
    uid = lorajob["metadata"]["uid"]
    name = wait_for(
        "the Job's name", lambda: get(kubectl, namespace, "lorajob", "multi").get("status", {}).get("jobName")
    )
    job = wait_for("the Job", lambda: get(kubectl, namespace, "job", name))
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert owned_by(job, uid)
    service = get(kubectl, namespace, "service", job["spec"]["template"]["spec"]["subdomain"])
    assert service["spec"]["clusterIP"] == "None" and owned_by(service, uid)

    def two_running_pods():
        items = json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
        mine = [p for p in items if owned_by(p, job["metadata"]["uid"]) and p["status"].get("phase") == "Running"]
        return mine if len(mine) == 2 else None

    pods = sorted(wait_for("two running pods", two_running_pods, timeout=90), key=lambda p: p["metadata"]["name"])
    indexes = [p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods]
    assert indexes == ["0", "1"]
    for index, pod in enumerate(pods):
        assert pod["spec"]["hostname"] == f"{name}-{index}"
        assert pod["spec"]["subdomain"] == service["metadata"]["name"]
        container = pod["spec"]["containers"][0]
        launcher, _ = distributed.parse_args(container["command"][3:])
        # Every pod meets at pod 0's stable name, which the headless Service resolves.
        assert launcher.rdzv_endpoint == f"{name}-0.{service['metadata']['name']}:{distributed.RDZV_PORT}"
        env = {e["name"]: e.get("valueFrom") for e in container["env"]}
        assert "JOB_COMPLETION_INDEX" in env  # set by the Job controller, read by the launcher

    wait_for("Training", lambda: get(kubectl, namespace, "lorajob", "multi")["status"].get("phase") == "Training")
    # Deleting the LoRAJob takes the Job, its pods and the Service with it.
    kubectl("delete", "lorajob", "multi", "-n", namespace, "--wait=false")

    def all_gone():
        jobs = kubectl("get", "job", name, "-n", namespace, "--ignore-not-found", "-o", "name").stdout.strip()
        svc = kubectl(
            "get", "service", service["metadata"]["name"], "-n", namespace, "--ignore-not-found", "-o", "name"
        ).stdout.strip()
        items = json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
        pods_left = [p["metadata"]["name"] for p in items if owned_by(p, job["metadata"]["uid"])]
        left = [x for x in (jobs, svc, *pods_left) if x]
        assert not left, f"still there: {left}"  # wait_for keeps the last error for its timeout message
        return True

    # Garbage collection is the kube-controller-manager's, and slower when the suite has filled the cluster
    wait_for("the Job, its pods and the Service garbage-collected", all_gone, timeout=180)
