"""The merged export (output.mergedModel) computes what the adapter does, is made on the CPU, and a merge that
does not (a corrupted export, a merge that ignores rsLoRA's scaling) is caught and not published."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubelora.trainer import merge, modeling, tiny
from kubelora.trainer.errors import EXIT_PERMANENT, PublishError

pytestmark = [pytest.mark.trainer, pytest.mark.filterwarnings("ignore::UserWarning")]

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("merge")
    return tiny.build_tiny_model(root / "model", hidden_size=32, intermediate_size=64, num_layers=2)


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    from kubelora.trainer import data

    path = tiny.write_jsonl(tiny.make_tickets(6, seed=3), tmp_path_factory.mktemp("rows") / "test.jsonl")
    return data.read_jsonl(path, "chat").examples


def spec_for(base: Path, method: str = "lora", rs_lora: bool = True) -> Any:
    from kubelora.api.v1alpha1 import LoRAJobSpec

    return LoRAJobSpec.model_validate(
        {
            "baseModel": {"uri": f"file://{base}"},
            "dataset": {"train": "file:///unused.jsonl"},
            "method": method,
            "lora": {"rank": 4, "alpha": 16, "rsLoRA": rs_lora, "targetModules": TARGETS},
            "output": {"uri": "file:///unused", "mergedModel": True},
        }
    )


def make_adapter(base: Path, out: Path, *, dora: bool = False, seed: int = 5) -> Path:
    """An adapter with random A and B (a fresh one has B = 0 and merges to the base itself)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        use_rslora=True,
        use_dora=dora,
        target_modules=TARGETS,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.mul_(3.0)  # an adapter that moves the logits visibly, as a trained one does
    peft_model.save_pretrained(out)
    return out


def runtime(device: str = "cpu") -> Any:
    import torch

    if device == "cuda":  # what a GPU run hands over: the merge must still run on the CPU, in bf16
        return modeling.Runtime("cuda", torch.bfloat16, False, bf16=True, fp16=False)
    return modeling.choose_runtime("lora")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_the_merged_export_matches_the_adapter(base_dir: Path, examples: list[Any], tmp_path: Path, dora: bool):
    adapter = make_adapter(base_dir, tmp_path / "adapter", dora=dora)
    tok = modeling.load_tokenizer(base_dir, False)
    out = tmp_path / "merged"
    spec = spec_for(base_dir, "dora" if dora else "lora")
    check = merge.merge_checked(base_dir, adapter, spec, runtime(), out, tok, examples)
    assert check.passed and check.precision == "fp32" and check.rows == 4 and check.tokens > 40
    assert check.relative < 1e-5 < check.tolerance
    written = json.loads((out / merge.CHECK_FILE).read_text())
    assert written["passed"] is True and written["relative"] == check.relative
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # the adapter is not a no-op: the base's logits are far from the adapter's
    rows = merge.check_rows(tok, examples)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    far = merge.compare(merge.logits_of(base, rows), merge.logits_of(merged, rows), 1e-3, "fp32")
    assert far.relative > 100 * check.relative and not far.passed


def test_a_corrupted_export_is_caught(base_dir: Path, examples: list[Any], tmp_path: Path):
    import torch
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(base_dir, tmp_path / "adapter")
    tok = modeling.load_tokenizer(base_dir, False)
    out = tmp_path / "merged"
    rows = merge.check_rows(tok, examples)
    reference, dtype = merge.merge(base_dir, adapter, spec_for(base_dir), runtime(), out, tok, rows)
    assert merge.check_export(out, rows, reference, dtype).passed
    # The adapter's update applied twice to one layer: what a merge into an already merged base would write.
    weights = load_file(out / "model.safetensors")
    original = load_file(base_dir / "model.safetensors")
    name = "model.layers.1.self_attn.v_proj.weight"
    delta = weights[name] - original[name]
    assert float(delta.abs().max()) > 0
    weights[name] = weights[name] + delta
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PublishError) as err:
        merge.check_export(out, rows, reference, dtype)
    assert err.value.reason == "MergeMismatch" and err.value.exit_code == EXIT_PERMANENT
    assert "the merged model does not match the adapter" in err.value.message
    assert "tolerance 0.001 in fp32" in err.value.message
    assert torch.is_tensor(reference[0])


def test_a_merge_that_ignores_rslora_scaling_is_caught(base_dir: Path, examples: list[Any], tmp_path: Path):
    """The export is merged with alpha/r instead of rsLoRA's alpha/sqrt(r): checked against the real adapter."""
    import shutil

    adapter = make_adapter(base_dir, tmp_path / "adapter")
    wrong = tmp_path / "wrong-adapter"
    shutil.copytree(adapter, wrong)
    config = json.loads((wrong / "adapter_config.json").read_text())
    assert config["use_rslora"] is True
    config["use_rslora"] = False
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    tok = modeling.load_tokenizer(base_dir, False)
    rows = merge.check_rows(tok, examples)
    reference, dtype = merge.merge(base_dir, adapter, spec_for(base_dir), runtime(), tmp_path / "right", tok, rows)
    _, _ = merge.merge(base_dir, wrong, spec_for(base_dir), runtime(), tmp_path / "merged", tok, rows)
    with pytest.raises(PublishError, match="does not match the adapter"):
        merge.check_export(tmp_path / "merged", rows, reference, dtype)


def test_the_merge_runs_on_the_cpu_in_serving_precision(
    base_dir: Path, examples: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import torch

    seen: list[tuple[str, Any, bool]] = []
    load_base = modeling.load_base

    def recording(model_dir: Path, spec: Any, rt: Any, *, quantized: bool | None = None, dtype: Any = None) -> Any:
        seen.append((rt.device, dtype, bool(quantized)))
        return load_base(model_dir, spec, rt, quantized=quantized, dtype=dtype)

    monkeypatch.setattr(modeling, "load_base", recording)
    adapter = make_adapter(base_dir, tmp_path / "adapter")
    tok = modeling.load_tokenizer(base_dir, False)
    check = merge.merge_checked(
        base_dir, adapter, spec_for(base_dir), runtime("cuda"), tmp_path / "merged", tok, examples
    )
    assert seen == [("cpu", torch.bfloat16, False)]
    assert check.precision == "bf16" and check.passed
    from safetensors import safe_open

    with safe_open(tmp_path / "merged" / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118


def test_check_rows_render_whole_conversations(base_dir: Path, examples: list[Any]):
    tok = modeling.load_tokenizer(base_dir, False)
    rows = merge.check_rows(tok, examples, rows=2, max_tokens=8)
    assert len(rows) == 2 and all(len(r) == 8 for r in rows)
    full = merge.check_rows(tok, examples[:1], max_tokens=1000)[0]
    answer = tok.convert_tokens_to_ids(examples[0].completion)
    assert answer in full and tok.convert_tokens_to_ids("<|assistant|>") in full
