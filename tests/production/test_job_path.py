"""LoRAJob → Job → pod on a kwok GPU node → trainer container from its image → MinIO → status."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from kubelora.trainer import tiny
from tests.conftest import wait_for
from tests.operator.harness import get, pods_of, wait_phase
from tests.trainer.helpers import make_spec, s3_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.trainer]

SECRET = {"name": "minio-creds"}


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    model = tiny.build_tiny_model(root / "model")
    task = tiny.write_task(root / "task", n_train=320, n_test=32)
    return {"model": model, "train": task["train"], "test": task["test"]}


def lorajob(name: str, bucket: str, base: str, train: str, test: str, **overrides: Any) -> dict[str, Any]:
    spec = make_spec(base=base, train=train, test=test, output=f"s3://{bucket}/adapters/{name}/")["spec"]
    spec["baseModel"]["secretRef"] = SECRET
    spec["dataset"]["secretRef"] = SECRET
    spec["output"]["secretRef"] = SECRET
    spec["resources"] = {"gpus": 1, "gpuType": "NVIDIA-A100-SXM4-80GB"}
    spec["retries"] = 0
    spec.update(overrides)
    return {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRAJob", "metadata": {"name": name}, "spec": spec}


def apply(kubectl: Any, namespace: str, manifest: dict[str, Any]) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def upload(minio_client: Any, bucket: str, task: dict[str, Path]) -> dict[str, str]:
    return {
        "base": tiny.upload_dir(minio_client, bucket, "models/tiny", task["model"]),
        "train": tiny.upload_file(minio_client, bucket, "data/train.jsonl", task["train"]),
        "test": tiny.upload_file(minio_client, bucket, "data/test.jsonl", task["test"]),
    }


def trainer_container_status(kubectl: Any, namespace: str, name: str) -> dict[str, Any]:
    pods = pods_of(kubectl, namespace, name)
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    statuses = pods[0]["status"].get("containerStatuses") or []
    return dict(next(s for s in statuses if s["name"] == "trainer"))


#: The longest name Kubernetes allows (a DNS subdomain): its Job, labels, pods, events and S3 keys all work.
LONG_NAME = ("support-tickets." * 16)[:252] + "x"


def test_lorajob_trains_in_the_trainer_image_and_status_carries_its_digest(
    operator, kubelet, images, kubectl, namespace, bucket, minio_client, tiny_task
):
    """The happy path, under a 253-character name."""
    name = LONG_NAME
    assert len(name) == 253
    uris = upload(minio_client, bucket, tiny_task)
    apply(kubectl, namespace, lorajob(name, bucket, uris["base"], uris["train"], uris["test"]))
    steps_seen: set[int] = set()

    def finished() -> dict[str, Any] | None:
        obj = get(kubectl, namespace, "lorajob", name)
        status = obj.get("status", {})
        if status.get("progress", {}).get("step"):
            steps_seen.add(int(status["progress"]["step"]))
        return obj if status.get("phase") in ("Succeeded", "Failed") else None

    done = wait_for("the training run to finish", finished, timeout=900, interval=0.5)
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    # Progress reached status while the pod trained (the trainer reports to S3; no API credentials in the pod).
    assert len(steps_seen) >= 2, f"progress should be reported while training, saw steps {steps_seen}"
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 160
    assert status["gpuSeconds"] > 0 and status["costEstimate"].endswith("USD")
    events = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    assert {"Training", "Succeeded"} <= {e["reason"] for e in events if e["involvedObject"]["name"] == name}

    # The digest in status is the sha256 of the manifest the trainer wrote, and every file it lists is there.
    # It is in the output's digest directory, sha256/<hex>/, and the pointer beside names it.
    key = f"adapters/{name}/sha256/{status['adapter']['digest'].removeprefix('sha256:')}"
    assert status["adapter"]["uri"] == f"s3://{bucket}/{key}/"
    assert status["eval"]["samplesUri"] == f"s3://{bucket}/{key}/eval/samples.jsonl"
    raw = s3_bytes(minio_client, bucket, f"{key}/kubelora-manifest.json")
    assert status["adapter"]["digest"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert json.loads(raw)["job"]["name"] == name
    pointer = json.loads(s3_bytes(minio_client, bucket, f"adapters/{name}/kubelora-latest.json"))
    assert pointer == {**pointer, "digest": status["adapter"]["digest"], "uri": status["adapter"]["uri"]}
    for entry in json.loads(raw)["files"]:
        data = s3_bytes(minio_client, bucket, f"{key}/{entry['path']}")
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
    assert status["eval"]["passed"] is True and status["eval"]["adapter"]["exact_match"] >= 0.8

    # The report went under this LoRAJob's UID, where a LoRAJob re-created with this name will never look.
    report = json.loads(
        s3_bytes(minio_client, bucket, f"adapters/{name}/_kubelora/{done['metadata']['uid']}/result.json")
    )
    assert report["adapter"]["digest"] == status["adapter"]["digest"]

    # It ran as a pod of the Job the operator made, from the trainer image, and exited 0 for real.
    job = get(kubectl, namespace, "job", status["jobName"])
    assert len(job["metadata"]["name"]) <= 63
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == images["trainer"]
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in job["status"]["conditions"])
    terminated = trainer_container_status(kubectl, namespace, name)["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"

    # A finished run never starts again: its Job goes (TTL, a cleanup, a person), its spec is touched, and it
    # stays Succeeded with the same adapter, and no second Job (a second GPU run) appears.
    kubectl("delete", "job", job["metadata"]["name"], "-n", namespace, "--wait=true", "--timeout=60s")
    kubectl(
        "patch", "lorajob", name, "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"output": {"deleteOnJobDeletion": True}}}),
    )  # fmt: skip
    touched = wait_for(
        "the new generation to be observed",
        lambda: (
            (obj := get(kubectl, namespace, "lorajob", name))["status"].get("observedGeneration")
            == obj["metadata"]["generation"]
            and obj
        ),
    )
    assert touched["metadata"]["generation"] > done["metadata"]["generation"]
    assert touched["status"]["phase"] == "Succeeded" and touched["status"]["adapter"] == status["adapter"]
    assert touched["status"]["completionTime"] == status["completionTime"]
    jobs = json.loads(kubectl("get", "jobs", "-n", namespace, "-o", "json").stdout)["items"]
    assert jobs == [], [j["metadata"]["name"] for j in jobs]


def test_trainer_exit_code_3_fails_the_job_at_once_with_the_trainers_message(
    operator, kubelet, kubectl, namespace, bucket, minio_client, tiny_task, tmp_path
):
    uris = upload(minio_client, bucket, tiny_task)
    rows = tiny_task["train"].read_text().splitlines()
    rows[16] = json.dumps({"msgs": [{"role": "user", "content": "hi"}]})
    (tmp_path / "bad.jsonl").write_text("\n".join(rows) + "\n")
    bad = tiny.upload_file(minio_client, bucket, "data/bad.jsonl", tmp_path / "bad.jsonl")
    apply(kubectl, namespace, lorajob("malformed", bucket, uris["base"], bad, uris["test"], retries=3))
    failed = wait_phase(kubectl, namespace, "malformed", "Failed", "Succeeded", timeout=600)
    status = failed["status"]
    assert status["phase"] == "Failed", status
    # Exit code 3 is "a retry cannot fix this": podFailurePolicy FailJob, so one attempt despite retries: 3.
    job = get(kubectl, namespace, "job", status["jobName"])
    reasons = {c["reason"] for c in job["status"]["conditions"] if c["status"] == "True"}
    assert "PodFailurePolicy" in reasons, job["status"]
    assert status["attempts"] == 1
    terminated = trainer_container_status(kubectl, namespace, "malformed")["state"]["terminated"]
    assert terminated["exitCode"] == 3
    # The kubelet's termination message (here the log's tail: FallbackToLogsOnError) names the row ...
    assert "bad.jsonl:17" in terminated["message"], terminated
    # ... and the LoRAJob says what is wrong, with the trainer's own reason, file and line.
    assert status["message"].startswith('bad.jsonl:17: missing "messages"'), status["message"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "MalformedDataset", ready


def test_a_secret_without_the_key_is_named_and_no_job_is_created(operator, kubectl, namespace, bucket, devenv):
    kubectl(
        "create", "secret", "generic", "typo-creds", "-n", namespace,
        "--from-literal=access_key=x", f"--from-literal=secretKey={devenv.minio_secret_key}",
    )  # fmt: skip
    manifest = lorajob("typo", bucket, f"s3://{bucket}/m/", f"s3://{bucket}/t.jsonl", f"s3://{bucket}/e.jsonl")
    manifest["spec"]["dataset"]["secretRef"] = {"name": "typo-creds"}
    apply(kubectl, namespace, manifest)
    pending = wait_for(
        "the SecretInvalid condition",
        lambda: (
            (obj := get(kubectl, namespace, "lorajob", "typo")).get("status", {}).get("phase") == "Pending"
            and any(c.get("reason") == "SecretInvalid" for c in obj["status"].get("conditions", []))
            and obj
        ),
    )
    assert f"spec.dataset.secretRef: Secret {namespace}/typo-creds has no key accessKey" in pending["status"]["message"]
    assert json.loads(kubectl("get", "jobs", "-n", namespace, "-o", "json").stdout)["items"] == []


def test_a_pvc_dataset_trains(operator, kubelet, kubectl, namespace, bucket, minio_client, tiny_task, tmp_path):
    """dataset.train and eval.testSet on a PersistentVolumeClaim, mounted read-only into the trainer pod."""
    volume = tmp_path / "pv"
    (volume / "support").mkdir(parents=True)
    for name in ("train", "test"):
        (volume / "support" / f"{name}.jsonl").write_bytes(tiny_task[name].read_bytes())
    os.chmod(tmp_path, 0o755)
    for path in (volume, volume / "support"):
        path.chmod(0o755)
    pv_name = f"{namespace}-data"
    kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
            "hostPath": {"path": str(volume)}, "claimRef": {"namespace": namespace, "name": "datasets"},
        },
    }))  # fmt: skip
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "datasets"},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv_name,
                 "resources": {"requests": {"storage": "1Gi"}}},
    }))  # fmt: skip
    try:
        wait_for(
            "the claim to bind",
            lambda: get(kubectl, namespace, "pvc", "datasets").get("status", {}).get("phase") == "Bound",
        )
        base = tiny.upload_dir(minio_client, bucket, "models/tiny", tiny_task["model"])
        manifest = lorajob(
            "from-pvc", bucket, base, "pvc://datasets/support/train.jsonl", "pvc://datasets/support/test.jsonl"
        )
        del manifest["spec"]["dataset"]["secretRef"]  # a claim needs no S3 credentials
        apply(kubectl, namespace, manifest)
        done = wait_phase(kubectl, namespace, "from-pvc", "Succeeded", "Failed", timeout=900)
        assert done["status"]["phase"] == "Succeeded", done["status"]
        assert done["status"]["eval"]["adapter"]["exact_match"] >= 0.8
        pod = pods_of(kubectl, namespace, "from-pvc")[0]
        mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["mountPath"] == "/mnt/pvc/datasets")
        assert mount["readOnly"] is True
    finally:
        kubectl("delete", "pv", pv_name, "--wait=false", check=False)
