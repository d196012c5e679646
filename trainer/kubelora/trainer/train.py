"""Step 5, train: transformers ``Trainer`` over a peft model, with checkpoints in the output location.

A checkpoint is saved every ``checkpointEverySteps`` (and at the end), uploaded to
``<output>/checkpoints/checkpoint-<step>/`` with its marker written last (see
:mod:`kubelora.trainer.checkpoints`). On start the newest complete checkpoint of the same spec is
downloaded and training resumes from it: model, optimizer, scheduler and RNG states come back, and
the data loader skips the batches already seen (the seeded sampler gives the same order), so a
killed and restarted run ends at the same step having seen each batch once.

SIGTERM (Kubernetes eviction or preemption) stops at the next step after saving a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from kubelora.api.v1alpha1 import TrainingProgress
from kubelora.trainer.checkpoints import CheckpointStore
from kubelora.trainer.config import TrainerConfig
from kubelora.trainer.data import Collator, TokenDataset, Tokenized
from kubelora.trainer.errors import OutOfMemoryError, TrainerError, TrainingError, TrainingInterruptedError
from kubelora.trainer.modeling import Runtime
from kubelora.trainer.report import Reporter, kv

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclasses.dataclass
class TrainOutcome:
    global_step: int
    total_steps: int
    resumed_from_step: int | None
    train_loss: float | None
    eval_loss: float | None
    seconds: float
    tokens_per_second: float | None
    adapter_dir: Path


class _Stop:
    requested = False
    signum: int | None = None


def _install_sigterm() -> _Stop:
    stop = _Stop()

    def handler(signum: int, _frame: Any) -> None:
        stop.requested = True
        stop.signum = signum
        log.warning(kv("Stop requested, saving a checkpoint at the next step", signal=signal.Signals(signum).name))

    signal.signal(signal.SIGTERM, handler)
    return stop


def _callbacks(reporter: Reporter, ckpts: CheckpointStore, stop: _Stop, run_dir: Path) -> Any:
    from transformers import TrainerCallback

    step_sleep = float(os.environ.get("KUBELORA_DEBUG_STEP_SLEEP", "0") or 0)

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.t0: float | None = None
            self.step0 = 0
            self.tokens0 = 0
            self.loss: float | None = None
            self.eval_loss: float | None = None
            self.tps: float | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.monotonic()
            self.step0 = state.global_step
            self.tokens0 = int(state.num_input_tokens_seen or 0)

        def snapshot(self, state: Any) -> TrainingProgress:
            total = int(state.max_steps or 0) or None
            step = int(state.global_step)
            elapsed = time.monotonic() - (self.t0 or time.monotonic())
            done = step - self.step0
            eta = (total - step) * elapsed / done if (total and done > 0) else None
            tokens = int(state.num_input_tokens_seen or 0) - self.tokens0
            self.tps = tokens / elapsed if elapsed > 0 and tokens > 0 else None
            return TrainingProgress(
                step=step,
                total_steps=total,
                epoch=float(state.epoch) if state.epoch is not None else None,
                loss=self.loss,
                eval_loss=self.eval_loss,
                tokens_per_second=self.tps,
                eta_seconds=eta,
                percent=100.0 * step / total if total else None,
            )

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            logs = logs or {}
            if "loss" in logs and math.isfinite(logs["loss"]):
                self.loss = float(logs["loss"])
            if "eval_loss" in logs:
                self.eval_loss = float(logs["eval_loss"])
            if "loss" in logs or "eval_loss" in logs:
                reporter.progress(self.snapshot(state))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if step_sleep:
                time.sleep(step_sleep)
            if stop.requested:
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            step = int(state.global_step)
            local = run_dir / f"checkpoint-{step}"
            t = time.monotonic()
            uri = ckpts.upload(local, step)
            reporter.info("checkpoint", "Saved checkpoint", step=step, uri=uri, seconds=round(time.monotonic() - t, 3))

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            reporter.progress(self.snapshot(state), final=True)

    return Progress()


def training_arguments(cfg: TrainerConfig, rt: Runtime, run_dir: Path, has_eval: bool) -> Any:
    from transformers import TrainingArguments

    tr = cfg.spec.training
    gc = tr.gradient_checkpointing
    optim = "paged_adamw_32bit" if (rt.quantized and rt.device == "cuda") else "adamw_torch"
    kwargs: dict[str, Any] = {
        "output_dir": str(run_dir),
        "per_device_train_batch_size": tr.batch_size,
        "per_device_eval_batch_size": tr.batch_size,
        "gradient_accumulation_steps": tr.gradient_accumulation,
        "learning_rate": tr.learning_rate,
        "warmup_steps": tr.warmup_ratio,
        "lr_scheduler_type": "linear",
        "optim": optim,
        "seed": tr.seed,
        "data_seed": tr.seed,
        "bf16": rt.bf16,
        "fp16": rt.fp16,
        "use_cpu": rt.device == "cpu",
        "activation_checkpointing": gc,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if gc else None,
        "logging_strategy": "steps",
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": tr.checkpoint_every_steps,
        "save_total_limit": 1,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": tr.checkpoint_every_steps if has_eval else None,
        "report_to": "none",
        "disable_tqdm": True,
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": rt.device == "cuda",
        "include_num_input_tokens_seen": "non_padding",
        "label_names": ["labels"],
    }
    if cfg.max_steps is not None:
        kwargs["max_steps"] = cfg.max_steps
    else:
        kwargs["num_train_epochs"] = cfg.epochs or 1.0
    return TrainingArguments(**kwargs)


def run(
    cfg: TrainerConfig,
    model: Any,
    tokenizer: Any,
    train_rows: list[Tokenized],
    val_rows: list[Tokenized],
    rt: Runtime,
    reporter: Reporter,
    fingerprint: str,
) -> TrainOutcome:
    from transformers import PrinterCallback, ProgressCallback, Trainer

    run_dir = cfg.workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    ckpts = CheckpointStore(cfg.output_uri, fingerprint)
    resume_dir: Path | None = None
    resumed_from: int | None = None
    latest = ckpts.latest()
    if latest is not None:
        resumed_from, marker = latest
        resume_dir = ckpts.download(resumed_from, marker, cfg.workdir / "resume" / f"checkpoint-{resumed_from}")
        reporter.info("resumed", "Resuming from checkpoint", step=resumed_from, uri=ckpts.uri(resumed_from))

    stop = _install_sigterm()
    args = training_arguments(cfg, rt, run_dir, has_eval=bool(val_rows))
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=Collator(tokenizer.pad_token_id),
        train_dataset=TokenDataset(train_rows),
        eval_dataset=TokenDataset(val_rows) if val_rows else None,
        processing_class=tokenizer,
        callbacks=[progress := _callbacks(reporter, ckpts, stop, run_dir)],
    )
    trainer.remove_callback(PrinterCallback)  # our own progress reporting replaces the log printer
    trainer.remove_callback(ProgressCallback)
    t0 = time.monotonic()
    try:
        out = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    except TrainerError:
        raise
    except (RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "out of memory" in msg.lower():
            raise OutOfMemoryError(f"out of memory while training: {msg}") from e
        raise TrainingError(msg) from e
    seconds = time.monotonic() - t0
    state = trainer.state
    if stop.requested:
        raise TrainingInterruptedError(f"stopped by signal {stop.signum} at step {state.global_step}, checkpoint saved")
    eval_loss = None
    for entry in reversed(state.log_history):
        if "eval_loss" in entry:
            eval_loss = float(entry["eval_loss"])
            break
    adapter_dir = cfg.workdir / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    trained: Any = trainer.model
    trained.save_pretrained(adapter_dir, safe_serialization=True)
    (adapter_dir / "README.md").unlink(missing_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return TrainOutcome(
        global_step=int(state.global_step),
        total_steps=int(state.max_steps),
        resumed_from_step=resumed_from,
        train_loss=float(out.training_loss) if out.training_loss is not None else None,
        eval_loss=eval_loss,
        seconds=seconds,
        tokens_per_second=progress.tps,
        adapter_dir=adapter_dir,
    )
