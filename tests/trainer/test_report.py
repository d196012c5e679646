"""The report: JSON-lines events, the mirrored snapshot, result.json and the termination log."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kubelora.api.v1alpha1 import AdapterArtifact, EvalResults, GateVerdict, TrainingProgress
from kubelora.storage import LocalStore, parse_uri
from kubelora.trainer.report import Console, Reporter, kv

pytestmark = pytest.mark.trainer

ADAPTER = AdapterArtifact(
    uri="s3://b/o/", digest="sha256:" + "a" * 64, size_bytes=10, trainable_parameters=5, rank=8, base_model="org/base"
)


def reporter(tmp_path: Path, interval: float, monkeypatch: pytest.MonkeyPatch) -> Reporter:
    monkeypatch.setenv("KUBELORA_TERMINATION_LOG", str(tmp_path / "termination-log"))
    monkeypatch.setenv("KUBELORA_PROGRESS_EVENT_INTERVAL", "0")
    out = parse_uri(f"file://{tmp_path}/out")
    return Reporter(tmp_path / "r.jsonl", (LocalStore(), out), interval=interval, console=Console(tty=False))


def test_events_and_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = reporter(tmp_path, interval=3600, monkeypatch=monkeypatch)
    r.phase("Training")
    snap = tmp_path / "out" / "_kubelora" / "progress.json"
    assert json.loads(snap.read_text())["phase"]["phase"] == "Training"  # phase changes are written at once
    r.progress(TrainingProgress(step=1, total_steps=4, loss=2.0))
    r.progress(TrainingProgress(step=2, total_steps=4, loss=1.5))
    # progress is mirrored at a bounded rate: not yet
    assert "progress" not in json.loads(snap.read_text())
    r.progress(TrainingProgress(step=4, total_steps=4, loss=1.0), final=True)
    progress = json.loads(snap.read_text())["progress"]
    assert progress["step"] == 4 and "percent" not in progress and progress["summary"] == "100%"
    events = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events] == ["phase", "progress", "progress", "progress"]
    assert all("time" in e for e in events)
    assert events[1] == {**events[1], "step": 1, "totalSteps": 4, "loss": 2.0}


def test_progress_mirror_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = reporter(tmp_path, interval=0.2, monkeypatch=monkeypatch)
    snap = tmp_path / "out" / "_kubelora" / "progress.json"
    r.progress(TrainingProgress(step=1, total_steps=9))
    first = json.loads(snap.read_text())["progress"]["step"]
    r.progress(TrainingProgress(step=2, total_steps=9))
    assert json.loads(snap.read_text())["progress"]["step"] == first == 1
    time.sleep(0.25)
    r.progress(TrainingProgress(step=3, total_steps=9))
    assert json.loads(snap.read_text())["progress"]["step"] == 3


def test_result_with_failed_gates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = reporter(tmp_path, interval=5, monkeypatch=monkeypatch)
    ev = EvalResults(
        passed=False,
        base={"exact_match": 0.25},
        adapter={"exact_match": 0.3},
        gates=[GateVerdict(metric="exact_match", rule="min", threshold=0.8, value=0.3, passed=False)],
    )
    r.result(ev, ADAPTER, training={"steps": 3})
    result = json.loads((tmp_path / "out" / "_kubelora" / "result.json").read_text())
    assert result["type"] == "result" and result["eval"]["passed"] is False and result["eval"]["verdict"] == "Failed"
    assert result["adapter"]["digest"] == ADAPTER.digest and result["training"] == {"steps": 3}
    term = json.loads((tmp_path / "termination-log").read_text())
    assert term["reason"] == "GatesFailed" and term["failedGates"] == ["exact_match:min"]


def test_error_and_long_termination_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = reporter(tmp_path, interval=5, monkeypatch=monkeypatch)
    r.error("MalformedDataset", "x" * 10_000)
    term = (tmp_path / "termination-log").read_text()
    assert len(term) <= 4096 and json.loads(term)["reason"] == "MalformedDataset"
    result = json.loads((tmp_path / "out" / "_kubelora" / "result.json").read_text())
    assert result["type"] == "error" and result["reason"] == "MalformedDataset"


def test_mirror_failure_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "out").write_text("a file where the directory should be")
    r = reporter(tmp_path, interval=0, monkeypatch=monkeypatch)
    r.phase("Training")
    r.progress(TrainingProgress(step=1))
    assert (tmp_path / "r.jsonl").read_text().count("\n") == 2


def test_kv_format() -> None:
    assert kv("Saved checkpoint", step=3, uri="s3://b/c", message="two words", skip=None) == (
        'Saved checkpoint step=3 uri=s3://b/c message="two words"'
    )


def test_a_lorajob_run_reports_under_its_own_uid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRAJob re-created with the same output has another UID, so it never reads this run's report."""
    monkeypatch.setenv("KUBELORA_LORAJOB_UID", "0b9c6a1e-7f3d-4c2a-9e1b-5d8f2a7c4e60")
    r = reporter(tmp_path, interval=5, monkeypatch=monkeypatch)
    (tmp_path / "out" / "_kubelora" / "0b9c6a1e-7f3d-4c2a-9e1b-5d8f2a7c4e60").mkdir(parents=True)
    stale = tmp_path / "out" / "_kubelora" / "0b9c6a1e-7f3d-4c2a-9e1b-5d8f2a7c4e60" / "result.json"
    stale.write_text("{}")
    r.forget_previous_result()  # this run's own earlier attempt
    assert not stale.exists()
    r.result(None, ADAPTER)
    run_dir = tmp_path / "out" / "_kubelora" / "0b9c6a1e-7f3d-4c2a-9e1b-5d8f2a7c4e60"
    assert json.loads((run_dir / "result.json").read_text())["adapter"]["digest"] == ADAPTER.digest
    assert not (tmp_path / "out" / "_kubelora" / "result.json").exists()
    monkeypatch.setenv("KUBELORA_LORAJOB_UID", "../../elsewhere")
    assert reporter(tmp_path, interval=5, monkeypatch=monkeypatch).report_dir[1].isalnum()


