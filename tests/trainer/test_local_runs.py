"""Runs on local storage (pvc://, file://): other formats and defaults, SIGTERM, and a failing publish."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from kubelora.trainer import tiny
from tests.trainer.helpers import TinyKit, make_spec, read_events, run_trainer, start_trainer, wait_for, write_spec

pytestmark = [pytest.mark.trainer, pytest.mark.filterwarnings("ignore::FutureWarning")]


def test_pvc_instruction_one_epoch_merged(tiny_kit: TinyKit, tmp_path: Path) -> None:
    import shutil

    pvc = tmp_path / "pvc"
    shutil.copytree(tiny_kit.model, pvc / "models" / "tiny")
    rows = tiny.to_instruction(tiny.make_tickets(160, seed=5))
    tiny.write_jsonl(rows, pvc / "data" / "train.jsonl")
    spec = make_spec(base="pvc://models/tiny", train="pvc://data/train.jsonl", output="pvc://adapters/one")
    spec["spec"]["dataset"]["format"] = "instruction"
    del spec["spec"]["training"]["maxSteps"]  # neither epochs nor maxSteps: one epoch
    spec["spec"]["output"]["mergedModel"] = True
    run = run_trainer(tmp_path, spec, env={"KUBELORA_PVC_ROOT": str(pvc)})
    assert run.returncode == 0, run.stderr[-3000:]
    # 152 training rows (5% held out) in batches of 16: 10 steps make one epoch
    assert run.result["training"] == {**run.result["training"], "steps": 10, "totalSteps": 10}
    assert "eval" not in run.result
    digest = run.result["adapter"]["digest"]
    out = pvc / "adapters" / "one" / "sha256" / digest.removeprefix("sha256:")
    assert run.result["adapter"]["uri"] == f"pvc://adapters/one/sha256/{digest.removeprefix('sha256:')}/"
    raw = (out / "kubelora-manifest.json").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == digest.removeprefix("sha256:")
    manifest = json.loads(raw)
    paths = {f["path"] for f in manifest["files"]}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "merged/model.safetensors",
        "merged/config.json",
    } <= paths
    assert manifest["hyperparameters"]["epochs"] == 1.0 and manifest["hyperparameters"]["maxSteps"] is None
    assert manifest["datasets"]["train"]["rows"] == 160

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_sigterm_saves_a_checkpoint_and_stops(tiny_kit: TinyKit, tmp_path: Path) -> None:
    manifest = make_spec(
        base=f"file://{tiny_kit.model}",
        train=f"file://{tiny_kit.train}",
        output=f"file://{tmp_path}/out",
        checkpoint_every=1000,
    )
    spec = write_spec(tmp_path / "a", manifest)
    report = tmp_path / "a" / "report.jsonl"
    proc = start_trainer(
        spec,
        tmp_path / "a" / "work",
        report,
        env={"KUBELORA_DEBUG_STEP_SLEEP": "0.05", "KUBELORA_PROGRESS_EVENT_INTERVAL": "0"},
    )
    try:
        wait_for(
            "step 20",
            lambda: any(e["type"] == "progress" and e["step"] >= 20 for e in read_events(report)),
            timeout=180,
        )
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    events = read_events(report)
    error = [e for e in events if e["type"] == "error"][-1]
    assert error["reason"] == "Interrupted"
    saved = [e["step"] for e in events if e["type"] == "checkpoint"]
    assert len(saved) == 1 and 20 <= saved[0] < 160
    assert (tmp_path / "out" / "checkpoints" / f"checkpoint-{saved[0]}" / "COMPLETE").is_file()
    again = run_trainer(tmp_path, manifest, name="b")
    assert again.returncode == 0 and [e["step"] for e in again.of("resumed")] == saved


def _adapter(tmp_path: Path, weights: bytes) -> list[Any]:
    from kubelora.trainer import publish

    adapter = tmp_path / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    (adapter / "adapter_config.json").write_text("{}")
    return publish.stage(tmp_path, adapter, "org/base", {"eval": {"passed": True}}, [{"prompt": "p"}])


PUBLISH_ARGS: dict[str, Any] = {"trainable_parameters": 1, "rank": 1, "base_identity": "org/base"}


def test_failed_upload_is_never_a_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubelora.storage import LocalStore
    from kubelora.trainer import publish
    from kubelora.trainer.errors import PublishError, StorageError

    out = tmp_path / "out"
    body = {"kind": "AdapterManifest"}
    earlier = publish.publish(f"file://{out}", _adapter(tmp_path, b"old"), body, workdir=tmp_path, **PUBLISH_ARGS)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    class Flaky(LocalStore):
        calls = 0

        def upload(self, path: Path, loc: Any, **kw: Any) -> Any:
            Flaky.calls += 1
            if Flaky.calls == 2:
                raise StorageError(f"Uploading to {loc.uri}: connection reset")
            return super().upload(path, loc, **kw)

    monkeypatch.setattr(publish, "store_for", lambda loc, role=None: Flaky())
    with pytest.raises(PublishError, match="connection reset"):
        publish.publish(f"file://{out}", _adapter(tmp_path, b"new"), body, workdir=tmp_path, **PUBLISH_ARGS)
    # no manifest in the new digest directory, the pointer still names the earlier adapter, which is untouched
    [new_dir] = [d for d in (out / "sha256").iterdir() if d.name != earlier.digest.removeprefix("sha256:")]
    assert not (new_dir / publish.MANIFEST).exists()
    assert json.loads((out / publish.POINTER).read_text())["digest"] == earlier.digest
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and new_dir not in p.parents} == before


def test_publish_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    from kubelora.trainer import publish

    out = tmp_path / "out"
    body = {"kind": "AdapterManifest", "job": {"name": "j", "namespace": "ns"}}
    files = _adapter(tmp_path, b"weights")
    first = publish.publish(f"file://{out}", files, body, workdir=tmp_path, **PUBLISH_ARGS)
    hex_digest = first.digest.removeprefix("sha256:")
    assert first.uri == f"file://{out}/sha256/{hex_digest}/"
    manifest = (out / "sha256" / hex_digest / publish.MANIFEST).read_bytes()
    assert hashlib.sha256(manifest).hexdigest() == hex_digest
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        publish.POINTER,
        *(f"sha256/{hex_digest}/{name}" for name in sorted([*(f.path for f in files), publish.MANIFEST])),
    ]
    again = publish.publish(f"file://{out}", files, body, workdir=tmp_path, **PUBLISH_ARGS)
    assert again == first and (out / "sha256" / hex_digest / publish.MANIFEST).read_bytes() == manifest
    assert [d.name for d in (out / "sha256").iterdir()] == [hex_digest]
    pointer = json.loads((out / publish.POINTER).read_text())
    assert pointer == {**pointer, "kind": "AdapterPointer", "digest": first.digest, "uri": first.uri}
    assert pointer["job"] == {"name": "j", "namespace": "ns"} and pointer["createdAt"]
    assert publish.samples_uri(first) == first.uri + "eval/samples.jsonl"
    # other content, another directory beside the first; the pointer moves to it
    other = publish.publish(f"file://{out}", _adapter(tmp_path, b"other"), body, workdir=tmp_path, **PUBLISH_ARGS)
    assert other.digest != first.digest and (out / "sha256" / hex_digest / publish.MANIFEST).read_bytes() == manifest
    assert json.loads((out / publish.POINTER).read_text())["digest"] == other.digest
