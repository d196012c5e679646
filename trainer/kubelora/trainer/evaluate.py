"""Step 6, evaluate: the test set on the base and on base+adapter, gates, regression check, samples.

Generation is greedy (``maxNewTokens``) and stops at the end of the assistant's turn: on any of
``generation_config.eos_token_id``, the tokenizer's EOS and the chat template's end-of-turn token
(``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ``</s>``...). The answer is cut at the first of them,
and an empty reasoning block (``<think></think>``, Qwen 3) is dropped, so it is scored as serving shows it.

What is scored is what serving serves. For QLoRA the adapter is scored twice: on the base in serving
precision (bf16; reported as ``adapter``, with ``base`` measured in the same precision) and on the 4-bit
base it was trained against (``adapterTrainingPrecision``). vLLM cannot load a DoRA adapter as a runtime
LoRA, so a DoRA job (which must publish ``output.mergedModel``) is scored on the merged model.

Memory stays bounded: the loss runs the language-model head on label positions only (never a
``[batch, tokens, vocabulary]`` fp32 tensor); the batch size comes from a memory estimate and is halved on
out-of-memory; an evaluation that does not fit one row at a time fails once, as a non-retryable error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kubelora.api.v1alpha1 import EvalResults, GateVerdict, LoRAJobSpec
from kubelora.trainer.data import IGNORE_INDEX, DatasetFile, Example, Renderer, Tokenized, tokenize
from kubelora.trainer.errors import EvaluationError, OutOfMemoryError, TrainerError
from kubelora.trainer.metrics import generation_metrics, judge, perplexity
from kubelora.trainer.modeling import Runtime, load_base
from kubelora.trainer.report import kv

log = logging.getLogger(__name__)

GENERATION = frozenset({"exact_match", "f1", "accuracy", "json_valid", "json_match"})
#: End-of-turn tokens of well-known chat templates: counted as terminators when the template names them.
KNOWN_END_OF_TURN = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
)
_SENTINEL = "kubeloraendofturnprobe"
_EMPTY_REASONING = re.compile(r"^\s*<think>\s*</think>\s*")
#: Label positions sent through the language-model head at once (bounds the fp32 logits).
LOSS_CHUNK = 1024
MAX_EVAL_BATCH = 64
T = TypeVar("T")


@dataclasses.dataclass
class Scored:
    metrics: dict[str, float]
    predictions: list[str]


@dataclasses.dataclass
class Evaluation:
    results: EvalResults
    samples: list[dict[str, Any]]
    details: dict[str, Any]


def _device(model: Any) -> Any:
    return next(p.device for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------------
# Where a turn ends


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, t in added.items() if getattr(t, "special", False))
    return ids


def template_end_of_turn(tokenizer: Any) -> list[int]:
    """The token(s) the chat template closes an assistant turn with.

    Found by rendering a one-turn conversation and reading the first special token after the assistant's
    content; also every well-known end-of-turn token the template's source names (e.g. ``<|im_end|>``).
    """
    found: list[int] = []
    special = _special_ids(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return found
    with contextlib.suppress(Exception):  # a template may refuse this probe (roles, tools...): the list covers it
        rendered = str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
            )
        )
        at = rendered.find(_SENTINEL)
        if at >= 0:
            suffix = rendered[at + len(_SENTINEL) :]
            for i in list(tokenizer(suffix, add_special_tokens=False)["input_ids"])[:8]:
                if i in special:
                    found.append(int(i))
                    break
                if tokenizer.decode([i]).strip():
                    break  # text before any special token: the turn ends in plain text
    vocab = tokenizer.get_vocab()
    for token in KNOWN_END_OF_TURN:
        i = vocab.get(token)
        if i is not None and token in template and i in special and i not in found:
            found.append(int(i))
    return found


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Union of ``generation_config.eos_token_id``, the tokenizer's EOS and the template's end of turn."""
    out: list[int] = []
    config = getattr(model, "generation_config", None)
    for i in [
        *_ids(getattr(config, "eos_token_id", None)),
        *_ids(tokenizer.eos_token_id),
        *template_end_of_turn(tokenizer),
    ]:
        if i not in out:
            out.append(i)
    return out


def cut_at_stop(ids: Sequence[int], stops: Sequence[int]) -> list[int]:
    """The tokens before the first terminator."""
    stop_set = set(stops)
    for n, i in enumerate(ids):
        if i in stop_set:
            return list(ids[:n])
    return list(ids)


def clean_answer(text: str) -> str:
    """The answer as a user reads it: an empty reasoning block dropped, outer whitespace stripped."""
    return _EMPTY_REASONING.sub("", text, count=1).strip()


