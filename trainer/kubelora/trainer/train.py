"""Step 5, train: TRL's ``SFTTrainer`` over a peft model, with checkpoints in the output location.

The rows come in tokenized with their loss masks (:mod:`kubelora.trainer.data`); TRL builds the
labels from them, packs with best-fit-decreasing into rows of ``maxSeqLength`` and collates
padding-free: a batch is one flat sequence with per-row ``position_ids`` (no attention mask), from
which transformers builds a block-diagonal causal mask (sdpa/eager) or varlen boundaries (flash
attention), so packed rows never attend to each other. Without packing, batches are padded and
grouped by length.

A checkpoint is saved every ``checkpointEverySteps`` (and at the end), uploaded to
``<output>/checkpoints/checkpoint-<step>/`` with its marker written last (see
:mod:`kubelora.trainer.checkpoints`). On start the newest complete checkpoint of the same spec is
downloaded and training resumes from it: model, optimizer, scheduler and RNG states come back, and
the data loader skips the batches already seen (the seeded sampler gives the same order), so a
killed and restarted run ends at the same step having seen each batch once.

SIGTERM (Kubernetes eviction or preemption) stops at the next step after saving a checkpoint; the
previous handler is restored when training ends, so a SIGTERM during evaluation or publishing still
stops the process. The pod's grace period must cover one step plus one checkpoint upload.

The reported training loss is the mean of the per-step losses in the log history, which a resumed
run restores from its checkpoint, so it is the same as an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from kubelora.api.v1alpha1 import TrainingProgress
from kubelora.trainer import distributed
from kubelora.trainer.checkpoints import CheckpointStore
from kubelora.trainer.config import Layout, TrainerConfig
from kubelora.trainer.data import VARLEN_ATTENTION, PackedRowsCollator, Tokenized, to_dataset
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


def _install_sigterm() -> tuple[_Stop, Any]:
    """Install the stop-at-next-step handler; returns it and the handler to restore afterwards."""
    stop = _Stop()

    def handler(signum: int, _frame: Any) -> None:
        stop.requested = True
        stop.signum = signum
        log.warning(kv("Stop requested, saving a checkpoint at the next step", signal=signal.Signals(signum).name))

    previous = signal.signal(signal.SIGTERM, handler)
    return stop, previous if previous is not None else signal.SIG_DFL  # None: installed outside Python


def mean_logged_loss(log_history: list[dict[str, Any]]) -> float | None:
    """The mean of the per-step training losses in the log history (``logging_steps=1``).

    ``TrainOutput.training_loss`` divides the loss summed since the (re)start by all steps, so a
    resumed run reports a wrong figure; the log history comes back with the checkpoint and is whole.
    """
    losses = [float(e["loss"]) for e in log_history if "loss" in e and "eval_loss" not in e]
    losses = [x for x in losses if math.isfinite(x)]
    return sum(losses) / len(losses) if losses else None


def _stop_everywhere(requested: bool) -> bool:
    """Whether any rank was asked to stop: every rank stops at the same step (else the others would wait in
    the next step's collectives for a rank that is saving and leaving)."""
    if not distributed.initialized():
        return requested
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    flag = torch.tensor([1 if requested else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _callbacks(reporter: Reporter, ckpts: CheckpointStore, stop: _Stop, run_dir: Path) -> Any:
    from transformers import TrainerCallback

    main = distributed.is_main_process()
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
            if main and ("loss" in logs or "eval_loss" in logs):
                reporter.progress(self.snapshot(state))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if step_sleep:
                time.sleep(step_sleep)
            if _stop_everywhere(stop.requested):
                stop.requested = True
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # Every rank has written its part (its RNG state) before rank 0 uploads the directory; no rank
            # runs ahead before the checkpoint is complete. Only rank 0's pod's directory is uploaded: on one pod
            # that holds every rank's RNG state, across nodes only the RNG states of pod 0's ranks (the other
            # pods' rng_state_<rank>.pth stay in their own workdirs). On a resume those ranks find no file and
            # keep the RNG state of a fresh start (the spec's seed; transformers logs the missing file): dropout
            # may differ from an uninterrupted run, the data order does not (seeded samplers, below).
            distributed.barrier()
            if main:
                step = int(state.global_step)
                local = run_dir / f"checkpoint-{step}"
                t = time.monotonic()
                uri = ckpts.upload(local, step)
                reporter.info(
                    "checkpoint", "Saved checkpoint", step=step, uri=uri, seconds=round(time.monotonic() - t, 3)
                )
            distributed.barrier()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if main:
                reporter.progress(self.snapshot(state), final=True)

    return Progress()


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def speed_options(rt: Runtime, packing: bool) -> dict[str, Any]:
    """Throughput options chosen for this machine (recorded in the model event).

    * optimizer: paged 32-bit AdamW for QLoRA on a GPU, fused AdamW on other GPUs, AdamW on the CPU;
    * Liger kernels (fused RMSNorm, RoPE, SwiGLU and cross-entropy) on a GPU when installed;
    * ``group_by_length`` when packing is off, so padded batches hold rows of similar length.
    """
    if rt.quantized and rt.device == "cuda":
        optim = "paged_adamw_32bit"
    elif rt.device == "cuda":
        optim = "adamw_torch_fused"
    else:
        optim = "adamw_torch"
    return {
        "optim": optim,
        "use_liger_kernel": rt.device == "cuda" and _has("liger_kernel"),
        "group_by_length": not packing,
    }


def _trainer_class() -> Any:
    """``SFTTrainer`` with a seeded length-grouped sampler.

    transformers' ``LengthGroupedSampler`` draws from the global RNG when an epoch starts, so a run
    resumed in an earlier epoch sees a different order in the next ones than an uninterrupted run.
    Seeded with ``data_seed + epoch`` (``set_epoch`` is called at every epoch, resumed or not), the
    order is a function of the epoch only.
    """
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices
    from trl import SFTTrainer

    class SeededLengthGroupedSampler(torch.utils.data.Sampler[int]):
        def __init__(self, lengths: list[int], group_size: int, seed: int) -> None:
            self.lengths, self.group_size, self.seed, self.epoch = lengths, group_size, seed, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __len__(self) -> int:
            return len(self.lengths)

        def __iter__(self) -> Any:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=g))

    class Trainer(SFTTrainer):  # type: ignore[misc]
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            lengths = [len(ids) for ids in dataset["input_ids"]]
            # The global batch (every process's micro-batches of one optimizer step): the same groups, so the
            # same order, at any world size; accelerate deals the batches out to the processes in turn.
            group = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return SeededLengthGroupedSampler(lengths, group, seed)

    return Trainer


def fsdp_options(layout: Layout, gradient_checkpointing: bool) -> dict[str, Any]:
    """SFTConfig options for the layout's strategy: FSDP (FSDP2, full shard, one decoder layer per unit) when the
    estimate says the model does not fit one GPU; DDP otherwise (nothing to set: the Trainer wraps the model in
    DDP whenever the world size is above 1).

    Under FSDP, activation checkpointing is FSDP's own (the Trainer's would add an all-gather per layer in the
    backward pass); checkpoints hold full state dicts, which rank 0 saves and uploads.
    """
    if layout.strategy != "FSDP":
        return {"fsdp": None, "fsdp_config": None}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": True,
            "cpu_ram_efficient_loading": True,
            "state_dict_type": "FULL_STATE_DICT",
            "activation_checkpointing": gradient_checkpointing,
        },
    }


