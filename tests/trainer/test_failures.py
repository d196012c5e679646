"""The trainer fails fast with a reason, a message and a non-zero exit code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kubelora.trainer import tiny
from tests.trainer.helpers import TinyKit, make_spec, run_trainer

pytestmark = pytest.mark.trainer


def local_spec(kit: TinyKit, tmp_path: Path, **kw: Any) -> dict[str, Any]:
    return make_spec(base=f"file://{kit.model}", train=f"file://{kit.train}", output=f"file://{tmp_path}/out", **kw)


def assert_error(run: Any, reason: str, exit_code: int = 3) -> str:
    assert run.returncode == exit_code, run.stderr[-3000:]
    err = run.error
    assert err["reason"] == reason
    assert not run.of("result")
    return str(err["message"])


@pytest.mark.e2e
def test_malformed_row_reports_file_and_line(
    tiny_kit: TinyKit, tmp_path: Path, minio_client: Any, bucket: str, s3_env: dict[str, str]
) -> None:
    rows = [json.dumps(r) for r in tiny.make_tickets(20)]
    rows[16] = json.dumps({"msgs": [{"role": "user", "content": "hi"}]})
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    base = tiny.upload_dir(minio_client, bucket, "models/tiny", tiny_kit.model)
    train = tiny.upload_file(minio_client, bucket, "data/train.jsonl", tmp_path / "train.jsonl")
    run = run_trainer(
        tmp_path,
        make_spec(base=base, train=train, output=f"s3://{bucket}/out/"),
        env={**s3_env, "KUBELORA_TERMINATION_LOG": str(tmp_path / "termination-log")},
    )
    assert assert_error(run, "MalformedDataset") == 'train.jsonl:17: missing "messages"'
    # the error is mirrored next to the output, and summarised for Kubernetes
    result = json.loads(minio_client.get_object(bucket, "out/_kubelora/result.json").read())
    assert result["type"] == "error" and result["message"] == 'train.jsonl:17: missing "messages"'
    assert json.loads((tmp_path / "termination-log").read_text())["reason"] == "MalformedDataset"
    # it failed before the weights were fetched
    assert not list((tmp_path / "run" / "work").rglob("*.safetensors"))


@pytest.mark.e2e
def test_unknown_target_modules_fail_before_weights_move(
    tiny_kit: TinyKit, tmp_path: Path, minio_client: Any, bucket: str, s3_env: dict[str, str]
) -> None:
    base = tiny.upload_dir(minio_client, bucket, "models/tiny", tiny_kit.model)
    train = tiny.upload_file(minio_client, bucket, "data/train.jsonl", tiny_kit.train)
    spec = make_spec(base=base, train=train, output=f"s3://{bucket}/out/", lora__targetModules=["q_proj", "c_attn"])
    run = run_trainer(tmp_path, spec, env=s3_env)
    msg = assert_error(run, "UnknownTargetModules")
    assert "['c_attn']" in msg and "q_proj" in msg.split("it has")[1]
    assert [p.name for p in (tmp_path / "run" / "work" / "base-model").iterdir()] == ["config.json"]


def test_missing_base_model(tiny_kit: TinyKit, tmp_path: Path) -> None:
    spec = local_spec(tiny_kit, tmp_path)
    spec["spec"]["baseModel"]["uri"] = f"file://{tmp_path}/nowhere"
    msg = assert_error(run_trainer(tmp_path, spec), "BaseModelNotFound")
    assert "no config.json" in msg


def test_pickled_weights_are_refused(tiny_kit: TinyKit, tmp_path: Path) -> None:
    model = tmp_path / "pickled"
    shutil.copytree(tiny_kit.model, model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    spec = local_spec(tiny_kit, tmp_path)
    spec["spec"]["baseModel"]["uri"] = f"file://{model}"
    assert "only safetensors" in assert_error(run_trainer(tmp_path, spec), "UnsafeWeights")


def test_rank_above_the_limit(tiny_kit: TinyKit, tmp_path: Path) -> None:
    run = run_trainer(tmp_path, local_spec(tiny_kit, tmp_path, lora__rank=64), env={"KUBELORA_MAX_LORA_RANK": "32"})
    assert assert_error(run, "RankTooLarge") == "spec.lora.rank: 64 is above the limit of 32"


def test_memory_estimate_beyond_the_gpu(tiny_kit: TinyKit, tmp_path: Path) -> None:
    run = run_trainer(tmp_path, local_spec(tiny_kit, tmp_path), env={"KUBELORA_GPU_MEMORY_BYTES": str(8 << 20)})
    msg = assert_error(run, "InsufficientGPUMemory")
    assert "exceeds the device's 0.01 GiB" in msg and "weights" in msg
    # the estimate is reported before the failure
    est = run.of("estimate")[0]
    assert est["trainableParameters"] == 49152 and est["totalBytesPerGpu"] > 8 << 20


def test_qlora_without_bitsandbytes(tiny_kit: TinyKit, tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "bitsandbytes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('bitsandbytes is broken here')\n")
    from tests.trainer.helpers import REPO

    env = {"PYTHONPATH": f"{fake.parent}:{REPO / 'operator'}:{REPO / 'trainer'}"}
    import subprocess
    import sys

    from tests.trainer.helpers import Run, trainer_env, write_spec

    spec = write_spec(tmp_path / "run", local_spec(tiny_kit, tmp_path, method="qlora"))
    e = trainer_env()
    e.update(env)
    proc = subprocess.run(
        [sys.executable, "-m", "kubelora.trainer", "--spec", str(spec), "--report-file", str(tmp_path / "r.jsonl")],
        env=e,
        capture_output=True,
        text=True,
        timeout=300,
    )
    run = Run(proc.returncode, proc.stdout, proc.stderr, tmp_path / "r.jsonl")
    assert "bitsandbytes is broken here" in assert_error(run, "QuantizationUnavailable")


def test_bad_spec_and_usage(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    run = run_trainer(tmp_path, {"spec": {"baseModel": {"uri": "file:///x"}}})
    assert "spec.dataset: Field required" in assert_error(run, "InvalidSpec")
