"""The LoRAJob controller against the real control plane, kwok GPU nodes and MinIO."""

from __future__ import annotations

import io
import json
import random
import signal
import threading
import uuid

import pytest
import yaml

from kubelora.devenv import cluster
from tests.conftest import wait_for
from tests.operator.harness import (
    OperatorProcess,
    create_s3_secret,
    get,
    install_crds,
    lorajob_manifest,
    pods_of,
    wait_phase,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def crds(devenv):
    install_crds(devenv)


@pytest.fixture
def operator(devenv, crds, namespace, tmp_path, kubectl):
    create_s3_secret(kubectl, namespace, devenv)
    proc = OperatorProcess(devenv, namespace, tmp_path)
    proc.start()
    yield proc
    proc.kill(signal.SIGTERM)


def apply(kubectl, namespace, manifest):
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def annotate_pod(kubectl, namespace, lorajob, outcome):
    pods = wait_for(
        "a running pod",
        lambda: [p for p in pods_of(kubectl, namespace, lorajob) if p["status"].get("phase") == "Running"],
    )
    for pod in pods:
        kubectl(
            "annotate",
            "pod",
            pod["metadata"]["name"],
            "-n",
            namespace,
            f"kwok.kubelora.dev/outcome={outcome}",
            "--overwrite",
        )


def test_job_pod_spec_is_what_a_gpu_cluster_needs(operator, kubectl, namespace, bucket):
    apply(
        kubectl,
        namespace,
        lorajob_manifest("spec-check", bucket, resources={"gpus": 2, "gpuType": "NVIDIA-A100-SXM4-80GB"}),
    )
    job = wait_for("the Job", lambda: get(kubectl, namespace, "job", "spec-check-train"))
    pod_spec = job["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["image"] == "kubelora/trainer:test"
    match = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][
        0
    ]["matchExpressions"][0]
    assert match == {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-A100-SXM4-80GB"]}
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e for e in container["env"]}
    assert env["OUTPUT_AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "minio-creds"
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "LoRAJob" and owner["name"] == "spec-check" and owner["controller"] is True
    lorajob = wait_phase(kubectl, namespace, "spec-check", "Training")
    pod = pods_of(kubectl, namespace, "spec-check")[0]
    node = get(kubectl, "", "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    assert lorajob["status"]["jobName"] == "spec-check-train"
    # Nothing secret leaks into the CR, the Job or the operator log.
    secret_key = operator.devenv.minio_secret_key
    assert (
        secret_key not in json.dumps(lorajob) and secret_key not in json.dumps(job) and secret_key not in operator.log()
    )


def test_absent_gpu_type_queues_until_a_node_appears(operator, kubectl, namespace, bucket, devenv):
    product = f"NVIDIA-H100-{uuid.uuid4().hex[:6]}"
    apply(kubectl, namespace, lorajob_manifest("h100", bucket, resources={"gpus": 1, "gpuType": product}))
    queued = wait_phase(kubectl, namespace, "h100", "Queued")
    conditions = {c["type"]: c for c in queued["status"]["conditions"]}
    assert conditions["Scheduled"]["status"] == "False"
    assert "node affinity" in conditions["Scheduled"]["message"] or "didn't match" in conditions["Scheduled"]["message"]
    assert conditions["GPUTypeAvailable"]["reason"] == "GPUTypeNotFound"
    pool = cluster.GPUPool(f"h{uuid.uuid4().hex[:6]}", 1, 8, product, 81559, "hopper")
    node = cluster.gpu_node(pool, 0)
    cluster.apply_nodes(devenv, [node])
    try:
        started = wait_phase(kubectl, namespace, "h100", "Training", timeout=120)
        assert next(c for c in started["status"]["conditions"] if c["type"] == "Scheduled")["status"] == "True"
    finally:
        kubectl("delete", "node", node["metadata"]["name"], "--wait=false")


def test_more_gpus_than_free_stays_queued_with_the_scheduler_message(operator, kubectl, namespace, bucket):
    apply(kubectl, namespace, lorajob_manifest("greedy", bucket, resources={"gpus": 4, "gpuType": "NVIDIA-L4"}))
    queued = wait_phase(kubectl, namespace, "greedy", "Queued")
    assert "Insufficient nvidia.com/gpu" in queued["status"]["message"] or "Insufficient nvidia.com/gpu" in json.dumps(
        queued["status"]["conditions"]
    )


def test_failed_pod_is_retried_then_the_job_fails(operator, kubectl, namespace, bucket):
    apply(kubectl, namespace, lorajob_manifest("flaky", bucket, retries=1))
    wait_phase(kubectl, namespace, "flaky", "Training")
    annotate_pod(kubectl, namespace, "flaky", "Failed")
    retried = wait_for(
        "a second attempt",
        lambda: (obj := get(kubectl, namespace, "lorajob", "flaky"))["status"].get("attempts", 0) >= 2 and obj,
    )
    assert retried["status"]["phase"] in ("Pending", "Training")
    wait_for("a second pod", lambda: len(pods_of(kubectl, namespace, "flaky")) == 2)
    annotate_pod(kubectl, namespace, "flaky", "Failed")
    failed = wait_phase(kubectl, namespace, "flaky", "Failed")
    assert (
        failed["status"]["conditions"][-1]["reason"] in ("BackoffLimitExceeded", "FailedIndexes")
        or "backoff" in failed["status"]["message"].lower()
    )


def test_missing_secret_is_a_condition_and_event_not_a_crash(operator, kubectl, namespace, bucket, devenv):
    manifest = lorajob_manifest("no-secret", bucket)
    manifest["spec"]["output"]["secretRef"] = {"name": "absent"}
    apply(kubectl, namespace, manifest)
    apply(kubectl, namespace, lorajob_manifest("neighbour", bucket))
    pending = wait_for(
        "the SecretNotFound condition",
        lambda: (
            any(
                c.get("reason") == "SecretNotFound"
                for c in get(kubectl, namespace, "lorajob", "no-secret").get("status", {}).get("conditions", [])
            )
            and get(kubectl, namespace, "lorajob", "no-secret")
        ),
    )
    assert pending["status"]["phase"] == "Pending"
    assert "spec.output.secretRef" in pending["status"]["message"]
    wait_phase(kubectl, namespace, "neighbour", "Training")
    events = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    assert any(e["reason"] == "SecretNotFound" and e["type"] == "Warning" for e in events)
    assert operator.healthy()
    create_s3_secret(kubectl, namespace, devenv, name="absent")
    wait_phase(kubectl, namespace, "no-secret", "Training", timeout=120)


def test_sigkill_while_50_jobs_in_flight_never_duplicates_a_job(operator, kubectl, namespace, bucket, minio_client):
    names = [f"burst-{i:02d}" for i in range(50)]
    manifests = [lorajob_manifest(n, bucket, resources={"gpus": 0}) for n in names]
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(manifests))
    rng = random.Random(7)
    stop = threading.Event()

    def finish_running_pods() -> None:
        while not stop.is_set():
            out = kubectl("get", "pods", "-n", namespace, "-o", "json", check=False).stdout
            for pod in json.loads(out or '{"items": []}')["items"]:
                annotations = pod["metadata"].get("annotations") or {}
                if pod["status"].get("phase") == "Running" and "kwok.kubelora.dev/outcome" not in annotations:
                    kubectl(
                        "annotate",
                        "pod",
                        pod["metadata"]["name"],
                        "-n",
                        namespace,
                        "kwok.kubelora.dev/outcome=Succeeded",
                        check=False,
                    )
            stop.wait(0.5)

    driver = threading.Thread(target=finish_running_pods, daemon=True)
    driver.start()
    try:
        for _ in range(4):
            stop.wait(rng.uniform(0.5, 3.0))
            operator.kill(signal.SIGKILL)
            operator.start()

        def all_terminal() -> bool:
            items = json.loads(kubectl("get", "lorajobs", "-n", namespace, "-o", "json").stdout)["items"]
            return len(items) == 50 and all(i.get("status", {}).get("phase") in ("Succeeded", "Failed") for i in items)

        wait_for("every LoRAJob to finish", all_terminal, timeout=300, interval=1)
    finally:
        stop.set()
        driver.join(timeout=10)
    jobs = json.loads(kubectl("get", "jobs", "-n", namespace, "-o", "json").stdout)["items"]
    per_lorajob: dict[str, int] = {}
    for job in jobs:
        owner = job["metadata"]["labels"]["kubelora.dev/lorajob"]
        per_lorajob[owner] = per_lorajob.get(owner, 0) + 1
    assert per_lorajob == dict.fromkeys(names, 1)
    # kwok's pods exit 0 without a trainer behind them, so nothing was published: every LoRAJob ends
    # Failed/NoResult (an exit code alone is never trusted), and each had exactly one Job.
    items = json.loads(kubectl("get", "lorajobs", "-n", namespace, "-o", "json").stdout)["items"]
    ready = [next(c for c in i["status"]["conditions"] if c["type"] == "Ready") for i in items]
    assert {i["status"]["phase"] for i in items} == {"Failed"}
    assert {c["reason"] for c in ready} == {"NoResult"}


def test_deleting_a_lorajob_deletes_its_job(operator, kubectl, namespace, bucket):
    apply(kubectl, namespace, lorajob_manifest("doomed", bucket))
    wait_phase(kubectl, namespace, "doomed", "Training")
    kubectl("delete", "lorajob", "doomed", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(
        "the Job to be garbage-collected",
        lambda: kubectl("get", "job", "doomed-train", "-n", namespace, check=False).returncode != 0,
        timeout=90,
    )


def test_adapter_files_stay_unless_the_job_asks_for_their_deletion(operator, kubectl, namespace, bucket, minio_client):
    keep = lorajob_manifest("keep", bucket)
    purge = lorajob_manifest("purge", bucket)
    purge["spec"]["output"]["deleteOnJobDeletion"] = True
    for manifest in (keep, purge):
        apply(kubectl, namespace, manifest)
        name = manifest["metadata"]["name"]
        minio_client.put_object(bucket, f"adapters/{name}/adapter_model.safetensors", io.BytesIO(b"weights"), 7)
    wait_phase(kubectl, namespace, "purge", "Training")
    wait_phase(kubectl, namespace, "keep", "Training")
    finalizers = get(kubectl, namespace, "lorajob", "keep")["metadata"].get("finalizers") or []
    assert finalizers == [], "a LoRAJob that keeps its files needs no finalizer"
    kubectl("delete", "lorajob", "keep", "purge", "-n", namespace, "--wait=true", "--timeout=60s")

    def objects(name: str) -> list[str]:
        return [o.object_name for o in minio_client.list_objects(bucket, prefix=f"adapters/{name}/", recursive=True)]

    assert objects("purge") == []
    assert objects("keep") == ["adapters/keep/adapter_model.safetensors"]


def test_deadline_is_enforced(operator, kubectl, namespace, bucket):
    apply(kubectl, namespace, lorajob_manifest("slow", bucket, activeDeadlineSeconds=60))
    wait_phase(kubectl, namespace, "slow", "Training")
    failed = wait_phase(kubectl, namespace, "slow", "Failed", timeout=150)
    assert failed["status"]["conditions"][-1]["reason"] == "DeadlineExceeded", failed["status"]
    wait_for(
        "the Job controller to stop the pod",
        lambda: not [p for p in pods_of(kubectl, namespace, "slow") if p["status"].get("phase") == "Running"],
    )