def training_arguments(cfg: TrainerConfig, rt: Runtime, run_dir: Path, has_eval: bool) -> Any:
    from trl import SFTConfig

    tr = cfg.spec.training
    layout = cfg.run_layout
    fsdp = fsdp_options(layout, tr.gradient_checkpointing)
    gc = tr.gradient_checkpointing and not fsdp["fsdp"]
    fast = speed_options(rt, tr.packing)
    kwargs: dict[str, Any] = {
        "output_dir": str(run_dir),
        "per_device_train_batch_size": layout.per_device_batch,
        "per_device_eval_batch_size": layout.per_device_batch,
        # world size x per-device batch x accumulation = the spec's global batch (config.layout)
        "gradient_accumulation_steps": layout.gradient_accumulation,
        **fsdp,
        "ddp_backend": distributed.backend(rt.device == "cuda") if layout.world_size > 1 else None,
        # every LoRA weight takes part in every forward: no search for unused parameters each step
        "ddp_find_unused_parameters": False,
        "learning_rate": tr.learning_rate,
        "warmup_steps": tr.warmup_ratio,
        "lr_scheduler_type": "linear",
        "optim": fast["optim"],
        "use_liger_kernel": fast["use_liger_kernel"],
        "train_sampling_strategy": "group_by_length" if fast["group_by_length"] else "random",
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
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": rt.device == "cuda",
        "include_num_input_tokens_seen": "non_padding",
        # data: rows arrive tokenized and truncated to maxSeqLength (data.tokenize), with their masks
        "max_length": tr.max_seq_length,
        "packing": tr.packing,
        "packing_strategy": "bfd",
        "padding_free": tr.packing,
        "completion_only_loss": cfg.spec.dataset.format == "instruction",
        # Our own masks are used instead: TRL's assistant_only_loss needs {% generation %} markers in the
        # template; the "assistant_masks" column applies whatever this flag says.
        "assistant_only_loss": False,
    }
    if cfg.max_steps is not None:
        kwargs["max_steps"] = cfg.max_steps
    else:
        kwargs["num_train_epochs"] = cfg.epochs or 1.0
    return SFTConfig(**kwargs)


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
    main, local_main = distributed.is_main_process(), distributed.is_local_main_process()
    run_dir = cfg.workdir / "run"
    ckpts = CheckpointStore(cfg.output_uri, fingerprint)
    # Rank 0 picks the checkpoint (and removes other specs' ones); every rank resumes from that one. Each pod's
    # local rank 0 downloads it into the pod's workdir while the other ranks wait.
    latest = ckpts.latest() if main else None
    latest = distributed.broadcast_object(latest)  # type: ignore[assignment]
    resume_dir: Path | None = None
    resumed_from: int | None = None
    if latest is not None:
        resumed_from, marker = latest
        resume_dir = cfg.workdir / "resume" / f"checkpoint-{resumed_from}"
    if local_main:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        if latest is not None:
            assert resume_dir is not None and resumed_from is not None
            ckpts.download(resumed_from, marker, resume_dir)
    distributed.barrier()
    if resumed_from is not None and main:
        reporter.info("resumed", "Resuming from checkpoint", step=resumed_from, uri=ckpts.uri(resumed_from))

    stop, previous_handler = _install_sigterm()
    try:
        trainer, out_state, seconds, progress = _train(
            cfg, model, tokenizer, train_rows, val_rows, rt, reporter, ckpts, stop, run_dir, resume_dir
        )
    finally:
        # A SIGTERM during evaluation or publishing must stop the process, not set a flag no one reads.
        signal.signal(signal.SIGTERM, previous_handler)
    state = out_state
    if stop.requested:
        raise TrainingInterruptedError(f"stopped by signal {stop.signum} at step {state.global_step}, checkpoint saved")
    eval_loss = None
    for entry in reversed(state.log_history):
        if "eval_loss" in entry:
            eval_loss = float(entry["eval_loss"])
            break
    adapter_dir = cfg.workdir / "adapter"
    if main:
        shutil.rmtree(adapter_dir, ignore_errors=True)
    if cfg.run_layout.strategy == "FSDP":
        # The adapter's shards are gathered to rank 0, which writes them: every rank takes part.
        distributed.barrier()
        trainer.save_model(str(adapter_dir))
    elif main:
        trained: Any = trainer.model
        trained.save_pretrained(adapter_dir, safe_serialization=True)
    if main:
        (adapter_dir / "README.md").unlink(missing_ok=True)
    distributed.barrier()  # every rank is done with the run directory
    if local_main:
        shutil.rmtree(run_dir, ignore_errors=True)
    return TrainOutcome(
        global_step=int(state.global_step),
        total_steps=int(state.max_steps),
        resumed_from_step=resumed_from,
        train_loss=mean_logged_loss(state.log_history),
        eval_loss=eval_loss,
        seconds=seconds,
        tokens_per_second=progress.tps,
        adapter_dir=adapter_dir,
    )


