"""The LoRAJob controller against the real control plane, kwok GPU nodes and MinIO."""

from __future__ import annotations

import datetime
import io
import json
import random
import signal
import threading
import uuid

import pytest
import yaml

from kubelora import storage
from kubelora.devenv import cluster
from tests.conftest import wait_for
from tests.operator.harness import (
    OperatorProcess,
    create_s3_secret,
    get,
    install_crds,
    job_of,
    lorajob_manifest,
    pods_of,
    seed_inputs,
    wait_phase,
)
from tests.operator.test_status import ADAPTER

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def crds(devenv):
    install_crds(devenv)


@pytest.fixture
def operator(devenv, crds, namespace, tmp_path, kubectl, minio_client, bucket):
    create_s3_secret(kubectl, namespace, devenv)
    seed_inputs(minio_client, bucket)
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
    job = job_of(kubectl, namespace, "spec-check")
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
    assert owner["uid"] == lorajob["metadata"]["uid"]
    pod = pods_of(kubectl, namespace, "spec-check")[0]
    node = get(kubectl, "", "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    assert lorajob["status"]["jobName"] == job["metadata"]["name"]
    assert job["metadata"]["name"].startswith("spec-check-train-")
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
    name = job_of(kubectl, namespace, "doomed")["metadata"]["name"]
    kubectl("delete", "lorajob", "doomed", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(
        "the Job to be garbage-collected",
        lambda: kubectl("get", "job", name, "-n", namespace, check=False).returncode != 0,
        timeout=90,
    )


def test_adapter_files_stay_unless_the_job_asks_for_their_deletion(operator, kubectl, namespace, bucket, minio_client):
    keep = lorajob_manifest("keep", bucket)
    purge = lorajob_manifest("purge", bucket)
    purge["spec"]["output"]["deleteOnJobDeletion"] = True
    for manifest in (keep, purge):
        apply(kubectl, namespace, manifest)
    for name in ("purge", "keep"):
        uid = wait_phase(kubectl, namespace, name, "Training")["metadata"]["uid"]
        for key in (f"_kubelora/{uid}/progress.json", "checkpoints/checkpoint-5/COMPLETE"):
            minio_client.put_object(bucket, f"adapters/{name}/{key}", io.BytesIO(b"{}"), 2)
    kept, purged = get(kubectl, namespace, "lorajob", "keep"), get(kubectl, namespace, "lorajob", "purge")
    assert (kept["metadata"].get("finalizers") or []) == [], "a LoRAJob that keeps its files needs no finalizer"
    # Nor any kopf state: a change handler matching every LoRAJob made kopf PATCH each one as it appeared.
    assert "kubelora.dev/last-handled-configuration" not in (kept["metadata"].get("annotations") or {})
    assert "kubelora.dev/cleanup" in purged["metadata"]["finalizers"], "the control: this one has a handler"
    kubectl("delete", "lorajob", "keep", "purge", "-n", namespace, "--wait=true", "--timeout=60s")

    def objects(name: str) -> list[str]:
        return [o.object_name for o in minio_client.list_objects(bucket, prefix=f"adapters/{name}/", recursive=True)]

    assert objects("purge") == []
    assert len(objects("keep")) == 2


def publish_adapter(minio_client, monkeypatch, workdir, output: str, weights: bytes, job: str) -> dict:
    """An adapter published by the trainer's own publish step into `output` (sha256/<hex>/ and the pointer)."""
    from kubelora.api.v1alpha1 import dump
    from kubelora.storage import S3Store
    from kubelora.trainer import publish

    monkeypatch.setattr(publish, "store_for", lambda loc, role=None: S3Store(minio_client))
    adapter = workdir / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    files = publish.stage(workdir, adapter, "llama", {"eval": {"passed": True}}, [{"prompt": "p", "adapter": "a"}])
    body = {"kind": publish.MANIFEST_KIND, "job": {"name": job}}
    artifact = publish.publish(
        output, files, body, trainable_parameters=5, rank=8, base_identity="llama", workdir=workdir
    )
    return dump(artifact)


def succeed_with(kubectl, minio_client, bucket, namespace, name: str, adapter: dict) -> dict:
    """Let the LoRAJob's run end with this adapter in its result (what the trainer reports after publishing)."""
    uid = wait_phase(kubectl, namespace, name, "Training")["metadata"]["uid"]
    output = get(kubectl, namespace, "lorajob", name)["spec"]["output"]["uri"]
    prefix = storage.parse_s3(output).key
    data = json.dumps({"type": "result", "time": "2026-01-01T00:00:00Z", "adapter": adapter}).encode()
    minio_client.put_object(bucket, f"{prefix}_kubelora/{uid}/result.json", io.BytesIO(data), len(data))
    finish_pods(kubectl, namespace, job_of(kubectl, namespace, name))
    done = wait_phase(kubectl, namespace, name, "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded" and done["status"]["adapter"]["digest"] == adapter["digest"]
    return done


def keys(minio_client, bucket, prefix: str) -> set[str]:
    return {o.object_name for o in minio_client.list_objects(bucket, prefix=prefix, recursive=True)}


def test_deleting_a_lorajob_removes_its_own_adapter_and_never_one_in_use(
    operator, kubectl, namespace, bucket, minio_client, monkeypatch, tmp_path
):
    """Two LoRAJobs publish to one output; an AdapterDeployment names the first's digest."""
    output = f"s3://{bucket}/adapters/shared/"
    jobs: dict[str, dict] = {}
    for name in ("first", "second"):
        manifest = lorajob_manifest(name, bucket)
        manifest["spec"]["output"].update({"uri": output, "deleteOnJobDeletion": True})
        apply(kubectl, namespace, manifest)
        adapter = publish_adapter(minio_client, monkeypatch, tmp_path / name, output, name.encode() * 100, name)
        done = succeed_with(kubectl, minio_client, bucket, namespace, name, adapter)
        key = storage.parse_s3(done["status"]["adapter"]["uri"]).key
        jobs[name] = {**done["status"]["adapter"], "uid": done["metadata"]["uid"], "key": key}
    first, second = jobs["first"], jobs["second"]
    assert first["key"] != second["key"] and second["key"].startswith("adapters/shared/sha256/")
    minio_client.put_object(bucket, "adapters/shared/checkpoints/checkpoint-5/COMPLETE", io.BytesIO(b"{}"), 2)
    first_files = keys(minio_client, bucket, first["key"])
    assert len(first_files) == 5  # adapter, config, eval results and samples, manifest

    # An AdapterDeployment pins the first digest (spec.adapter.digest); the operator has seen it once it
    # holds it with its finalizer.
    served = {
        "apiVersion": "kubelora.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "serve"},
        "spec": {
            "adapter": {"uri": first["uri"], "digest": first["digest"], "secretRef": {"name": "minio-creds"}},
            "servedName": "support",
            "target": {"deploymentName": "vllm", "baseModel": "llama", "agentTokenSecretRef": {"name": "agent"}},
        },
    }
    apply(kubectl, namespace, served)
    try:
        wait_for(
            "the operator to see the AdapterDeployment",
            lambda: get(kubectl, namespace, "adapterdeployment", "serve")["metadata"].get("finalizers"),
        )

        # The second LoRAJob goes with its digest directory, its report and the pointer (which names it).
        kubectl("delete", "lorajob", "second", "-n", namespace, "--wait=true", "--timeout=60s")
        assert keys(minio_client, bucket, second["key"]) == set()
        assert keys(minio_client, bucket, f"adapters/shared/_kubelora/{second['uid']}/") == set()
        assert keys(minio_client, bucket, "adapters/shared/kubelora-latest.json") == set()
        assert keys(minio_client, bucket, "adapters/shared/checkpoints/") == set()
        # The first LoRAJob's adapter, in another digest directory under the same output, is untouched.
        assert keys(minio_client, bucket, first["key"]) == first_files
        assert keys(minio_client, bucket, f"adapters/shared/_kubelora/{first['uid']}/")

        # The first is in use: kept, and said so (event and condition; a finalizer of ours holds the LoRAJob).
        hold = '{"metadata": {"finalizers": ["test.kubelora.dev/hold"]}}'
        kubectl("patch", "lorajob", "first", "-n", namespace, "--type=merge", "-p", hold)
        kubectl("delete", "lorajob", "first", "-n", namespace, "--wait=false")
        message = wait_for(
            "the AdapterInUse event", lambda: warning_events(kubectl, namespace, "first").get("AdapterInUse")
        )
        assert f"AdapterDeployment {namespace}/serve (spec.adapter.digest)" in message and first["digest"] in message

        def cleanup_condition() -> dict | None:
            conditions = get(kubectl, namespace, "lorajob", "first")["status"].get("conditions", [])
            return next((c for c in conditions if c["type"] == "AdapterDeleted"), None)

        held = wait_for("the AdapterDeleted condition", cleanup_condition)
        assert held["status"] == "False" and held["reason"] == "AdapterInUse" and first["digest"] in held["message"]
        wait_for(
            "the report to be deleted",
            lambda: not keys(minio_client, bucket, f"adapters/shared/_kubelora/{first['uid']}/"),
        )
        assert keys(minio_client, bucket, first["key"]) == first_files
    finally:
        unhold = '{"metadata":{"finalizers":null}}'
        kubectl("patch", "lorajob", "first", "-n", namespace, "--type=merge", "-p", unhold, check=False)
        kubectl("delete", "adapterdeployment", "serve", "-n", namespace, "--timeout=60s", check=False)


def test_a_bucket_root_output_is_never_deleted(operator, kubectl, namespace, bucket, minio_client):
    manifest = lorajob_manifest("whole-bucket", bucket)
    manifest["spec"]["output"].update({"uri": f"s3://{bucket}", "deleteOnJobDeletion": True})
    apply(kubectl, namespace, manifest)

    def finalized() -> bool:
        meta = get(kubectl, namespace, "lorajob", "whole-bucket")["metadata"]
        return "kubelora.dev/cleanup" in (meta.get("finalizers") or [])

    wait_for("the cleanup finalizer", finalized)
    minio_client.put_object(bucket, "checkpoints/checkpoint-5/COMPLETE", io.BytesIO(b"{}"), 2)
    before = keys(minio_client, bucket, "")
    kubectl("delete", "lorajob", "whole-bucket", "-n", namespace, "--wait=true", "--timeout=60s")
    message = wait_for(
        "the CleanupRefused event", lambda: warning_events(kubectl, namespace, "whole-bucket").get("CleanupRefused")
    )
    assert f"s3://{bucket}" in message and "never deletes" in message
    assert keys(minio_client, bucket, "") == before and "checkpoints/checkpoint-5/COMPLETE" in before


def stop_at_deadline(kubectl, namespace, pod, ran_seconds: int) -> None:
    """Play the kubelet for a pod at its activeDeadlineSeconds (kwok runs no deadlines): the pod fails with
    DeadlineExceeded, its trainer stopped now after `ran_seconds` of running."""
    finished = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    started = finished - datetime.timedelta(seconds=ran_seconds)
    terminated = {
        "exitCode": 143,
        "reason": "Error",
        "startedAt": started.isoformat().replace("+00:00", "Z"),
        "finishedAt": finished.isoformat().replace("+00:00", "Z"),
    }
    status = {
        "phase": "Failed",
        "reason": "DeadlineExceeded",
        "message": "Pod was active on the node longer than the specified deadline",
        "containerStatuses": [
            {
                "name": "trainer",
                "image": pod["spec"]["containers"][0]["image"],
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "started": False,
                "state": {"terminated": terminated},
            }
        ],
    }
    kubectl(
        "patch", "pod", pod["metadata"]["name"], "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip


def test_the_deadline_is_per_attempt_and_every_attempts_running_time_is_paid_for(operator, kubectl, namespace, bucket):
    apply(kubectl, namespace, lorajob_manifest("slow", bucket, activeDeadlineSeconds=60, resources={"gpus": 2}))
    job = job_of(kubectl, namespace, "slow")
    # On the pod template, so each attempt gets the whole deadline; the Job itself has none.
    assert job["spec"]["template"]["spec"]["activeDeadlineSeconds"] == 60
    assert "activeDeadlineSeconds" not in job["spec"] and job["spec"]["backoffLimit"] == 1
    wait_phase(kubectl, namespace, "slow", "Training")

    def running_pod(exclude: str = "") -> dict:
        pods = pods_of(kubectl, namespace, "slow")
        return next(
            (p for p in pods if p["status"].get("phase") == "Running" and p["metadata"]["name"] != exclude), None
        )

    first = wait_for("the first attempt's pod to run", running_pod)
    stop_at_deadline(kubectl, namespace, first, 60)
    # The Job controller counts the failed attempt and starts a second, after its back-off.
    second = wait_for("a second attempt", lambda: running_pod(exclude=first["metadata"]["name"]), timeout=90)
    seen = wait_for(
        "the second attempt, and the first one's 2 GPUs x 60 s in status.gpuSeconds",
        lambda: (
            (status := get(kubectl, namespace, "lorajob", "slow")["status"]).get("gpuSeconds", 0) >= 120
            and status.get("attempts") == 2
            and status
        ),
    )
    assert seen["phase"] in ("Pending", "Training"), seen
    # The first attempt's pod goes (deleted by hand, by pod GC): what it ran stays paid for.
    kubectl("delete", "pod", first["metadata"]["name"], "-n", namespace, "--wait=true", "--timeout=60s")
    stop_at_deadline(kubectl, namespace, second, 60)
    failed = wait_phase(kubectl, namespace, "slow", "Failed")
    status = failed["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "DeadlineExceeded", status
    assert ready["message"].startswith("Attempt 2 exceeded its deadline of 60s (spec.activeDeadlineSeconds"), ready
    # 2 GPUs x (60 + 60) s of running, the deleted first pod's included, plus at most what the operator saw each
    # pod run before the test stopped it. The waits (scheduling, the retry's back-off) are free: a cost counted
    # from the Job's creation would be 2 GPUs x the wall time, under 240.
    wall = (
        datetime.datetime.fromisoformat(status["completionTime"].replace("Z", "+00:00"))
        - datetime.datetime.fromisoformat(job["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
    ).total_seconds()
    assert wall < 120, wall
    assert 240 <= status["gpuSeconds"] <= 240 + 2 * wall, (status["gpuSeconds"], wall)
    assert status["costEstimate"].endswith(" USD")


# --------------------------------------------------------------------------------------------------------------------
# Identity: children are found by owner UID; a finished run stays finished; the spec of a run is fixed.


def publish_result(minio_client, bucket, key: str) -> None:
    """A trainer's result.json (what the real trainer writes when it has published), at `key`."""
    data = json.dumps({"type": "result", "time": "2026-01-01T00:00:00Z", "adapter": ADAPTER}).encode()
    minio_client.put_object(bucket, key, io.BytesIO(data), len(data))


def finish_pods(kubectl, namespace, job, outcome="Succeeded"):
    """Let the running pods of this Job (found by their controller's UID) exit with `outcome`."""

    def running():
        items = json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
        return [
            p
            for p in items
            if p["status"].get("phase") == "Running"
            and any(o.get("uid") == job["metadata"]["uid"] for o in p["metadata"].get("ownerReferences") or [])
        ]

    for pod in wait_for(f"a running pod of Job {job['metadata']['name']}", running):
        kubectl(
            "annotate", "pod", pod["metadata"]["name"], "-n", namespace,
            f"kwok.kubelora.dev/outcome={outcome}", "--overwrite",
        )  # fmt: skip


def jobs_in(kubectl, namespace):
    return json.loads(kubectl("get", "jobs", "-n", namespace, "-o", "json").stdout)["items"]


def warning_events(kubectl, namespace, name):
    items = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    return {e["reason"]: e["message"] for e in items if e["type"] == "Warning" and e["involvedObject"]["name"] == name}


def test_a_lorajob_recreated_under_its_name_never_adopts_the_old_job_or_its_result(
    operator, kubectl, namespace, bucket, minio_client
):
    apply(kubectl, namespace, lorajob_manifest("again", bucket))
    first = wait_phase(kubectl, namespace, "again", "Training")
    old_job = job_of(kubectl, namespace, "again")
    # The first run publishes, under its own UID's report prefix (and, for an older trainer, the shared one).
    publish_result(minio_client, bucket, f"adapters/again/_kubelora/{first['metadata']['uid']}/result.json")
    publish_result(minio_client, bucket, "adapters/again/_kubelora/result.json")
    finish_pods(kubectl, namespace, old_job)
    done = wait_phase(kubectl, namespace, "again", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded" and done["status"]["adapter"]["digest"] == ADAPTER["digest"]
    # The old Job outlives its LoRAJob: a finalizer holds it while the garbage collector deletes it.
    old_name = old_job["metadata"]["name"]
    hold = '{"metadata": {"finalizers": ["test.kubelora.dev/hold"]}}'
    kubectl("patch", "job", old_name, "-n", namespace, "--type=merge", "-p", hold)
    try:
        kubectl("delete", "lorajob", "again", "-n", namespace, "--cascade=background", "--timeout=60s")
        wait_for(
            "the garbage collector to delete the old Job",
            lambda: get(kubectl, namespace, "job", old_name)["metadata"].get("deletionTimestamp"),
            timeout=90,
        )
        apply(kubectl, namespace, lorajob_manifest("again", bucket))
        second = get(kubectl, namespace, "lorajob", "again")
        assert second["metadata"]["uid"] != first["metadata"]["uid"]
        new_job = job_of(kubectl, namespace, "again")
        assert new_job["metadata"]["name"] != old_name
        assert [o["uid"] for o in new_job["metadata"]["ownerReferences"]] == [second["metadata"]["uid"]]
        # The complete old Job and its result sit right there; the new LoRAJob runs its own Job instead.
        running = wait_phase(kubectl, namespace, "again", "Training")
        assert running["status"]["jobName"] == new_job["metadata"]["name"] and "adapter" not in running["status"]
        held = get(kubectl, namespace, "job", old_name)
        assert held["metadata"]["ownerReferences"][0]["uid"] == first["metadata"]["uid"]
        # kwok's pod exits 0 with no trainer behind it: no result of its own, so never the old one.
        finish_pods(kubectl, namespace, new_job)
        failed = wait_phase(kubectl, namespace, "again", "Succeeded", "Failed")
        assert failed["status"]["phase"] == "Failed" and "adapter" not in failed["status"], failed["status"]
        assert next(c for c in failed["status"]["conditions"] if c["type"] == "Ready")["reason"] == "NoResult"
    finally:
        kubectl("patch", "job", old_name, "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')


def test_a_job_that_takes_the_name_is_a_conflict_never_adopted(devenv, crds, namespace, tmp_path, kubectl, bucket):
    """A Job of the same name that this LoRAJob does not control (made before the operator ran)."""
    from kubelora.operator import names

    apply(kubectl, namespace, lorajob_manifest("taken", bucket))
    uid = get(kubectl, namespace, "lorajob", "taken")["metadata"]["uid"]
    name = names.job_name("taken", uid)
    squatter = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"kubelora.dev/lorajob": "taken", "kubelora.dev/lorajob-uid": uid}},
        "spec": {
            "suspend": True,
            "template": {
                "metadata": {"labels": {"kubelora.dev/lorajob": "taken"}},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]},
            },
        },
    }
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(squatter))
    create_s3_secret(kubectl, namespace, devenv)
    from minio import Minio

    seed_inputs(Minio(devenv.minio_endpoint, devenv.minio_access_key, devenv.minio_secret_key, secure=False), bucket)
    proc = OperatorProcess(devenv, namespace, tmp_path)
    proc.start()
    try:
        conflict = wait_for(
            "the JobNameConflict condition",
            lambda: (
                (obj := get(kubectl, namespace, "lorajob", "taken")).get("status", {}).get("conditions")
                and next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")["reason"] == "JobNameConflict"
                and obj
            ),
        )
        assert conflict["status"]["phase"] == "Pending" and "jobName" not in conflict["status"]
        assert f"Job {namespace}/{name} exists but is not controlled by this LoRAJob" in conflict["status"]["message"]
        assert "JobNameConflict" in wait_for(
            "the JobNameConflict event", lambda: warning_events(kubectl, namespace, "taken")
        )
        assert [j["metadata"]["name"] for j in jobs_in(kubectl, namespace)] == [name]
        assert "ownerReferences" not in get(kubectl, namespace, "job", name)["metadata"]
    finally:
        proc.kill(signal.SIGTERM)


def test_a_253_character_name_gets_a_job_its_pods_and_events(operator, kubectl, namespace, bucket):
    name = ("support-classifier." * 14)[:252] + "x"
    assert len(name) == 253
    apply(kubectl, namespace, lorajob_manifest(name, bucket))
    running = wait_phase(kubectl, namespace, name, "Training")
    job = get(kubectl, namespace, "job", running["status"]["jobName"])
    assert len(job["metadata"]["name"]) <= 63
    assert job["metadata"]["labels"]["kubelora.dev/lorajob-uid"] == running["metadata"]["uid"]
    events = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    assert "Training" in {e["reason"] for e in events if e["involvedObject"]["name"] == name}


def test_an_edit_to_a_running_jobs_output_or_resources_is_refused(operator, kubectl, namespace, bucket):
    apply(kubectl, namespace, lorajob_manifest("fixed", bucket))
    running = wait_phase(kubectl, namespace, "fixed", "Training")
    for change, message in (
        ({"output": {"uri": f"s3://{bucket}/adapters/somewhere-else/"}}, "spec.output.uri: is immutable once set"),
        ({"resources": {"gpus": 2}}, "spec.resources: is immutable once set"),
        ({"retries": 5}, "spec.retries: is immutable once set"),
    ):
        refused = kubectl(
            "patch", "lorajob", "fixed", "-n", namespace, "--type=merge", "-p", json.dumps({"spec": change}),
            check=False,
        )  # fmt: skip
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr
    kubectl(
        "patch", "lorajob", "fixed", "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"output": {"deleteOnJobDeletion": True}}}),
    )  # fmt: skip
    after = wait_for(
        "the new generation to be observed",
        lambda: (
            (obj := get(kubectl, namespace, "lorajob", "fixed"))["status"].get("observedGeneration")
            == obj["metadata"]["generation"]
            and obj
        ),
    )
    assert after["spec"]["output"]["uri"] == running["spec"]["output"]["uri"]
    assert after["status"]["jobName"] == running["status"]["jobName"] and len(jobs_in(kubectl, namespace)) == 1


# --------------------------------------------------------------------------------------------------------------------
# Preflight: inputs in S3, read with the tenant's own credentials, before any Job exists.


def input_condition(kubectl, namespace, name, reason):
    def reached():
        obj = get(kubectl, namespace, "lorajob", name)
        found = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
        return obj if found.get("InputsFound", {}).get("reason") == reason else None

    return wait_for(f"{name}: InputsFound {reason}", reached)


def test_a_missing_base_model_or_dataset_is_refused_with_no_job(operator, kubectl, namespace, bucket, minio_client):
    apply(kubectl, namespace, lorajob_manifest("no-model", bucket, baseModel={
        "uri": f"s3://{bucket}/models/absent/", "secretRef": {"name": "minio-creds"}}))  # fmt: skip
    apply(kubectl, namespace, lorajob_manifest("no-data", bucket, dataset={
        "train": f"s3://{bucket}/data/later.jsonl", "secretRef": {"name": "minio-creds"}}))  # fmt: skip
    no_model = input_condition(kubectl, namespace, "no-model", "BaseModelNotFound")
    no_data = input_condition(kubectl, namespace, "no-data", "DatasetNotFound")
    for obj, field in ((no_model, "spec.baseModel.uri"), (no_data, "spec.dataset.train")):
        status = obj["status"]
        assert status["phase"] == "Pending" and "jobName" not in status
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "False" and status["message"].startswith(field), status["message"]
        assert f"read with Secret {namespace}/minio-creds" in status["message"]
    assert f"no config.json under s3://{bucket}/models/absent/" in no_model["status"]["message"]
    assert "BaseModelNotFound" in wait_for("the event", lambda: warning_events(kubectl, namespace, "no-model"))
    assert "DatasetNotFound" in wait_for("the event", lambda: warning_events(kubectl, namespace, "no-data"))
    assert jobs_in(kubectl, namespace) == []  # no Job, so no GPU asked for
    # Uploaded later: the job that was waiting for it starts on its own.
    seed = b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    minio_client.put_object(bucket, "data/later.jsonl", io.BytesIO(seed), len(seed))
    wait_phase(kubectl, namespace, "no-data", "Training", timeout=120)
    assert [j["metadata"]["ownerReferences"][0]["name"] for j in jobs_in(kubectl, namespace)] == ["no-data"]


def test_inputs_are_read_with_each_roles_own_secret_and_nothing_more_is_disclosed(
    operator, kubectl, namespace, bucket, devenv
):
    """The dataset's Secret has a wrong secret key: its location is refused by preflight, named with the
    storage's answer; the model, read with its own right Secret, is not the problem. No Secret, no keys."""
    kubectl(
        "create", "secret", "generic", "stale-creds", "-n", namespace,
        f"--from-literal=accessKey={devenv.minio_access_key}", "--from-literal=secretKey=rotated-long-ago",
        f"--from-literal=endpoint={devenv.minio_endpoint}",
    )  # fmt: skip
    apply(kubectl, namespace, lorajob_manifest("stale", bucket, dataset={
        "train": f"s3://{bucket}/data/train.jsonl", "secretRef": {"name": "stale-creds"}}))  # fmt: skip
    stale = input_condition(kubectl, namespace, "stale", "DatasetAccessDenied")["status"]["message"]
    assert stale.startswith(f"spec.dataset.train: s3://{bucket}/data/train.jsonl cannot be read with Secret")
    assert "SignatureDoesNotMatch" in stale or "AccessDenied" in stale, stale
    assert "spec.baseModel" not in stale and "rotated-long-ago" not in stale
    # No secretRef on the model: read anonymously, never with the operator's keys; the private bucket refuses.
    apply(kubectl, namespace, lorajob_manifest("anonymous", bucket, baseModel={"uri": f"s3://{bucket}/base/"}))
    anonymous = input_condition(kubectl, namespace, "anonymous", "BaseModelAccessDenied")["status"]["message"]
    assert f"s3://{bucket}/base/config.json cannot be read without credentials (no secretRef)" in anonymous, anonymous
    assert jobs_in(kubectl, namespace) == []