# --------------------------------------------------------------------------------------------------------------------
# Memory: batch size from an estimate, halved on out-of-memory


def is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free_memory(device: Any) -> int:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 << 30


def row_bytes(config: Any, *, tokens: int, new_tokens: int, dtype_bytes: int) -> int:
    """Peak bytes one evaluation row adds, from the model's shape: a no-grad forward over ``tokens``
    (activations, attention scores, logits on every position in the worst case) or greedy generation
    (the KV cache over ``tokens`` plus the scores of each new token)."""

    def get(*names: str, default: int = 0) -> int:
        for n in names:
            v = getattr(config, n, None)
            if v:
                return int(v)
        return default

    hidden = get("hidden_size", "n_embd", "d_model", default=4096)
    inter = get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    layers = get("num_hidden_layers", "n_layer", "num_layers", default=32)
    heads = get("num_attention_heads", "n_head", default=32)
    kv_heads = get("num_key_value_heads", default=heads)
    head_dim = get("head_dim", default=hidden // max(1, heads))
    vocab = get("vocab_size", default=32000)
    forward = tokens * (4 * hidden + 2 * inter) * dtype_bytes + heads * tokens * tokens * dtype_bytes
    forward += tokens * vocab * (4 + dtype_bytes) // 2  # label positions only: about half the row on average
    kv_cache = 2 * layers * kv_heads * head_dim * (tokens + new_tokens) * dtype_bytes
    generation = kv_cache + 3 * vocab * 4 + (tokens + new_tokens) * (4 * hidden + 2 * inter) * dtype_bytes
    return max(forward, generation)


def eval_batch_size(model: Any, *, tokens: int, new_tokens: int) -> int:
    """``KUBELORA_EVAL_BATCH_SIZE`` if set, else what fits in 60% of the free memory (1..64)."""
    raw = os.environ.get("KUBELORA_EVAL_BATCH_SIZE")
    if raw:
        return max(1, int(raw))
    param = next(model.parameters())
    dtype_bytes = 4 if param.dtype.is_floating_point and param.element_size() >= 4 else 2
    per_row = row_bytes(model.config, tokens=tokens, new_tokens=new_tokens, dtype_bytes=dtype_bytes)
    free = _free_memory(param.device)
    return max(1, min(MAX_EVAL_BATCH, int(free * 0.6) // max(1, per_row)))


def _release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def batched(n: int, batch_size: int, run_batch: Callable[[range], list[T]], what: str) -> list[T]:
    """``run_batch`` over ``range(n)`` in batches; a batch that runs out of memory is retried at half the size.

    One row that does not fit is a :class:`OutOfMemoryError`: permanent, the operator does not retry it.
    """
    out: list[T] = []
    size = max(1, batch_size)
    i = 0
    while i < n:
        idx = range(i, min(n, i + size))
        try:
            out.extend(run_batch(idx))
        except Exception as e:
            if not is_oom(e):
                raise
            _release()
            if size == 1:
                raise OutOfMemoryError(
                    f"evaluation does not fit in memory even one row at a time ({what}): lower "
                    "spec.eval.maxNewTokens or spec.training.maxSeqLength, or use a GPU with more memory"
                ) from e
            size = max(1, size // 2)
            log.warning(kv("Evaluation ran out of memory, halving the batch", what=what, batchSize=size))
            continue
        i = idx.stop
    return out


# --------------------------------------------------------------------------------------------------------------------
# Scoring


def generate(
    model: Any,
    tokenizer: Any,
    renderer: Renderer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    max_len: int,
    batch_size: int,
    stop_ids: Sequence[int] | None = None,
) -> list[str]:
    """Greedy completions of each example's prompt (left-padded batches), cut at the end of the turn."""
    import torch

    device = _device(model)
    stops = list(stop_ids) if stop_ids is not None else stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    budget = max(1, max_len - max_new_tokens)
    prompts = [
        list(tokenizer(renderer.prompt(ex.messages or []), add_special_tokens=False)["input_ids"])[-budget:]
        for ex in examples
    ]

    def run_batch(idx: range) -> list[str]:
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
                eos_token_id=stops or None,
                use_cache=True,
            )
        return [
            clean_answer(tokenizer.decode(cut_at_stop(row.tolist(), stops), skip_special_tokens=True))
            for row in out[:, width:]
        ]

    return batched(len(prompts), batch_size, run_batch, f"generation, maxNewTokens={max_new_tokens}")


def _decoder_and_head(model: Any) -> tuple[Any, Any, float | None] | None:
    """(decoder returning hidden states, LM head, logit soft-cap) of a causal LM, or None if it has another shape."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "logit_scale", None) or getattr(config, "logits_scaling", None):
        return None  # the head's output is rescaled in forward(): take the plain path
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    decoder = getattr(inner, getattr(inner, "base_model_prefix", "") or "model", None)
    if head is None or decoder is None or decoder is inner:
        return None
    cap = getattr(config, "final_logit_softcapping", None)
    return decoder, head, float(cap) if cap else None


def completion_loss(model: Any, rows: Sequence[Tokenized], pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy over completion tokens (prompt tokens are not scored).

    The head runs on the label positions only, in chunks, so no ``[batch, tokens, vocabulary]`` fp32 tensor
    is ever made.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    device = _device(model)
    parts = _decoder_and_head(model)

    def run_batch(idx: range) -> list[tuple[float, int]]:
        batch = [rows[i] for i in idx]
        width = max(len(r.input_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, r in enumerate(batch):
            ids[j, : len(r.input_ids)] = torch.tensor(r.input_ids)
            labels[j, : len(r.labels)] = torch.tensor(r.labels)
            mask[j, : len(r.input_ids)] = 1
        shift = labels[:, 1:].to(device)
        keep = shift != IGNORE_INDEX
        targets = shift[keep]
        with torch.no_grad():
            if parts is not None:
                decoder, head = parts[0], parts[1]
                hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)[0]
                selected = hidden[:, :-1][keep]
                del hidden
            else:
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                selected = logits[:, :-1][keep]  # model dtype; fp32 only per chunk below
                del logits
            total = 0.0
            for start in range(0, int(targets.numel()), LOSS_CHUNK):
                chunk = selected[start : start + LOSS_CHUNK]
                if parts is not None:
                    chunk = head(chunk)
                chunk = chunk.float()
                if parts is not None and parts[2] is not None:
                    chunk = torch.tanh(chunk / parts[2]) * parts[2]
                total += float(F.cross_entropy(chunk, targets[start : start + LOSS_CHUNK], reduction="sum"))
        return [(total, int(targets.numel()))]

    sums = batched(len(rows), batch_size, run_batch, "loss")
    return sum(s for s, _ in sums) / max(1, sum(c for _, c in sums))


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
    max_len = spec.training.max_seq_length
    t0 = time.monotonic()
    # the loss is the expected completion's (the last assistant turn), as the generation metrics score it
    test_rows, _ = tokenize(test.examples, renderer, max_len, all_turns=False)
    if len(test_rows) != len(test.examples):
        raise EvaluationError(f"{test.name}: some rows have no completion tokens after truncation")
    reg_rows = tokenize(regression.examples, renderer, max_len, all_turns=False)[0] if regression else None
    training_precision: Scored | None = None
    model = models[0]
    batch_size = eval_batch_size(model, tokens=max_len, new_tokens=ev.max_new_tokens)
    scored_on = "adapter"
    log.info(kv("Evaluating", rows=len(test_rows), batchSize=batch_size, stopTokens=stop_token_ids(model, tokenizer)))
    try:
        if rt.quantized:
            training_precision = score(model, tokenizer, renderer, spec, test.examples, test_rows, batch_size)
            import torch
            from peft import PeftModel

            models.clear()
            del model
            _release()
            base = load_base(model_dir, spec, rt, quantized=False, dtype=torch.bfloat16)
            model = PeftModel.from_pretrained(base, adapter_dir)
            batch_size = eval_batch_size(model, tokens=max_len, new_tokens=ev.max_new_tokens)
        with _base_only(model):
            base_scored = score(model, tokenizer, renderer, spec, test.examples, test_rows, batch_size)
            base_reg = completion_loss(model, reg_rows, tokenizer.pad_token_id, batch_size) if reg_rows else None
        if spec.method == "dora":
            # vLLM serves a DoRA job only as its merged model: score that.
            model.eval()
            model = model.merge_and_unload()
            scored_on = "merged"
        adapter_scored = score(model, tokenizer, renderer, spec, test.examples, test_rows, batch_size)
        adapter_reg = completion_loss(model, reg_rows, tokenizer.pad_token_id, batch_size) if reg_rows else None
    except TrainerError:
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
        "scoredOn": scored_on,
        "batchSize": batch_size,
    }
    for v in verdicts:
        log.info(kv("Gate", metric=v.metric, rule=v.rule, passed=v.passed, message=v.message))
    models.clear()
    return Evaluation(results, samples, details)
