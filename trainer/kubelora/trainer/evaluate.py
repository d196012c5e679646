"""Step 6, evaluate: the test set on the base and on base+adapter, gates, regression check, samples.

Generation is greedy (``maxNewTokens``). For QLoRA the adapter is scored twice: on the base in
serving precision (bf16; reported as ``adapter``, with ``base`` measured in the same precision) and on
the 4-bit base it was trained against (``adapterTrainingPrecision``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kubelora.api.v1alpha1 import EvalResults, GateVerdict, LoRAJobSpec
from kubelora.trainer.data import IGNORE_INDEX, DatasetFile, Example, Renderer, Tokenized, tokenize
from kubelora.trainer.errors import EvaluationError
from kubelora.trainer.metrics import generation_metrics, judge, perplexity
from kubelora.trainer.modeling import Runtime, load_base
from kubelora.trainer.report import kv

log = logging.getLogger(__name__)

GENERATION = frozenset({"exact_match", "f1", "accuracy", "json_valid", "json_match"})


@dataclasses.dataclass
class Scored:
    metrics: dict[str, float]
    predictions: list[str]


@dataclasses.dataclass
class Evaluation:
    results: EvalResults
    samples: list[dict[str, Any]]
    details: dict[str, Any]


def _batches(n: int, size: int) -> Iterator[range]:
    for i in range(0, n, size):
        yield range(i, min(n, i + size))


def _device(model: Any) -> Any:
    return next(p.device for p in model.parameters())


def generate(
    model: Any,
    tokenizer: Any,
    renderer: Renderer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    max_len: int,
    batch_size: int,
) -> list[str]:
    """Greedy completions of each example's prompt (left-padded batches)."""
    import torch

    device = _device(model)
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    budget = max(1, max_len - max_new_tokens)
    prompts = [
        list(tokenizer(renderer.prompt(ex.messages or []), add_special_tokens=False)["input_ids"])[-budget:]
        for ex in examples
    ]
    outputs: list[str] = []
    for idx in _batches(len(prompts), batch_size):
        batch = [prompts[i] for i in idx]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, p in enumerate(batch):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
                use_cache=True,
            )
        for row in out[:, width:]:
            outputs.append(tokenizer.decode(row.tolist(), skip_special_tokens=True).strip())
    return outputs


