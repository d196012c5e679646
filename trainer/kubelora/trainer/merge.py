"""``output.mergedModel``: the base with the adapter merged in, made on the CPU and checked against the adapter.

The merge loads the base in serving precision (bf16 for QLoRA or a GPU run, else the training precision) on
the CPU, so it never competes with the GPU for memory. Before merging, the unmerged model (base + adapter)
computes the logits of a few test rows; the merged model is saved, loaded back from the saved files, and must
give the same logits within a tolerance: ``max |merged - adapter| / max |adapter|`` at most 1e-3 in fp32, 5e-2 in
fp16 and 1e-1 in bf16 (``KUBELORA_MERGE_TOLERANCE`` overrides). In half precision the two computations round
differently (a tiny random model differs by about 4% of its largest logit in bf16), so there the check catches
gross mismatches only (a wrong scaling, a missing or doubled update, a wrong DoRA magnitude); in fp32 it is tight. A mismatch fails publishing
(:class:`MergeMismatchError`, reason ``MergeMismatch``, not retried), so a merged export that does not serve what was evaluated is
never published. The check's figures are written next to the weights (``merged/kubelora-merge-check.json``).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubelora.trainer.errors import EXIT_PERMANENT, PublishError
from kubelora.trainer.report import kv

log = logging.getLogger(__name__)

CHECK_FILE = "kubelora-merge-check.json"
CHECK_ROWS = 4
CHECK_TOKENS = 256
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1}


class MergeMismatchError(PublishError):
    """The merged export does not compute what the adapter does: deterministic, so a retry cannot help."""

    reason = "MergeMismatch"
    exit_code = EXIT_PERMANENT


@dataclasses.dataclass
class MergeCheck:
    rows: int
    tokens: int
    max_abs_diff: float
    max_abs_logit: float
    relative: float
    tolerance: float
    precision: str

    @property
    def passed(self) -> bool:
        return self.relative <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "tokens": self.tokens,
            "maxAbsDiff": self.max_abs_diff,
            "maxAbsLogit": self.max_abs_logit,
            "relative": self.relative,
            "tolerance": self.tolerance,
            "precision": self.precision,
            "passed": self.passed,
        }


def precision_name(dtype: Any) -> str:
    return (
        str(dtype)
        .removeprefix("torch.")
        .replace("bfloat16", "bf16")
        .replace("float32", "fp32")
        .replace("float16", "fp16")
    )


def tolerance_for(dtype: Any) -> float:
    raw = os.environ.get("KUBELORA_MERGE_TOLERANCE")
    if raw:
        return float(raw)
    return TOLERANCE.get(precision_name(dtype), 1e-1)


def check_rows(
    tokenizer: Any, examples: Sequence[Any], *, rows: int = CHECK_ROWS, max_tokens: int = CHECK_TOKENS
) -> list[list[int]]:
    """Token ids of the first ``rows`` examples, rendered whole (prompt and answer) as in training."""
    out: list[list[int]] = []
    for ex in examples:
        if len(out) >= rows:
            break
        text = getattr(ex, "text", None)
        messages = list(getattr(ex, "messages", None) or [])
        completion = getattr(ex, "completion", None)
        if text is not None:
            ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        elif messages:
            if completion is not None:
                messages.append({"role": "assistant", "content": completion})
            try:
                rendered = str(tokenizer.apply_chat_template(messages, tokenize=False))
            except Exception:  # the rows only need to be realistic text: a template refusal is not this check's
                rendered = "\n".join(str(m.get("content", "")) for m in messages)
            ids = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        else:
            continue
        if ids:
            out.append(ids[:max_tokens])
    if not out:  # no usable rows: a fixed, deterministic probe over the vocabulary
        size = len(tokenizer)
        out.append([(i * 7919) % size for i in range(min(64, max_tokens))])
    return out


def logits_of(model: Any, rows: Sequence[Sequence[int]]) -> list[Any]:
    """fp32 logits of each row (one at a time: no padding)."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([list(r)], device=device)
            out.append(model(input_ids=ids, use_cache=False).logits[0].float().cpu())
    return out


def compare(reference: Sequence[Any], merged: Sequence[Any], tolerance: float, precision: str) -> MergeCheck:
    diff = max(float((m - r).abs().max()) for r, m in zip(reference, merged, strict=True))
    scale = max(float(r.abs().max()) for r in reference)
    relative = diff / max(scale, 1e-12)
    return MergeCheck(
        rows=len(reference),
        tokens=sum(int(r.shape[0]) for r in reference),
        max_abs_diff=diff,
        max_abs_logit=scale,
        relative=relative,
        tolerance=tolerance,
        precision=precision,
    )


def _free() -> None:
    gc.collect()


def merge(
    model_dir: Path, adapter_dir: Path, spec: Any, rt: Any, out: Path, tokenizer: Any, rows: Sequence[Sequence[int]]
) -> tuple[list[Any], Any]:
    """Merge on the CPU and save to ``out``; returns (logits of ``rows`` before merging, the dtype used)."""
    import torch
    from peft import PeftModel

    from kubelora.trainer.modeling import load_base

    dtype = torch.bfloat16 if (rt.device == "cuda" or rt.quantized) else rt.dtype
    cpu = dataclasses.replace(rt, device="cpu", quantized=False)
    base = load_base(model_dir, spec, cpu, quantized=False, dtype=dtype)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    reference = logits_of(model, rows)
    merged = model.merge_and_unload()
    shutil.rmtree(out, ignore_errors=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del merged, model, base
    _free()
    return reference, dtype


def check_export(
    out: Path, rows: Sequence[Sequence[int]], reference: Sequence[Any], dtype: Any, *, trust_remote_code: bool = False
) -> MergeCheck:
    """Load the saved merged model and compare its logits with the adapter's; raises PublishError on a mismatch."""
    from transformers import AutoModelForCausalLM

    try:
        merged = AutoModelForCausalLM.from_pretrained(
            out, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        ).eval()
    except (OSError, ValueError) as e:
        raise PublishError(f"the merged model cannot be loaded back: {e}") from e
    got = logits_of(merged, rows)
    del merged
    _free()
    check = compare(reference, got, tolerance_for(dtype), precision_name(dtype))
    if not check.passed:
        raise MergeMismatchError(
            "the merged model does not match the adapter: logits differ by up to "
            f"{check.max_abs_diff:.4g} ({check.relative:.3g} of the largest logit {check.max_abs_logit:.4g}, "
            f"tolerance {check.tolerance:.3g} in {check.precision}) on {check.rows} test rows; "
            "the merged model is not published"
        )
    return check


def merge_checked(
    model_dir: Path,
    adapter_dir: Path,
    spec: Any,
    rt: Any,
    out: Path,
    tokenizer: Any,
    examples: Sequence[Any],
) -> MergeCheck:
    """Merge the adapter into the base on the CPU, save it to ``out`` and check the export against the adapter."""
    t0 = time.monotonic()
    rows = check_rows(tokenizer, examples)
    reference, dtype = merge(model_dir, adapter_dir, spec, rt, out, tokenizer, rows)
    check = check_export(out, rows, reference, dtype, trust_remote_code=spec.base_model.trust_remote_code)
    (out / CHECK_FILE).write_text(json.dumps(check.to_dict(), indent=2, sort_keys=True) + "\n")
    log.info(
        kv(
            "Merged model matches the adapter",
            rows=check.rows,
            maxAbsDiff=f"{check.max_abs_diff:.3g}",
            relative=f"{check.relative:.3g}",
            tolerance=check.tolerance,
            precision=check.precision,
            seconds=round(time.monotonic() - t0, 2),
        )
    )
    return check
