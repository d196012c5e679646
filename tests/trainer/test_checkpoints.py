"""Only complete checkpoints count; the newest of the same spec is resumed; others are cleaned up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubelora.trainer.checkpoints import MARKER, CheckpointStore
from kubelora.trainer.errors import VerificationError

pytestmark = pytest.mark.trainer


def fake_checkpoint(tmp_path: Path, step: int) -> Path:
    d = tmp_path / "local" / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"w" * step)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def test_latest_complete_checkpoint(tmp_path: Path) -> None:
    out = f"file://{tmp_path}/out"
    store = CheckpointStore(out, fingerprint="f1", keep=2)
    assert store.latest() is None
    store.upload(fake_checkpoint(tmp_path, 10), 10)
    store.upload(fake_checkpoint(tmp_path, 20), 20)
    # an upload killed before its marker: files but no COMPLETE
    partial = tmp_path / "out" / "checkpoints" / "checkpoint-30"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"partial")
    step, marker = store.latest() or (None, None)
    assert step == 20 and marker is not None and marker["fingerprint"] == "f1"
    got = store.download(20, marker, tmp_path / "dl")
    assert (got / "adapter_model.safetensors").read_bytes() == b"w" * 20
    # a corrupted file is caught by the marker's sha256
    (tmp_path / "out" / "checkpoints" / "checkpoint-20" / "trainer_state.json").write_text("{}")
    with pytest.raises(VerificationError):
        store.download(20, marker, tmp_path / "dl2")


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    store = CheckpointStore(f"file://{tmp_path}/out", fingerprint="f", keep=2)
    for step in (5, 10, 15):
        store.upload(fake_checkpoint(tmp_path, step), step)
    assert [s for s, _ in store.complete()] == [10, 15]
    assert not (tmp_path / "out" / "checkpoints" / "checkpoint-5").exists()


def test_checkpoints_of_another_spec_are_removed(tmp_path: Path) -> None:
    CheckpointStore(f"file://{tmp_path}/out", fingerprint="old").upload(fake_checkpoint(tmp_path, 50), 50)
    store = CheckpointStore(f"file://{tmp_path}/out", fingerprint="new")
    assert store.latest() is None
    assert not (tmp_path / "out" / "checkpoints" / "checkpoint-50").exists()


def test_unreadable_marker_is_ignored(tmp_path: Path) -> None:
    store = CheckpointStore(f"file://{tmp_path}/out", fingerprint="f")
    store.upload(fake_checkpoint(tmp_path, 7), 7)
    (tmp_path / "out" / "checkpoints" / "checkpoint-7" / MARKER).write_text("")
    assert store.latest() is None