def completion_loss(model: Any, rows: Sequence[Tokenized], pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy over completion tokens (prompt tokens are not scored)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    device = _device(model)
    total, count = 0.0, 0
    for idx in _batches(len(rows), batch_size):
        batch = [rows[i] for i in idx]
        width = max(len(r.input_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, r in enumerate(batch):
            ids[j, : len(r.input_ids)] = torch.tensor(r.input_ids)
            labels[j, : len(r.labels)] = torch.tensor(r.labels)
            mask[j, : len(r.input_ids)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1).to(device)
        total += float(F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((shift_labels != IGNORE_INDEX).sum())
    return total / max(1, count)


def score(
    model: Any,
    tokenizer: Any,
    renderer: Renderer,
    spec: LoRAJobSpec,
    test: Sequence[Example],
    test_rows: Sequence[Tokenized],
    batch_size: int,
) -> Scored:
    assert spec.eval is not None
    metrics = list(spec.eval.metrics)
    preds: list[str] = []
    out: dict[str, float] = {}
    model.eval()
    if GENERATION.intersection(metrics):
        preds = generate(
            model,
            tokenizer,
            renderer,
            test,
            max_new_tokens=spec.eval.max_new_tokens,
            max_len=spec.training.max_seq_length,
            batch_size=batch_size,
        )
        golds = [ex.completion or "" for ex in test]
        out.update(generation_metrics(preds, golds, metrics, spec.eval.labels))
    loss = completion_loss(model, test_rows, tokenizer.pad_token_id, batch_size)
    out["loss"] = loss  # loss and perplexity are always computed (ALWAYS_COMPUTED_METRICS)
    out["perplexity"] = perplexity(loss)
    return Scored(out, preds)


@contextlib.contextmanager
def _base_only(model: Any) -> Iterator[None]:
    with model.disable_adapter():
        yield


def run(
    cfg: Any,
    models: list[Any],
    tokenizer: Any,
    renderer: Renderer,
    rt: Runtime,
    test: DatasetFile,
    regression: DatasetFile | None,
    model_dir: Path,
    adapter_dir: Path,
) -> Evaluation:
    """Score the trained model, passed as ``models[0]``; returns the evaluation.

    The caller hands the model over in a list so that, for QLoRA, the 4-bit model can be freed
    before the base is loaded again in serving precision.
    """
    spec: LoRAJobSpec = cfg.spec
    assert spec.eval is not None
    ev = spec.eval
    batch_size = int(os.environ.get("KUBELORA_EVAL_BATCH_SIZE", "16"))
    max_len = spec.training.max_seq_length
    t0 = time.monotonic()
    test_rows, _ = tokenize(test.examples, renderer, max_len)
    if len(test_rows) != len(test.examples):
        raise EvaluationError(f"{test.name}: some rows have no completion tokens after truncation")
    reg_rows = tokenize(regression.examples, renderer, max_len)[0] if regression else None
    training_precision: Scored | None = None
    model = models[0]
    try:
        if rt.quantized:
            training_precision = score(model, tokenizer, renderer, spec, test.examples, test_rows, batch_size)
            import torch
            from peft import PeftModel

            models.clear()
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            base = load_base(model_dir, spec, rt, quantized=False, dtype=torch.bfloat16)
            model = PeftModel.from_pretrained(base, adapter_dir)
        with _base_only(model):
            base_scored = score(model, tokenizer, renderer, spec, test.examples, test_rows, batch_size)
            base_reg = completion_loss(model, reg_rows, tokenizer.pad_token_id, batch_size) if reg_rows else None
        adapter_scored = score(model, tokenizer, renderer, spec, test.examples, test_rows, batch_size)
        adapter_reg = completion_loss(model, reg_rows, tokenizer.pad_token_id, batch_size) if reg_rows else None
    except EvaluationError:
        raise
    except (RuntimeError, ValueError) as e:
        raise EvaluationError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e

    verdicts = judge(ev.gates, base_scored.metrics, adapter_scored.metrics)
    regression_passed = True
    if ev.regression is not None and base_reg is not None and adapter_reg is not None:
        increase = adapter_reg - base_reg
        passed = regression_passed = increase <= ev.regression.max_loss_increase
        base_scored.metrics["regression_loss"] = base_reg
        adapter_scored.metrics["regression_loss"] = adapter_reg
        verdicts.append(
            GateVerdict(
                metric="loss",
                rule="regression.maxLossIncrease",
                threshold=ev.regression.max_loss_increase,
                value=adapter_reg,
                base_value=base_reg,
                passed=passed,
                message=f"loss on the regression set rose by {increase:.4g} "
                + ("(within" if passed else "(more than")
                + f" {ev.regression.max_loss_increase:.4g})",
            )
        )
    results = EvalResults(
        passed=all(v.passed for v in verdicts) and regression_passed,
        base=base_scored.metrics,
        adapter=adapter_scored.metrics,
        adapter_training_precision=training_precision.metrics if training_precision else None,
        gates=verdicts[:16],  # the API keeps at most 16; passed above counts them all
    )
    samples = []
    for i, ex in enumerate(test.examples[: ev.sample_predictions]):
        s: dict[str, Any] = {
            "source": ex.source,
            "messages": ex.messages,
            "prompt": renderer.prompt(ex.messages or []),
            "expected": ex.completion,
            "base": base_scored.predictions[i] if base_scored.predictions else None,
            "adapter": adapter_scored.predictions[i] if adapter_scored.predictions else None,
        }
        if training_precision is not None and training_precision.predictions:
            s["adapterTrainingPrecision"] = training_precision.predictions[i]
        samples.append(s)
    details = {
        "testSet": test.digest(),
        "regressionSet": regression.digest() if regression else None,
        "examples": len(test.examples),
        "seconds": round(time.monotonic() - t0, 3),
        "servingPrecision": "bf16" if rt.quantized else rt.precision_name,
    }
    for v in verdicts:
        log.info(kv("Gate", metric=v.metric, rule=v.rule, passed=v.passed, message=v.message))
    models.clear()
    return Evaluation(results, samples, details)
