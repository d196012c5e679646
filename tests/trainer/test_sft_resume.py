"""The training loss of a resumed run equals an uninterrupted run's; SIGTERM after training is not swallowed."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from kubelora.trainer import tiny
from tests.trainer.helpers import TinyKit, make_spec, read_events, run_trainer, start_trainer, wait_for, write_spec

pytestmark = [pytest.mark.trainer, pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.mark.parametrize("packing", [False, True])
def test_resume_reports_the_same_training_loss(tiny_kit: TinyKit, tmp_path: Path, packing: bool) -> None:
    def manifest(out: str) -> dict[str, Any]:
        m = make_spec(
            base=f"file://{tiny_kit.model}",
            train=f"file://{tiny_kit.train}",
            output=f"file://{tmp_path}/{out}",
            max_steps=30,
            checkpoint_every=1000,
        )
        m["spec"]["training"]["packing"] = packing
        # 380 training rows in batches of 16: the resumed run crosses into a second epoch, whose order
        # (shuffled, or grouped by length without packing) must be the uninterrupted run's
        m["spec"]["training"]["batchSize"] = 16
        return m

    reference = run_trainer(tmp_path, manifest("reference"), name="reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    spec = write_spec(tmp_path / "a", manifest("resumed"))
    report = tmp_path / "a" / "report.jsonl"
    proc = start_trainer(
        spec,
        tmp_path / "a" / "work",
        report,
        env={"KUBELORA_DEBUG_STEP_SLEEP": "0.05", "KUBELORA_PROGRESS_INTERVAL": "0"},
    )
    try:
        wait_for(
            "step 8",
            lambda: any(e["type"] == "progress" and e["step"] >= 8 for e in read_events(report)),
            timeout=180,
        )
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    saved = [e["step"] for e in read_events(report) if e["type"] == "checkpoint"]
    assert len(saved) == 1 and 8 <= saved[0] < 30

    resumed = run_trainer(tmp_path, manifest("resumed"), name="b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e["step"] for e in resumed.of("resumed")] == saved
    got, want = resumed.result["training"], reference.result["training"]
    assert got["steps"] == want["steps"] == 30 and got["resumedFromStep"] == saved[0]
    # the mean over all 30 logged steps, not over the steps since the restart
    assert got["trainLoss"] == pytest.approx(want["trainLoss"], rel=1e-4)
    assert got["evalLoss"] == pytest.approx(want["evalLoss"], rel=1e-4)
    # validation ran at the end: the last progress carries the eval loss at the last step
    assert want["evalLoss"] is not None


def test_sigterm_handler_is_restored_after_training(
    tiny_kit: TinyKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubelora.trainer import cli, publish

    seen: list[Any] = []
    real_publish = publish.publish

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(signal.getsignal(signal.SIGTERM))
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(publish, "publish", spy)
    before = signal.getsignal(signal.SIGTERM)
    train = tiny.write_jsonl(tiny.make_tickets(40, seed=3), tmp_path / "t.jsonl")
    manifest = make_spec(
        base=f"file://{tiny_kit.model}", train=f"file://{train}", output=f"file://{tmp_path}/out", max_steps=2
    )
    spec = write_spec(tmp_path / "run", manifest)
    rc = cli.main(["--spec", str(spec), "--workdir", str(tmp_path / "work")])
    assert rc == 0
    assert seen == [before]  # publishing ran under the process's own handler, not the training flag
    assert signal.getsignal(signal.SIGTERM) == before
