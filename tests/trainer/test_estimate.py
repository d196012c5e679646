"""The estimator's trainable-parameter count equals peft's on a meta-device model built from the config."""

from __future__ import annotations

from typing import Any

import pytest

from kubelora.trainer import estimate
from kubelora.trainer.errors import UnknownTargetModulesError

pytestmark = [pytest.mark.trainer, pytest.mark.filterwarnings("ignore::FutureWarning")]

# Real shapes (no weights needed: the models are built on the meta device).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    "tiny-llama": {
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 99,
        "tie_word_embeddings": False,
    },
    "mistral-7b": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "head_dim": 128,
    },
    "qwen2-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "qwen3-0.6b": {
        "model_type": "qwen3",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "gemma-2b": {
        "model_type": "gemma",
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "num_hidden_layers": 18,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "vocab_size": 256000,
    },
    "phi3-mini": {
        "model_type": "phi3",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
    },
}


def peft_trainable(config: dict[str, Any], targets: list[str], rank: int, dora: bool) -> tuple[int, int]:
    """(trainable, total) parameters as peft reports them, on a meta-device model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=rank,
                lora_alpha=2 * rank,
                target_modules="all-linear" if targets == ["all-linear"] else targets,
                use_dora=dora,
                task_type="CAUSAL_LM",
            ),
        )
    return peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize(
    ("targets", "rank", "dora"),
    [(["all-linear"], 16, False), (["q_proj", "v_proj"], 8, False), (["all-linear"], 4, True)],
    ids=["all-linear", "q-v", "dora"],
)
def test_trainable_parameters_match_peft(name: str, targets: list[str], rank: int, dora: bool) -> None:
    config = CONFIGS[name]
    if name == "phi3-mini" and targets == ["q_proj", "v_proj"]:
        targets = ["qkv_proj"]
    want, total = peft_trainable(config, targets, rank, dora)
    got = estimate.estimate(config, method="dora" if dora else "lora", rank=rank, target_modules=targets)
    assert got.trainable_parameters == want
    # the total is approximate (biases ignored), but close
    assert abs(got.total_parameters + want - total) / total < 0.01


def test_meta_model_layers_match_the_table() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = CONFIGS["qwen2-0.5b"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    from_model = estimate.linear_layers_from_model(model)
    table = estimate.linear_layers(config)
    assert sorted((x.name, x.in_features, x.out_features, x.count) for x in from_model) == sorted(
        (x.name, x.in_features, x.out_features, x.count) for x in table
    )
    got = estimate.estimate(config, rank=16, layers=from_model)
    assert got.trainable_parameters == estimate.estimate(config, rank=16).trainable_parameters


def test_unknown_target_modules_name_the_available_ones() -> None:
    with pytest.raises(UnknownTargetModulesError) as e:
        estimate.estimate(CONFIGS["llama-3-8b"], target_modules=["q_proj", "query_key_value"])
    assert "query_key_value" in str(e.value) and "q_proj" in str(e.value).split("it has")[1]


def test_memory_components_and_qlora_saving() -> None:
    cfg = CONFIGS["llama-3-8b"]
    bf16 = estimate.estimate(cfg, method="lora", rank=16, batch_size=1, seq_len=2048)
    nf4 = estimate.estimate(cfg, method="qlora", rank=16, batch_size=1, seq_len=2048)
    assert set(bf16.memory_bytes) == {
        "weights",
        "loraParameters",
        "gradients",
        "optimizerState",
        "activations",
        "logits",
        "total",
    }
    assert bf16.memory_bytes["total"] == sum(v for k, v in bf16.memory_bytes.items() if k != "total")
    # 8B parameters: ~16 GB in bf16, ~5.5 GB in NF4 (embeddings and head stay bf16)
    assert 14.5e9 < bf16.memory_bytes["weights"] < 16.5e9
    assert 4.5e9 < nf4.memory_bytes["weights"] < 6.5e9
    assert bf16.memory_bytes["optimizerState"] == 2 * bf16.memory_bytes["loraParameters"]
    no_gc = estimate.estimate(cfg, rank=16, batch_size=1, seq_len=2048, gradient_checkpointing=False)
    assert no_gc.memory_bytes["activations"] > 5 * bf16.memory_bytes["activations"]


def test_gpu_hours_and_fit() -> None:
    cfg = CONFIGS["llama-3-8b"]
    est = estimate.estimate(
        cfg,
        rank=16,
        batch_size=4,
        seq_len=1024,
        train_tokens=10_000_000,
        epochs=2,
        gpu_type="NVIDIA-A100-SXM4-80GB",
    )
    assert est.tokens == 20_000_000
    assert est.gpu_memory_bytes == 80 * estimate.GIB
    assert est.fits() is True
    # ~6 * 8e9 * 2e7 FLOPs at 35% of 312 TFLOPS: about 2.4 GPU-hours
    assert est.gpu_hours is not None and 1.5 < est.gpu_hours < 4
    small = estimate.estimate(cfg, rank=16, gpu_type="Tesla-T4", batch_size=8, seq_len=4096)
    assert small.gpu_memory_bytes == 16 * estimate.GIB and small.fits() is False
    assert est.to_dict()["totalBytesPerGpu"] == est.total_memory_bytes


def test_estimate_for_spec_defaults_to_one_epoch() -> None:
    from kubelora.api.v1alpha1 import LoRAJobSpec

    spec = LoRAJobSpec.model_validate(
        {
            "baseModel": {"uri": "hf://x/y"},
            "dataset": {"train": "s3://b/train.jsonl"},
            "output": {"uri": "s3://b/out/"},
            "lora": {"rank": 8, "targetModules": ["q_proj", "v_proj"]},
        }
    )
    est = estimate.estimate_for_spec(CONFIGS["tiny-llama"], spec, train_tokens=5000, train_examples=100)
    assert est.tokens == 5000
    assert est.trainable_parameters == 2 * (8 * (128 + 128) + 8 * (128 + 64))


def test_unsupported_architecture() -> None:
    with pytest.raises(estimate.UnsupportedArchitectureError):
        estimate.linear_layers({"model_type": "mamba", "hidden_size": 8})


LLAMA_3_70B: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
A100_80 = "NVIDIA-A100-SXM4-80GB"


def test_70b_lora_shards_with_fsdp_on_8_a100s_and_is_refused_on_one() -> None:
    one = estimate.estimate(LLAMA_3_70B, method="lora", gpus=1, gpu_type=A100_80)
    assert one.strategy == "Single" and one.fits() is False
    assert one.memory_bytes["weights"] > 120 * estimate.GIB  # 70B in bf16
    refusal = one.refusal()
    assert refusal is not None and "does not fit" in refusal and "FSDP" in refusal
    eight = estimate.estimate(LLAMA_3_70B, method="lora", gpus=8, gpu_type=A100_80)
    assert eight.strategy == "FSDP" and eight.world_size == 8 and eight.fits() is True and eight.refusal() is None
    assert eight.total_memory_bytes <= 80 * estimate.GIB < eight.replicated_bytes
    # Weights and training state are split eight ways; activations are not.
    assert eight.memory_bytes["weights"] == -(-one.memory_bytes["weights"] // 8)
    assert eight.memory_bytes["activations"] == one.memory_bytes["activations"]
    assert eight.memory_bytes["total"] == sum(v for k, v in eight.memory_bytes.items() if k != "total")
    as_dict = eight.to_dict()
    assert as_dict["strategy"] == "FSDP" and as_dict["totalBytesPerGpu"] == eight.total_memory_bytes
    # The global batch is the spec's (batchSize x gradientAccumulation) whatever the world size.
    assert as_dict["globalBatchSize"] == 8 and as_dict["worldSize"] == 8


def test_ddp_when_the_model_fits_one_gpu_and_qlora_through_fsdp_when_not() -> None:
    small = estimate.estimate(CONFIGS["llama-3-8b"], gpus=4, gpu_type=A100_80, batch_size=2, seq_len=1024)
    assert small.strategy == "DDP" and small.total_memory_bytes == small.replicated_bytes and small.fits()
    unknown_gpu = estimate.estimate(LLAMA_3_70B, gpus=2)
    assert unknown_gpu.strategy == "DDP" and unknown_gpu.fits() is None
    qlora = estimate.estimate(LLAMA_3_70B, method="qlora", gpus=2, gpu_type=A100_80)
    assert qlora.weight_precision == "nf4" and qlora.replicated_bytes > 80 * estimate.GIB
    assert qlora.strategy == "FSDP" and qlora.fits() is True
    nodes = estimate.estimate(LLAMA_3_70B, gpus=8, nodes=2, gpu_type=A100_80, gradient_accumulation=2)
    assert nodes.world_size == 16 and nodes.strategy == "FSDP" and nodes.global_batch_size == 8 * 2
    assert nodes.total_memory_bytes < estimate.estimate(LLAMA_3_70B, gpus=8, gpu_type=A100_80).total_memory_bytes
