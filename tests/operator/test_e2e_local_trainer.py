"""A real trainer run through the operator's local executor: progress, eval results and digest in status."""

from __future__ import annotations

import hashlib
import json
import signal

import pytest

from kubelora.trainer import tiny
from tests.conftest import wait_for
from tests.operator.harness import OperatorProcess, create_s3_secret, get, install_crds

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.trainer]


def test_local_executor_runs_the_real_trainer(devenv, namespace, kubectl, minio_client, bucket, tmp_path):
    install_crds(devenv)
    tiny.build_tiny_model(tmp_path / "model")
    task = tiny.write_task(tmp_path / "data", n_train=320, n_test=32)
    base = tiny.upload_dir(minio_client, bucket, "base", tmp_path / "model")
    train = tiny.upload_file(minio_client, bucket, "data/train.jsonl", task["train"])
    test = tiny.upload_file(minio_client, bucket, "data/test.jsonl", task["test"])
    create_s3_secret(kubectl, namespace, devenv)
    operator = OperatorProcess(devenv, namespace, tmp_path, executor="local", localWorkdir=str(tmp_path / "runs"))
    operator.start()
    try:
        manifest = {
            "apiVersion": "kubelora.dev/v1alpha1",
            "kind": "LoRAJob",
            "metadata": {"name": "tickets"},
            "spec": {
                "baseModel": {"uri": base, "secretRef": {"name": "minio-creds"}},
                "dataset": {"train": train, "format": "chat", "secretRef": {"name": "minio-creds"}},
                "method": "lora",
                "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
                "training": {
                    "maxSteps": 160,
                    "learningRate": 0.005,
                    "batchSize": 16,
                    "maxSeqLength": 64,
                    "checkpointEverySteps": 50,
                    "gradientCheckpointing": False,
                    "seed": 7,
                },
                "resources": {"gpus": 0},
                "output": {"uri": f"s3://{bucket}/adapters/tickets/", "secretRef": {"name": "minio-creds"}},
                "eval": {
                    "testSet": test,
                    "metrics": ["exact_match"],
                    "maxNewTokens": 4,
                    "gates": [{"metric": "exact_match", "minImprovementOverBase": 0.3}],
                },
            },
        }
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
        steps_seen: set[int] = set()

        def finished() -> dict | None:
            obj = get(kubectl, namespace, "lorajob", "tickets")
            status = obj.get("status", {})
            if status.get("progress", {}).get("step"):
                steps_seen.add(int(status["progress"]["step"]))
            return obj if status.get("phase") in ("Succeeded", "Failed") else None

        done = wait_for("the training run to finish", finished, timeout=900, interval=1)
        status = done["status"]
        assert status["phase"] == "Succeeded", f"{status}\n{operator.log()[-3000:]}"
        assert len(steps_seen) >= 2, f"progress should be reported while training, saw steps {steps_seen}"
        assert status["progress"]["step"] == status["progress"]["totalSteps"] == 160
        assert status["eval"]["passed"] is True
        assert status["eval"]["adapter"]["exact_match"] >= status["eval"]["base"]["exact_match"] + 0.3
        response = minio_client.get_object(bucket, "adapters/tickets/kubelora-manifest.json")
        manifest_bytes = response.read()
        response.close()
        assert status["adapter"]["digest"] == "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
        assert status["adapter"]["trainableParameters"] > 0
        events = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
        assert {"Training", "Succeeded"} <= {e["reason"] for e in events if e["involvedObject"]["name"] == "tickets"}
    finally:
        operator.kill(signal.SIGTERM)
