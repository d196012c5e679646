"""Evaluation memory: loss on label positions only, a batch size from the estimate, halving on out-of-memory,
and one clear, permanent error when one row does not fit. DoRA jobs are scored on the merged model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from kubelora.trainer import evaluate
from kubelora.trainer.data import IGNORE_INDEX, Tokenized
from kubelora.trainer.errors import EXIT_PERMANENT, EvaluationError, OutOfMemoryError
from tests.trainer import families

pytestmark = [pytest.mark.trainer, pytest.mark.filterwarnings("ignore::UserWarning")]


def rows(tok: Any, n: int = 5) -> list[Tokenized]:
    import random

    rng = random.Random(0)
    vocab = len(tok)
    out = []
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(4 + i)]
        completion = [rng.randrange(vocab) for _ in range(2 + 2 * i)]
        out.append(Tokenized(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
    return out


def reference_loss(model: Any, batch: list[Tokenized], pad: int) -> float:
    """The plain way: full logits, upcast to fp32, one row at a time."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    for r in batch:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([r.input_ids])).logits.float()[0]
        labels = torch.tensor(r.labels[1:])
        total += float(F.cross_entropy(logits[:-1], labels, ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    return total / count


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_loss_runs_the_head_on_label_positions_only(name: str) -> None:
    _, tok, model = families.build(name)
    data = rows(tok)
    want = reference_loss(model, data, tok.pad_token_id)
    head_rows: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: head_rows.append(args[0].shape[0] if args[0].dim() == 2 else -1)
    )
    try:
        got = evaluate.completion_loss(model, data, tok.pad_token_id, batch_size=2)
    finally:
        handle.remove()
    assert got == pytest.approx(want, rel=1e-5)
    labels = sum(sum(1 for x in r.labels[1:] if x != IGNORE_INDEX) for r in data)
    # never a [batch, tokens, vocabulary] pass: the head saw exactly the label positions, as 2-D rows
    assert sum(head_rows) == labels and all(n > 0 for n in head_rows), head_rows


def test_loss_of_a_peft_model_with_and_without_its_adapter() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    _, tok, model = families.build("llama3")
    torch.manual_seed(1)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    )
    data = rows(tok)
    with_adapter = evaluate.completion_loss(peft_model, data, tok.pad_token_id, batch_size=3)
    assert with_adapter == pytest.approx(reference_loss(peft_model, data, tok.pad_token_id), rel=1e-5)
    with peft_model.disable_adapter():
        without = evaluate.completion_loss(peft_model, data, tok.pad_token_id, batch_size=3)
        assert without == pytest.approx(reference_loss(peft_model, data, tok.pad_token_id), rel=1e-5)
    assert abs(with_adapter - without) > 1e-3


