"""End to end through ``python -m kubelora.trainer`` against the real MinIO, on the tiny task."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from kubelora.trainer import tiny
from tests.trainer.helpers import (
    Run,
    TinyKit,
    make_spec,
    read_events,
    run_trainer,
    s3_bytes,
    s3_json,
    start_trainer,
    wait_for,
    write_spec,
)

pytestmark = [pytest.mark.trainer, pytest.mark.e2e, pytest.mark.filterwarnings("ignore::FutureWarning")]


def upload_kit(client: Any, bucket: str, kit: TinyKit, shuffled: bool = False) -> dict[str, str]:
    return {
        "base": tiny.upload_dir(client, bucket, "models/tiny", kit.model),
        "train": tiny.upload_file(client, bucket, "data/train.jsonl", kit.shuffled_train if shuffled else kit.train),
        "test": tiny.upload_file(client, bucket, "data/test.jsonl", kit.test),
        "regression": tiny.upload_file(client, bucket, "data/regression.jsonl", kit.regression),
    }


def spec_for(uris: dict[str, str], bucket: str, out: str = "adapters/a", **kw: Any) -> dict[str, Any]:
    return make_spec(output=f"s3://{bucket}/{out}/", **uris, **kw)


def digest_dir(run: Run, bucket: str, prefix: str) -> str:
    """The key prefix of the run's digest directory, checked against the reported URI: ``<prefix>/sha256/<hex>``."""
    digest = run.result["adapter"]["digest"]
    key = f"{prefix}/sha256/{digest.removeprefix('sha256:')}"
    assert run.result["adapter"]["uri"] == f"s3://{bucket}/{key}/"
    return key


def check_digest_dir(client: Any, bucket: str, key: str, digest: str) -> dict[str, Any]:
    """The manifest in ``key`` hashes to ``digest``, and every file it lists is there with its size and sha256."""
    raw = s3_bytes(client, bucket, f"{key}/kubelora-manifest.json")
    assert digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    manifest = json.loads(raw)
    for f in manifest["files"]:
        data = s3_bytes(client, bucket, f"{key}/{f['path']}")
        assert len(data) == f["sizeBytes"], f["path"]
        assert hashlib.sha256(data).hexdigest() == f["sha256"], f["path"]
    stored = {o.object_name[len(key) + 1 :] for o in client.list_objects(bucket, prefix=f"{key}/", recursive=True)}
    assert stored == {f["path"] for f in manifest["files"]} | {"kubelora-manifest.json"}
    return dict(manifest)


def check_published(client: Any, bucket: str, prefix: str, run: Run) -> dict[str, Any]:
    """The adapter is in its digest directory, complete; the pointer names it; the report is beside it."""
    result = run.result
    key = digest_dir(run, bucket, prefix)
    manifest = check_digest_dir(client, bucket, key, result["adapter"]["digest"])
    paths = {f["path"] for f in manifest["files"]}
    assert {"adapter_model.safetensors", "adapter_config.json", "eval/results.json", "eval/samples.jsonl"} <= paths
    assert result["adapter"]["sizeBytes"] == sum(
        f["sizeBytes"] for f in manifest["files"] if not f["path"].startswith(("eval/", "merged/"))
    )
    pointer = s3_json(client, bucket, f"{prefix}/kubelora-latest.json")
    assert pointer == {
        **pointer,
        "kind": "AdapterPointer",
        "digest": result["adapter"]["digest"],
        "uri": result["adapter"]["uri"],
        "job": {"name": "t", "namespace": None},
    }
    # the reported result is also next to the adapter, for the operator
    assert s3_json(client, bucket, f"{prefix}/_kubelora/result.json")["adapter"] == result["adapter"]
    assert (
        s3_json(client, bucket, f"{prefix}/_kubelora/progress.json")["progress"]["step"]
        == run.result["training"]["steps"]
    )
    return manifest


