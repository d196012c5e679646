"""``python -m kubelora.trainer --spec FILE [--report-file FILE] [--workdir DIR]``.

Runs config → fetch → model and tokenizer → data → train → evaluate → publish → report. Exit codes:
0 the run completed and the adapter is published (the ``result`` event's ``eval.passed`` says whether
the gates passed; ``--gates-failed-exit-code`` makes failed gates exit non-zero), 1 an error a retry
may fix, 3 an error a retry cannot fix (bad spec or data, model does not fit), 2 bad command line,
143 stopped by SIGTERM after saving a checkpoint. Every error also writes an ``error`` event.

Under torchrun every rank exits with rank 0's code: once training is over the other ranks wait for rank 0 to
evaluate and publish (:func:`kubelora.trainer.distributed.agree_exit_code`), so a multi-node Job's pods end
together and a retry starts all of them again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubelora.api.v1alpha1 import dump
from kubelora.storage import parse_uri, store_for
from kubelora.trainer import config as config_mod
from kubelora.trainer import data, distributed, evaluate, fetch, modeling, preflight, publish, train
from kubelora.trainer.errors import EXIT_SUCCEEDED, InvalidSpecError, StorageError, TrainerError
from kubelora.trainer.report import Reporter, kv, setup_logging

log = logging.getLogger("kubelora.trainer")

#: Tests: rank 0 raises when it starts publishing, after training (a failure no retry of the step would see).
FAIL_PUBLISH_ENV = "KUBELORA_DEBUG_FAIL_PUBLISH"


@dataclasses.dataclass
class RunState:
    """How far the pipeline got on this rank: once ``trained``, every rank agrees on rank 0's exit code."""

    trained: bool = False


def check_layout(spec: Any, layout: config_mod.Layout) -> None:
    """Refuse, before any weights move, what this layout cannot run (a retry would not help: exit code 3).

    FSDP with ``spec.eval``: FSDP shards the model in place across the ranks, and the evaluation runs on rank 0
    alone after training, so its forward passes would wait for all-gathers the other ranks never join.
    Evaluating under FSDP needs the base reloaded on rank 0 with the trained adapter (not done yet).
    """
    if layout.strategy == "FSDP" and spec.eval is not None:
        raise InvalidSpecError(
            f"spec.eval is not supported when training uses FSDP (this run: {layout.world_size} processes, "
            f"{layout.nodes} node(s), FSDP because the model does not fit one GPU): FSDP shards the model across "
            "the processes and evaluation runs on rank 0 alone after training, which would hang; remove spec.eval "
            "and evaluate the published adapter with a separate LoRAJob or serving, or give each process a GPU "
            "the model fits on (DDP)"
        )


T = TypeVar("T")


def on_node_leader(fetch_: Callable[[], T]) -> T:
    """Run ``fetch_`` on local rank 0 only, and give its result to the pod's other ranks: the ranks of a pod
    share its workdir, so one download serves them all (and none writes over another's). Without torchrun it
    just runs."""
    if not distributed.initialized():
        return fetch_()
    result: Any = None
    failure: BaseException | None = None
    if distributed.is_local_main_process():
        try:
            result = ("ok", fetch_())
        except BaseException as e:  # the other ranks must not wait for a result that never comes
            failure = e
    gathered = distributed.all_gather_object(result)
    if failure is not None:
        raise failure
    leader = distributed.rank() - distributed.local_rank()  # torchrun numbers a pod's ranks consecutively
    shared = gathered[leader]
    if not (isinstance(shared, tuple) and shared and shared[0] == "ok"):
        raise StorageError("local rank 0 of this pod failed to fetch the inputs (see its error)")
    return shared[1]  # type: ignore[no-any-return]