def oom_above(model: Any, limit: int) -> tuple[Any, list[int]]:
    """Make the decoder run out of memory for batches larger than ``limit``; returns (hook handle, batch sizes)."""
    import torch

    seen: list[int] = []

    def hook(module: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        seen.append(int(ids.shape[0]))
        if ids.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder.register_forward_pre_hook(hook, with_kwargs=True), seen


def test_out_of_memory_halves_the_batch(caplog: pytest.LogCaptureFixture) -> None:
    _, tok, model = families.build("qwen2.5")
    data = rows(tok, n=7)
    want = evaluate.completion_loss(model, data, tok.pad_token_id, batch_size=8)
    handle, seen = oom_above(model, 2)
    try:
        with caplog.at_level(logging.WARNING):
            got = evaluate.completion_loss(model, data, tok.pad_token_id, batch_size=8)
    finally:
        handle.remove()
    assert got == pytest.approx(want, rel=1e-6)
    assert seen == [7, 4, 2, 2, 2, 1]  # 8 -> 4 -> 2, then the rest at 2
    assert "Evaluation ran out of memory, halving the batch" in caplog.text


def test_generation_halves_the_batch_too() -> None:
    from kubelora.trainer.data import Example, Renderer

    _, tok, model = families.build("gemma")
    examples = [Example(f"t:{i}", messages=[{"role": "user", "content": "help " * (i + 1)}]) for i in range(4)]
    kwargs: dict[str, Any] = {"max_new_tokens": 3, "max_len": 64, "stop_ids": []}
    want = evaluate.generate(model, tok, Renderer(tok), examples, batch_size=4, **kwargs)
    handle, seen = oom_above(model, 1)
    try:
        got = evaluate.generate(model, tok, Renderer(tok), examples, batch_size=4, **kwargs)
    finally:
        handle.remove()
    assert got == want and len(got) == 4
    assert max(seen) == 4 and set(seen[-3:]) == {1}


def test_a_row_that_does_not_fit_fails_once_and_for_good() -> None:
    _, tok, model = families.build("mistral")
    handle, seen = oom_above(model, 0)
    try:
        with pytest.raises(OutOfMemoryError) as err:
            evaluate.completion_loss(model, rows(tok), tok.pad_token_id, batch_size=4)
    finally:
        handle.remove()
    assert seen == [4, 2, 1]
    assert err.value.exit_code == EXIT_PERMANENT and err.value.reason == "OutOfMemory"
    assert "does not fit in memory even one row at a time" in err.value.message
    assert "spec.eval.maxNewTokens" in err.value.message


def test_batch_size_from_the_memory_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, model = families.build("llama3")
    monkeypatch.delenv("KUBELORA_EVAL_BATCH_SIZE", raising=False)
    per_row = evaluate.row_bytes(model.config, tokens=128, new_tokens=16, dtype_bytes=4)
    assert per_row > 0
    monkeypatch.setattr(evaluate, "_free_memory", lambda device: int(per_row * 10 / 0.6) + 1)
    assert evaluate.eval_batch_size(model, tokens=128, new_tokens=16) == 10
    monkeypatch.setattr(evaluate, "_free_memory", lambda device: per_row // 3)
    assert evaluate.eval_batch_size(model, tokens=128, new_tokens=16) == 1
    monkeypatch.setattr(evaluate, "_free_memory", lambda device: per_row * 10_000)
    assert evaluate.eval_batch_size(model, tokens=128, new_tokens=16) == evaluate.MAX_EVAL_BATCH
    # longer rows cost more
    assert evaluate.row_bytes(model.config, tokens=1024, new_tokens=16, dtype_bytes=4) > per_row
    monkeypatch.setenv("KUBELORA_EVAL_BATCH_SIZE", "3")
    assert evaluate.eval_batch_size(model, tokens=128, new_tokens=16) == 3


# ---------------------------------------------------------------------------------------------------------------
# evaluate.run end to end on the tiny kit: DoRA is scored merged; an eval that cannot fit is permanent


def _setup(tmp_path: Path, method: str) -> tuple[Any, ...]:
    import types

    import torch

    from kubelora.api.v1alpha1 import LoRAJobSpec
    from kubelora.trainer import data, modeling, tiny

    model_dir = tiny.build_tiny_model(tmp_path / "model", hidden_size=32, intermediate_size=64, num_layers=1)
    task = tiny.write_task(tmp_path / "task", n_train=8, n_test=6, n_regression=4)
    spec = LoRAJobSpec.model_validate(
        {
            "baseModel": {"uri": f"file://{model_dir}"},
            "dataset": {"train": f"file://{task['train']}"},
            "method": method,
            "lora": {"rank": 4, "alpha": 8},
            "training": {"maxSeqLength": 64},
            "output": {"uri": f"file://{tmp_path}/out", "mergedModel": method == "dora"},
            "eval": {
                "testSet": f"file://{task['test']}",
                "metrics": ["exact_match"],
                "maxNewTokens": 3,
                "regression": {"dataset": f"file://{task['regression']}", "maxLossIncrease": 100},
            },
        }
    )
    rt = modeling.choose_runtime(method)
    model, tok = modeling.load_for_training(model_dir, spec, rt)
    torch.manual_seed(3)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    renderer = data.Renderer(tok)
    test = data.read_jsonl(task["test"], "chat")
    regression = data.read_jsonl(task["regression"], "chat")
    cfg = types.SimpleNamespace(spec=spec)
    return cfg, model, tok, renderer, rt, test, regression, model_dir


def test_a_dora_job_is_scored_on_the_merged_model(tmp_path: Path) -> None:
    import copy

    cfg, model, tok, renderer, rt, test, regression, model_dir = _setup(tmp_path, "dora")
    unmerged = copy.deepcopy(model).eval()
    ev = evaluate.run(cfg, [model], tok, renderer, rt, test, regression, model_dir, tmp_path / "unused")
    assert ev.details["scoredOn"] == "merged"
    from kubelora.trainer.data import tokenize

    rows_, _ = tokenize(test.examples, renderer, 64, all_turns=False)
    # what the merged model scores is what the adapter computes (the merge is faithful), and not the base's
    assert ev.results.adapter["loss"] == pytest.approx(
        evaluate.completion_loss(unmerged, rows_, tok.pad_token_id, 4), rel=1e-4
    )
    assert abs(ev.results.adapter["loss"] - ev.results.base["loss"]) > 1e-3
    assert ev.results.adapter["regression_loss"] != ev.results.base["regression_loss"]


def test_an_eval_that_cannot_fit_is_a_permanent_error(tmp_path: Path) -> None:
    cfg, model, tok, renderer, rt, test, regression, model_dir = _setup(tmp_path, "lora")
    handle, _ = oom_above(model.get_base_model(), 0)
    try:
        with pytest.raises(OutOfMemoryError) as err:
            evaluate.run(cfg, [model], tok, renderer, rt, test, regression, model_dir, tmp_path / "unused")
    finally:
        handle.remove()
    # not wrapped into the retryable EvaluationError the operator would retry
    assert not isinstance(err.value, EvaluationError) and err.value.exit_code == EXIT_PERMANENT
