"""`kubelora estimate` agrees with peft on the trainable-parameter count, from config.json alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

LLAMA_3_8B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}


def peft_trainable(config: dict, rank: int, targets: list[str], use_dora: bool) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    target = "all-linear" if targets == ["all-linear"] else targets
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, target_modules=target, use_dora=use_dora, task_type="CAUSAL_LM")
    )
    trainable, _ = peft_model.get_nb_trainable_parameters()
    return int(trainable)


@pytest.mark.parametrize(
    ("method", "rank", "targets"),
    [("qlora", 16, ["all-linear"]), ("dora", 8, ["q_proj", "v_proj"]), ("lora", 64, ["all-linear"])],
)
def test_estimate_matches_peft_on_a_meta_device_model(tmp_path, method, rank, targets):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(LLAMA_3_8B))
    manifest = {
        "apiVersion": "kubelora.dev/v1alpha1",
        "kind": "LoRAJob",
        "metadata": {"name": "sizing"},
        "spec": {
            "baseModel": {"uri": "s3://models/llama-3-8b/"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "method": method,
            "lora": {"rank": rank, "targetModules": targets},
            "training": {"maxSteps": 1000, "batchSize": 4, "maxSeqLength": 1024},
            "resources": {"gpus": 1, "gpuType": "NVIDIA-A100-SXM4-80GB"},
            # vLLM serves DoRA only merged: a DoRA job must publish its merged model
            "output": {"uri": "s3://adapters/sizing/", "mergedModel": method == "dora"},
        },
    }
    manifest_path = tmp_path / "job.yaml"
    manifest_path.write_text(yaml.safe_dump(manifest))
    command = [
        sys.executable,
        "-m",
        "kubelora.cli",
        "estimate",
        str(manifest_path),
        "--model-config",
        str(config_path),
        "--json",
    ]
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    assert result["trainableParameters"] == peft_trainable(LLAMA_3_8B, rank, targets, method == "dora")
    assert result["costEstimate"].endswith(" USD") and result["gpuHours"] > 0
    assert result["memoryBytes"]["total"] == sum(v for k, v in result["memoryBytes"].items() if k != "total")


def test_estimate_names_the_bad_field(tmp_path):
    manifest_path = tmp_path / "job.yaml"
    manifest_path.write_text(
        yaml.safe_dump(
            {
                "spec": {
                    "baseModel": {"uri": "s3://m/"},
                    "dataset": {"train": "s3://d"},
                    "output": {"uri": "s3://o/"},
                    "lora": {"rank": 0},
                }
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "kubelora.cli", "estimate", str(manifest_path)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "rank" in result.stderr


LLAMA_3_70B = {
    **LLAMA_3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}


@pytest.mark.parametrize("gpus", [8, 1])
def test_estimate_70b_picks_fsdp_on_8_a100s_and_refuses_one(tmp_path, gpus):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(LLAMA_3_70B))
    manifest_path = tmp_path / "job.yaml"
    manifest_path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubelora.dev/v1alpha1",
                "kind": "LoRAJob",
                "metadata": {"name": "big"},
                "spec": {
                    "baseModel": {"uri": "s3://models/llama-3-70b/"},
                    "dataset": {"train": "s3://data/train.jsonl"},
                    "method": "lora",
                    "resources": {"gpus": gpus, "gpuType": "NVIDIA-A100-SXM4-80GB"},
                    "output": {"uri": "s3://adapters/big/"},
                },
            }
        )
    )
    base = [sys.executable, "-m", "kubelora.cli", "estimate", str(manifest_path), "--model-config", str(config_path)]
    result = subprocess.run([*base, "--json"], capture_output=True, text=True)
    estimate = json.loads(result.stdout)
    table = subprocess.run(base, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if gpus == 8:
        assert result.returncode == 0, result.stderr
        assert estimate["strategy"] == "FSDP" and estimate["worldSize"] == 8 and estimate["fits"] is True
        assert estimate["totalBytesPerGpu"] <= 80 * 2**30 < estimate["replicatedBytesPerGpu"]
        assert table.returncode == 0 and "FSDP" in table.stdout and "total per GPU" in table.stdout
    else:
        assert result.returncode == 1 and estimate["fits"] is False
        assert "Refused" in result.stderr and "80.0 GiB" in result.stderr
        assert table.returncode == 1 and "NO" in table.stdout