def test_the_chat_template_is_published_with_the_adapter(tmp_path: Path) -> None:
    """Serving renders prompts as training did: the template goes next to the adapter, sha256 in the manifest."""
    import hashlib
    import shutil

    from transformers import AutoTokenizer

    from kubelora.trainer import publish
    from tests.trainer import families

    family = families.FAMILIES["qwen3"]
    tok = families.build_tokenizer(family)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "/tmp/x"}))
    files = publish.stage(tmp_path, adapter, "Qwen/Qwen3-0.6B", None, None, chat_template=tok.chat_template)
    body = {"kind": publish.MANIFEST_KIND, "adapter": {"method": "lora", "chatTemplate": "tokenizer"}}
    out = tmp_path / "out"
    artifact = publish.publish(
        f"file://{out}",
        files,
        body,
        trainable_parameters=1,
        rank=8,
        base_identity="Qwen/Qwen3-0.6B",
        workdir=tmp_path,
    )
    published = out / "sha256" / artifact.digest.removeprefix("sha256:")
    template = (published / publish.CHAT_TEMPLATE).read_text()
    assert template == family.template
    manifest = json.loads((published / publish.MANIFEST).read_text())
    sha = hashlib.sha256(template.encode()).hexdigest()
    assert manifest["adapter"]["chatTemplateFile"] == {
        "path": "chat_template.jinja",
        "sizeBytes": len(template.encode()),
        "sha256": sha,
    }
    assert manifest["adapter"]["method"] == "lora" and manifest["adapter"]["chatTemplate"] == "tokenizer"
    assert {"path": "chat_template.jinja", "sizeBytes": len(template.encode()), "sha256": sha} in manifest["files"]
    assert body["adapter"] == {"method": "lora", "chatTemplate": "tokenizer"}  # the caller's body is not changed

    # A tokenizer without a template picks the published file up and renders exactly what training rendered.
    served = tmp_path / "served"
    bare = families.build_tokenizer(family)
    bare.chat_template = None
    bare.save_pretrained(served)
    assert not AutoTokenizer.from_pretrained(served).chat_template
    shutil.copyfile(published / publish.CHAT_TEMPLATE, served / publish.CHAT_TEMPLATE)
    messages = [{"role": "user", "content": "help"}, {"role": "assistant", "content": "billing"}]
    for generation_prompt in (False, True):
        convo = messages if not generation_prompt else messages[:1]
        want = tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=generation_prompt)
        got = AutoTokenizer.from_pretrained(served).apply_chat_template(
            convo, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert got == want

    # no template, no file
    files = publish.stage(tmp_path, adapter, "Qwen/Qwen3-0.6B", None, None)
    assert publish.CHAT_TEMPLATE not in {f.path for f in files}