def _train(
    cfg: TrainerConfig,
    model: Any,
    tokenizer: Any,
    train_rows: list[Tokenized],
    val_rows: list[Tokenized],
    rt: Runtime,
    reporter: Reporter,
    ckpts: CheckpointStore,
    stop: _Stop,
    run_dir: Path,
    resume_dir: Path | None,
) -> tuple[Any, Any, float, Any]:
    from transformers import PrinterCallback, ProgressCallback

    SFTTrainer = _trainer_class()  # noqa: N806 - a class
    fmt = cfg.spec.dataset.format
    args = training_arguments(cfg, rt, run_dir, has_eval=bool(val_rows))
    try:
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=to_dataset(train_rows, fmt),
            eval_dataset=to_dataset(val_rows, fmt) if val_rows else None,
            processing_class=tokenizer,
            callbacks=[progress := _callbacks(reporter, ckpts, stop, run_dir)],
        )
    except ValueError as e:
        raise TrainingError(f"cannot set up training: {e}") from e
    if rt.quantized and rt.fp16:
        # TRL casts a quantized model's adapter weights to bf16 (QLoRA paper); on a GPU without native
        # bf16 (fp16 autocast, gradient scaling) the trainable weights stay fp32 instead.
        import torch

        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype == torch.bfloat16:
                p.data = p.data.float()
    attn = str(getattr(model.config, "_attn_implementation", "") or "")
    if cfg.spec.training.packing and attn not in VARLEN_ATTENTION:
        # TRL refuses a custom collator with packing (its flat padding-free batches suit varlen kernels);
        # for sdpa/eager, packed rows stay rows (see PackedRowsCollator).
        trainer.data_collator = PackedRowsCollator(tokenizer.pad_token_id)
    trainer.remove_callback(PrinterCallback)  # our own progress reporting replaces the log printer
    trainer.remove_callback(ProgressCallback)
    t0 = time.monotonic()
    try:
        trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
        state = trainer.state
        if val_rows and not stop.requested:
            # Validation at the end, unless the last scheduled evaluation was at the last step.
            last_eval = max((int(e.get("step", -1)) for e in state.log_history if "eval_loss" in e), default=-1)
            if last_eval != int(state.global_step):
                metrics = trainer.evaluate()
                progress.eval_loss = float(metrics["eval_loss"])
                reporter.progress(progress.snapshot(state), final=True)
    except TrainerError:
        raise
    except (RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "out of memory" in msg.lower():
            raise OutOfMemoryError(f"out of memory while training: {msg}") from e
        if distributed.initialized() and "peer" in msg.lower():
            # gloo/NCCL saying a connection closed: another rank died (its own log says why)
            raise TrainingError(f"another process of the distributed run failed: {msg}") from e
        raise TrainingError(msg) from e
    return trainer, trainer.state, time.monotonic() - t0, progress