def _fingerprint(cfg: config_mod.TrainerConfig, config_sha: str, datasets: dict[str, Any]) -> str:
    """What a checkpoint must share with this run to be resumed from."""
    body = {
        "layout": 2,  # 2: TRL data path (every assistant turn trained, BFD packing with per-row positions)
        "hyperparameters": cfg.hyperparameters(),
        "baseConfigSha256": config_sha,
        "train": datasets["train"].sha256,
        "validation": datasets["validation"].sha256 if datasets.get("validation") else None,
        "validationSplit": cfg.spec.dataset.validation_split,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_dataset(uri: str, role: str, cfg: config_mod.TrainerConfig, fmt: str) -> data.DatasetFile:
    path = on_node_leader(lambda: fetch.fetch_dataset(uri, cfg.workdir, role))
    name = parse_uri(uri).name or path.name
    return data.read_jsonl(path, fmt, name=name, uri=uri, max_bad_rows=cfg.spec.dataset.max_bad_rows)


def pipeline(
    cfg: config_mod.TrainerConfig,
    reporter: Reporter,
    gates_failed_exit_code: int = 0,
    state: RunState | None = None,
) -> int:
    spec = cfg.spec
    state = state if state is not None else RunState()
    rt = modeling.choose_runtime(spec.method)
    reporter.phase("Training", step="fetch")

    # fetch (config first) and preflight: fail before any weights move
    config_dir, config_sha = on_node_leader(
        lambda: fetch.fetch_base_config(spec.base_model.uri, cfg.workdir, revision=spec.base_model.revision)
    )
    base_config = modeling.read_config(config_dir)
    threads = modeling.configure_cpu_threads(base_config, rt)
    est, layers = preflight.check(
        cfg,
        base_config,
        config_dir,
        rt,
        on_estimate=lambda e: reporter.info("estimate", None, mirror=True, **e.to_dict()),
    )
    # processes and batch: refuse a world size that cannot keep the spec's global batch before weights move
    cfg.layout = run_layout(cfg, base_config, layers, rt)
    check_layout(spec, cfg.layout)
    reporter.training = cfg.layout.to_dict()
    reporter.info("layout", "Training layout", **reporter.training)

    # data: parse every dataset now, so a malformed row fails before the model loads
    fmt = spec.dataset.format
    datasets: dict[str, data.DatasetFile | None] = {"train": _read_dataset(spec.dataset.train, "train", cfg, fmt)}
    datasets["validation"] = (
        _read_dataset(spec.dataset.validation, "validation", cfg, fmt) if spec.dataset.validation else None
    )
    if spec.eval is not None:
        datasets["test"] = _read_dataset(spec.eval.test_set, "test", cfg, fmt)
        datasets["regression"] = (
            _read_dataset(spec.eval.regression.dataset, "regression", cfg, fmt) if spec.eval.regression else None
        )
    base = on_node_leader(
        lambda: fetch.fetch_base_model(
            spec.base_model.uri,
            cfg.workdir,
            revision=spec.base_model.revision,
            trust_remote_code=spec.base_model.trust_remote_code,
        )
    )

    # tokenizer and data: render and tokenize every row with the model's chat template before the model
    # loads, so a row the template refuses fails fast with its file:line (non-retryable)
    reporter.phase("Training", step="data")
    tok = modeling.load_tokenizer(base.directory, spec.base_model.trust_remote_code)
    renderer = data.Renderer(tok)
    train_file = datasets["train"]
    assert train_file is not None
    if datasets["validation"] is not None:
        train_ex, val_ex = train_file.examples, datasets["validation"].examples
    else:
        train_ex, val_ex = data.split(train_file.examples, spec.dataset.validation_split, spec.training.seed)
    max_len = spec.training.max_seq_length
    train_rows, stats = data.tokenize(train_ex, renderer, max_len)
    val_rows, _ = data.tokenize(val_ex, renderer, max_len)
    for role in ("test", "regression"):
        held_out = datasets.get(role)
        if held_out is not None:
            data.tokenize(held_out.examples, renderer, max_len)
    if not train_rows:
        raise InvalidSpecError("no training rows left after tokenization")
    log.info(kv("Rendered rows", train=len(train_rows), validation=len(val_rows), template=renderer.template_source))

    # model
    reporter.phase("Training", step="model")
    model, tok = modeling.load_for_training(base.directory, spec, rt, tok, strategy=cfg.layout.strategy)
    trainable = modeling.trainable_parameters(model)
    reporter.info(
        "model",
        "Loaded model",
        method=spec.method,
        device=rt.device,
        precision=rt.precision_name,
        trainableParameters=trainable,
        quantizedLayers=modeling.quantized_layers(model),
        cpuThreads=threads,
        attention=getattr(model.config, "_attn_implementation", None),
        **train.speed_options(rt, spec.training.packing),
    )
    if trainable != est.trainable_parameters:
        log.warning(
            kv("Estimated trainable parameters differ from peft's", estimate=est.trainable_parameters, peft=trainable)
        )
    # packed rows (TRL packs best-fit-decreasing into maxSeqLength rows, nearly without waste)
    n_rows = -(-stats["tokens"] // max_len) if spec.training.packing else len(train_rows)
    est = preflight.estimate(cfg, base_config, layers, rt, train_tokens=stats["tokens"], train_examples=n_rows)
    reporter.info("estimate", "Estimate", mirror=True, **est.to_dict())
    reporter.info(
        "data",
        "Data ready",
        trainRows=len(train_rows),
        validationRows=len(val_rows),
        trainTokens=stats["tokens"],
        truncated=stats["truncated"],
        trainedTokens=stats["completionTokens"],
        packing=spec.training.packing,
    )

    # train
    reporter.phase("Training", step="train")
    fingerprint = _fingerprint(cfg, config_sha, datasets)
    outcome = train.run(cfg, model, tok, train_rows, val_rows, rt, reporter, fingerprint)
    state.trained = True  # from here on, every rank leaves with rank 0's exit code (main)
    if not distributed.is_main_process():
        # Evaluation, publishing and the result are rank 0's; this rank waits for its exit code (main).
        log.info(kv("Training done on this rank", rank=distributed.rank(), step=outcome.global_step))
        return EXIT_SUCCEEDED

    # evaluate
    evaluation = None
    if spec.eval is not None:
        reporter.phase("Evaluating")
        test_file = datasets["test"]
        assert test_file is not None
        held = [model]
        del model
        evaluation = evaluate.run(
            cfg, held, tok, renderer, rt, test_file, datasets.get("regression"), base.directory, outcome.adapter_dir
        )
    else:
        del model

    # publish
    reporter.phase("Publishing")
    if os.environ.get(FAIL_PUBLISH_ENV):
        raise RuntimeError(f"{FAIL_PUBLISH_ENV} is set: failing on purpose before publishing")
    merged_dir = None
    if spec.output.merged_model:
        merged_dir = publish_merged(cfg, base.directory, outcome.adapter_dir, tok, rt, datasets)
    identity = publish.base_model_identity(spec.base_model.uri)
    eval_doc = None
    if evaluation is not None:
        eval_doc = {"eval": dump(evaluation.results), **evaluation.details}
    files = publish.stage(
        cfg.workdir,
        outcome.adapter_dir,
        identity,
        eval_doc,
        evaluation.samples if evaluation else None,
        merged_dir,
        chat_template=tok.chat_template,
    )
    body = publish.manifest_body(
        cfg=cfg,
        base=base,
        base_config=base_config,
        datasets=datasets,
        estimate=est.to_dict(),
        outcome=outcome,
        evaluation=evaluation,
        chat_template=renderer.template_source,
        precision=rt.precision_name,
        trainable_parameters=trainable,
    )
    artifact = publish.publish(
        cfg.output_uri,
        files,
        body,
        trainable_parameters=trainable,
        rank=spec.lora.rank,
        base_identity=identity,
        workdir=cfg.workdir,
    )
    if evaluation is not None:
        # Only now: the samples are inside the digest directory, whose name the eval documents went into.
        evaluation.results.samples_uri = publish.samples_uri(artifact)

    # report
    reporter.result(
        evaluation.results if evaluation else None,
        artifact,
        training={
            "steps": outcome.global_step,
            "totalSteps": outcome.total_steps,
            "resumedFromStep": outcome.resumed_from_step,
            "trainLoss": outcome.train_loss,
            "evalLoss": outcome.eval_loss,
            "seconds": round(outcome.seconds, 3),
            "tokensPerSecond": outcome.tokens_per_second,
            **cfg.run_layout.to_dict(),
        },
    )
    if evaluation is not None and not evaluation.results.passed:
        return gates_failed_exit_code
    return EXIT_SUCCEEDED


def run_layout(
    cfg: config_mod.TrainerConfig, base_config: dict[str, Any], layers: list[Any], rt: modeling.Runtime
) -> config_mod.Layout:
    """The layout of this run from torchrun's environment (one process without it): the strategy is the
    estimate's for the processes actually running (FSDP when the model does not fit one GPU, else DDP)."""
    world, nodes, per_node = distributed.world_size(), distributed.node_count(), distributed.local_world_size()
    strategy = None
    if world > 1:
        resources = cfg.spec.resources.model_copy(update={"gpus": per_node, "nodes": nodes})
        actual = dataclasses.replace(cfg, spec=cfg.spec.model_copy(update={"resources": resources}))
        strategy = preflight.estimate(actual, base_config, layers, rt).strategy
        strategy = "DDP" if strategy == "Single" else strategy
    return config_mod.layout(cfg.spec, nodes=nodes, processes_per_node=per_node, strategy=strategy)


def publish_merged(
    cfg: config_mod.TrainerConfig,
    model_dir: Path,
    adapter_dir: Path,
    tok: Any,
    rt: Any,
    datasets: dict[str, Any] | None = None,
) -> Path:
    """The base with the adapter merged in, in serving precision (bf16 on GPU or for QLoRA), merged on the CPU
    and checked against the adapter on test rows (else validation or training rows): see :mod:`merge`."""
    from kubelora.trainer import merge

    examples: list[Any] = []
    for role in ("test", "validation", "train"):
        found = (datasets or {}).get(role)
        if found is not None and found.examples:
            examples = list(found.examples)
            break
    out = cfg.workdir / "merged"
    merge.merge_checked(model_dir, adapter_dir, cfg.spec, rt, out, tok, examples)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kubelora.trainer", description="Train a LoRA adapter from a LoRAJob spec"
    )
    p.add_argument("--spec", required=True, type=Path, help="LoRAJob manifest or bare spec (YAML or JSON)")
    p.add_argument("--report-file", type=Path, help="append JSON-lines events here")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one, removed at the end)")
    p.add_argument(
        "--gates-failed-exit-code",
        type=int,
        default=0,
        metavar="N",
        help="exit code when the run completes but evaluation gates fail (default 0: the result event tells)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_process = distributed.is_main_process()
    # Under torchrun only rank 0 logs progress; the other ranks log warnings and errors.
    setup_logging(logging.DEBUG if args.verbose else logging.INFO if main_process else logging.WARNING)
    modeling.quiet_libraries()
    distributed.write_pid_file()
    tmp = args.workdir is None
    if tmp and distributed.local_world_size() > 1:
        # the ranks of a pod share its workdir: one both agree on, removed by local rank 0
        run_id = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT", "run")
        workdir = Path(tempfile.gettempdir()) / f"kubelora-{run_id}-{distributed.node_rank()}"
        tmp = distributed.is_local_main_process()
    else:
        workdir = Path(tempfile.mkdtemp(prefix="kubelora-")) if tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    # The ranks share the report file and the output: only rank 0 writes them.
    reporter = Reporter(args.report_file, enabled=main_process)
    state = RunState()
    try:
        code = _run(args, workdir, reporter, state)
        if state.trained:
            code = _agree_exit_code(code)
    finally:
        reporter.close()
        try:
            distributed.shutdown()
        except Exception as e:  # a peer that died already: nothing left to tear down cleanly
            log.warning(kv("Cannot leave the process group", error=str(e)))
        if tmp:
            shutil.rmtree(workdir, ignore_errors=True)
    distributed.record_exit_code(code)  # for the launcher: torchrun alone would exit 1
    return code


def _agree_exit_code(code: int) -> int:
    """Every rank leaves with rank 0's exit code (see :func:`distributed.agree_exit_code`). A rank that cannot
    hear from rank 0 (it died) leaves with 1, retryable."""
    try:
        agreed = distributed.agree_exit_code(code)
    except Exception as e:
        log.error(kv("No exit code from rank 0", rank=distributed.rank(), error=str(e)))
        return code if (distributed.is_main_process() or code) else 1
    if agreed != code:
        log.warning(kv("Leaving with rank 0's exit code", rank=distributed.rank(), exitCode=agreed, own=code))
    return agreed


def _run(args: argparse.Namespace, workdir: Path, reporter: Reporter, state: RunState) -> int:
    """The run up to its exit code; an error becomes an ``error`` event (rank 0) and its exit code."""
    main_process = distributed.is_main_process()
    try:
        distributed.init_process_group()
        cfg = config_mod.load(args.spec, workdir=workdir, report_file=args.report_file)
        out = parse_uri(cfg.output_uri)
        if out.scheme == "hf":
            raise InvalidSpecError("spec.output.uri: hf:// is read-only; use s3://, pvc:// or file://")
        if main_process:
            reporter.mirror = (store_for(out, "OUTPUT"), out)
            reporter.forget_previous_result()  # a retry must not show the last attempt's outcome meanwhile
        log.info(
            kv(
                "Starting",
                job=cfg.job_name,
                method=cfg.spec.method,
                baseModel=cfg.spec.base_model.uri,
                output=cfg.output_uri,
                workdir=str(workdir),
                pid=os.getpid(),
                worldSize=distributed.world_size(),
            )
        )
        return pipeline(cfg, reporter, args.gates_failed_exit_code, state)
    except TrainerError as e:
        reporter.error(e.reason, e.message)
        return e.exit_code
    except KeyboardInterrupt:
        reporter.error("Interrupted", "interrupted")
        return 130
    except Exception as e:
        log.debug(traceback.format_exc())
        traceback.print_exc(file=sys.stderr)
        reporter.error("InternalError", f"{type(e).__name__}: {e}")
        return 1