def test_lora_end_to_end(
    tiny_kit: TinyKit, tmp_path: Path, minio_client: Any, bucket: str, s3_env: dict[str, str]
) -> None:
    uris = upload_kit(minio_client, bucket, tiny_kit)
    run = run_trainer(
        tmp_path, spec_for(uris, bucket), env={**s3_env, "KUBELORA_TERMINATION_LOG": str(tmp_path / "termination-log")}
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert not run.of("error")
    phases = [e["phase"] for e in run.of("phase")]
    assert phases[0] == "Training" and phases[-2:] == ["Evaluating", "Publishing"]
    ev = run.result["eval"]
    assert ev["passed"] is True and ev["verdict"] == "Passed"
    # the tiny base cannot do the task; the adapter can
    assert ev["base"]["exact_match"] <= 0.3
    assert ev["adapter"]["exact_match"] >= 0.85
    assert ev["adapter"]["accuracy"] >= 0.85 and ev["adapter"]["loss"] < ev["base"]["loss"]
    assert [g["passed"] for g in ev["gates"]] == [True, True, True]
    assert ev["gates"][-1]["rule"] == "regression.maxLossIncrease"
    training = run.result["training"]
    assert training["steps"] == training["totalSteps"] == 160 and training["resumedFromStep"] is None

    adapter = run.result["adapter"]
    assert adapter["rank"] == 8
    assert adapter["trainableParameters"] == 49152 == run.of("estimate")[-1]["trainableParameters"]
    manifest = check_published(minio_client, bucket, "adapters/a", run)
    key = digest_dir(run, bucket, "adapters/a")
    assert (
        manifest["baseModel"]["configSha256"]
        == hashlib.sha256((tiny_kit.model / "config.json").read_bytes()).hexdigest()
    )
    assert manifest["datasets"]["train"]["sha256"] == hashlib.sha256(tiny_kit.train.read_bytes()).hexdigest()
    assert manifest["hyperparameters"]["rank"] == 8 and manifest["libraries"]["peft"]
    assert manifest["eval"]["passed"] is True and "samplesUri" not in manifest["eval"]
    config = s3_json(minio_client, bucket, f"{key}/adapter_config.json")
    assert config["base_model_name_or_path"] == uris["base"].rstrip("/") and config["r"] == 8

    samples = [json.loads(x) for x in s3_bytes(minio_client, bucket, f"{key}/eval/samples.jsonl").splitlines()]
    assert len(samples) == 10 and ev["samplesUri"] == f"s3://{bucket}/{key}/eval/samples.jsonl"
    assert set(samples[0]) >= {"prompt", "messages", "expected", "base", "adapter"}
    assert sum(s["adapter"] == s["expected"] for s in samples) >= 7
    term = json.loads((tmp_path / "termination-log").read_text())
    assert term == {**term, "reason": "Succeeded", "digest": adapter["digest"], "passed": True}

    # the published adapter loads with peft and reproduces the recorded predictions
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = tmp_path / "downloaded"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        local.mkdir(exist_ok=True)
        (local / name).write_bytes(s3_bytes(minio_client, bucket, f"{key}/{name}"))
    tok = AutoTokenizer.from_pretrained(tiny_kit.model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_kit.model), local).eval()
    for s in samples[:3]:
        ids = tok(s["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(
            input_ids=ids,
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip() == s["adapter"]


def test_dora_end_to_end(
    tiny_kit: TinyKit, tmp_path: Path, minio_client: Any, bucket: str, s3_env: dict[str, str]
) -> None:
    uris = upload_kit(minio_client, bucket, tiny_kit)
    # vLLM serves DoRA only merged: a DoRA job publishes its merged model, and is evaluated as that
    manifest = spec_for(uris, bucket, out="dora", method="dora", lora__rsLoRA=True, output__mergedModel=True)
    run = run_trainer(tmp_path, manifest, env=s3_env)
    assert run.returncode == 0, run.stderr[-3000:]
    ev = run.result["eval"]
    assert ev["passed"] is True and ev["adapter"]["exact_match"] >= 0.85
    results = s3_json(minio_client, bucket, f"{digest_dir(run, bucket, 'dora')}/eval/results.json")
    assert results["scoredOn"] == "merged"
    check = s3_json(minio_client, bucket, f"{digest_dir(run, bucket, 'dora')}/merged/kubelora-merge-check.json")
    assert check["passed"] is True and check["relative"] <= check["tolerance"] == 1e-3
    # DoRA adds one magnitude vector per adapted layer: 7 per block x 3 blocks, as long as the layer's output
    assert run.result["adapter"]["trainableParameters"] == 49152 + 3 * (128 + 64 + 64 + 128 + 256 + 256 + 128)
    check_published(minio_client, bucket, "dora", run)
    key = digest_dir(run, bucket, "dora")
    config = s3_json(minio_client, bucket, f"{key}/adapter_config.json")
    assert config["use_dora"] is True and config["use_rslora"] is True

    from safetensors import safe_open

    (tmp_path / "w.safetensors").write_bytes(s3_bytes(minio_client, bucket, f"{key}/adapter_model.safetensors"))
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        assert sum("lora_magnitude_vector" in k for k in f.keys()) == 21  # noqa: SIM118


def test_shuffled_labels_fail_the_gate(
    tiny_kit: TinyKit, tmp_path: Path, minio_client: Any, bucket: str, s3_env: dict[str, str]
) -> None:
    uris = upload_kit(minio_client, bucket, tiny_kit, shuffled=True)
    run = run_trainer(
        tmp_path,
        spec_for(uris, bucket),
        env={**s3_env, "KUBELORA_TERMINATION_LOG": str(tmp_path / "term")},
        args=("--gates-failed-exit-code", "4"),
    )
    # gates failing is an outcome, not an error: a result (published adapter) with passed=false
    assert run.returncode == 4, run.stderr[-3000:]
    assert not run.of("error")
    ev = run.result["eval"]
    assert ev["passed"] is False and ev["verdict"] == "Failed"
    assert ev["adapter"]["exact_match"] < 0.6
    assert ev["gates"][0] == {**ev["gates"][0], "metric": "exact_match", "rule": "min", "passed": False}
    key = digest_dir(run, bucket, "adapters/a")
    assert s3_json(minio_client, bucket, f"{key}/kubelora-manifest.json")["eval"]["passed"] is False
    term = json.loads((tmp_path / "term").read_text())
    assert term["reason"] == "GatesFailed" and "exact_match:min" in term["failedGates"]


def test_kill_and_resume_from_checkpoint(
    tiny_kit: TinyKit, tmp_path: Path, minio_client: Any, bucket: str, s3_env: dict[str, str]
) -> None:
    uris = upload_kit(minio_client, bucket, tiny_kit)
    manifest = spec_for(uris, bucket, out="resumed")
    spec = write_spec(tmp_path / "a", manifest)
    report1 = tmp_path / "a" / "report.jsonl"
    # slow the steps down a little so the kill lands between checkpoints 40 and 80
    proc = start_trainer(spec, tmp_path / "a" / "work", report1, env={**s3_env, "KUBELORA_DEBUG_STEP_SLEEP": "0.05"})
    try:
        wait_for(
            "the first checkpoint", lambda: [e for e in read_events(report1) if e["type"] == "checkpoint"], timeout=180
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    first = read_events(report1)
    assert not [e for e in first if e["type"] in ("result", "error")]
    assert [e["step"] for e in first if e["type"] == "checkpoint"] == [40]
    marker = s3_json(minio_client, bucket, "resumed/checkpoints/checkpoint-40/COMPLETE")
    assert marker["step"] == 40 and any(f["name"] == "optimizer.pt" for f in marker["files"])

    # a new pod: fresh workdir, same spec
    second = run_trainer(tmp_path, manifest, name="b", env=s3_env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [e["step"] for e in second.of("resumed")] == [40]
    assert second.of("progress")[0]["step"] > 40  # no step before the checkpoint ran again
    assert [e["step"] for e in second.of("checkpoint")] == [80, 120, 160]
    training = second.result["training"]
    assert training["steps"] == training["totalSteps"] == 160 and training["resumedFromStep"] == 40
    check_published(minio_client, bucket, "resumed", second)

    # without replayed data the resumed run ends where an uninterrupted one does
    reference = run_trainer(tmp_path, spec_for(uris, bucket, out="reference"), name="c", env=s3_env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert reference.result["training"]["steps"] == 160
    import torch
    from safetensors.torch import load

    a = load(s3_bytes(minio_client, bucket, f"{digest_dir(second, bucket, 'resumed')}/adapter_model.safetensors"))
    b = load(s3_bytes(minio_client, bucket, f"{digest_dir(reference, bucket, 'reference')}/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert second.result["eval"]["adapter"] == pytest.approx(reference.result["eval"]["adapter"], rel=1e-3)


def test_two_trainings_to_one_output_keep_both_adapters(
    tiny_kit: TinyKit, tmp_path: Path, minio_client: Any, bucket: str, s3_env: dict[str, str]
) -> None:
    """A second training to the same output publishes beside the first; the pointer moves, nothing is overwritten."""
    uris = upload_kit(minio_client, bucket, tiny_kit)
    short = {"max_steps": 20, "checkpoint_every": 20, "gates": [{"metric": "exact_match", "min": 0.0}]}
    first = run_trainer(tmp_path, spec_for(uris, bucket, out="shared", **short), name="first", env=s3_env)
    assert first.returncode == 0, first.stderr[-3000:]
    first_key = digest_dir(first, bucket, "shared")
    first_manifest = check_digest_dir(minio_client, bucket, first_key, first.result["adapter"]["digest"])
    first_objects = {
        o.object_name: o.etag for o in minio_client.list_objects(bucket, prefix=f"{first_key}/", recursive=True)
    }
    assert s3_json(minio_client, bucket, "shared/kubelora-latest.json")["digest"] == first.result["adapter"]["digest"]

    second = run_trainer(
        tmp_path,
        spec_for(uris, bucket, out="shared", training__seed=8, training__learningRate=0.004, **short),
        name="second",
        env=s3_env,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    second_key = digest_dir(second, bucket, "shared")
    assert second_key != first_key
    second_manifest = check_digest_dir(minio_client, bucket, second_key, second.result["adapter"]["digest"])
    assert (first_manifest["hyperparameters"]["seed"], second_manifest["hyperparameters"]["seed"]) == (7, 8)
    # the first adapter is still there, byte for byte, and still hashes to its own digest
    assert {
        o.object_name: o.etag for o in minio_client.list_objects(bucket, prefix=f"{first_key}/", recursive=True)
    } == first_objects
    check_digest_dir(minio_client, bucket, first_key, first.result["adapter"]["digest"])
    digests = {o.object_name for o in minio_client.list_objects(bucket, prefix="shared/sha256/")}
    assert digests == {f"{first_key}/", f"{second_key}/"}
    pointer = s3_json(minio_client, bucket, "shared/kubelora-latest.json")
    assert pointer["digest"] == second.result["adapter"]["digest"] and pointer["uri"] == second.result["adapter"]["uri"]
    assert second.result["eval"]["samplesUri"] == f"s3://{bucket}/{second_key}/eval/samples.jsonl"


def test_publishing_the_same_content_again_sends_nothing_and_changes_nothing(
    tmp_path: Path, minio_client: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubelora.storage import S3Store
    from kubelora.trainer import publish

    class Counting(S3Store):
        uploads: list[str] = []

        def upload(self, path: Path, loc: Any, **kw: Any) -> Any:
            Counting.uploads.append(loc.key)
            return super().upload(path, loc, **kw)

    monkeypatch.setattr(publish, "store_for", lambda loc, role=None: Counting(minio_client))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights" * 1000)
    (adapter / "adapter_config.json").write_text("{}")
    eval_doc = {"eval": {"passed": True}}
    files = publish.stage(tmp_path, adapter, "org/base", eval_doc, [{"prompt": "p", "adapter": "a"}])
    kw: dict[str, Any] = {"trainable_parameters": 1, "rank": 1, "base_identity": "org/base", "workdir": tmp_path}
    body = {"kind": "AdapterManifest", "job": {"name": "j", "namespace": "ns"}}
    first = publish.publish(f"s3://{bucket}/out/", files, body, **kw)
    assert len(Counting.uploads) == 5  # four files, then the manifest
    assert all(k.startswith(f"out/sha256/{first.digest.removeprefix('sha256:')}/") for k in Counting.uploads)
    stored = {o.object_name: o.etag for o in minio_client.list_objects(bucket, prefix="out/sha256/", recursive=True)}
    again = publish.publish(f"s3://{bucket}/out/", files, body, **kw)
    assert again == first and len(Counting.uploads) == 5
    assert {o.object_name: o.etag for o in minio_client.list_objects(bucket, prefix="out/sha256/", recursive=True)} == (
        stored
    )
    assert s3_json(minio_client, bucket, "out/kubelora-latest.json")["job"] == {"name": "j", "namespace": "ns"}
