"""GPU benchmark: kubelora's trainer against TRL's recommended fast settings, on a Qwen2.5-0.5B-shaped model.

The model is random (no download): Qwen2 architecture with Qwen2.5-0.5B's shapes (24 layers, hidden
896, MLP 4864, 14 query / 2 KV heads, 151,936-token vocabulary, tied embeddings), bf16 where the GPU
computes it natively. The rows are the variable-length multi-turn chat rows of ``bench/trainer.py``
(log-normal lengths, 30-1,500 tokens), with the tiny word-level tokenizer (ids are a subset of the
vocabulary; the throughput does not depend on which ids they are).

* ours: the whole CLI (``python -m kubelora.trainer``) with ``packing: true``: its automatic choices
  (flash-attention or kernels when installed, Liger kernels when installed, fused AdamW, padding-free
  packed batches);
* TRL fast: ``SFTTrainer`` as TRL's documentation recommends for speed: ``packing=True`` (BFD,
  padding-free), ``attn_implementation`` flash-attention when installed, ``use_liger_kernel`` when
  installed, bf16, the same LoRA config and optimizer steps.

Printed JSON: per side, non-padding tokens/s, peak GPU memory (``torch.cuda.max_memory_allocated``),
MFU (model FLOPs utilisation: ``6 x parameters + attention`` FLOPs per token, forward and backward,
over the GPU's peak dense bf16/fp16 FLOPs; ``--peak-tflops`` overrides the table), and the ratios.

    .venv/bin/python bench/trainer_gpu.py [--steps 30] [--batch 8] [--max-len 2048] [--peak-tflops N]
"""

from __future__ import annotations

import sys

sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("/bench")]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LR, RANK, ALPHA, SEED, VAL_SPLIT = 2e-4, 16, 32, 7, 0.02
QWEN25_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
#: Peak dense bf16 tensor TFLOPs by device name fragment (vendor data sheets, without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "A10": 125.0}


def bench_rows() -> Any:
    """``chat_rows`` of bench/trainer.py (the script's directory is not on the import path)."""
    spec = importlib.util.spec_from_file_location("kubelora_bench_trainer", Path(__file__).with_name("trainer.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.chat_rows


def build_model(path: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from kubelora.trainer import tiny

    tok = tiny.build_tokenizer()
    config = Qwen2Config(
        **QWEN25_05B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def flops_per_token(n_params: int, seq_len: float) -> float:
    """Forward+backward FLOPs per token: 6N for the weights plus 12 x layers x hidden x context for
    attention (PaLM appendix B), ``seq_len`` being the mean context a token attends to. The frozen
    base runs its backward through activations but computes no weight gradients, so 6N overstates
    LoRA's work by up to a third: the figure compares the two sides, it is not an absolute."""
    c = QWEN25_05B
    return 6.0 * n_params + 12.0 * c["num_hidden_layers"] * c["hidden_size"] * seq_len


def peak_flops(override: float | None) -> float | None:
    import torch

    if override:
        return override * 1e12
    name = torch.cuda.get_device_name(0)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def child_ours(root: Path, steps: int, batch: int, max_len: int) -> dict[str, Any]:
    import torch
    import yaml

    from kubelora.trainer.cli import main

    spec = {
        "baseModel": {"uri": f"file://{root}/model"},
        "dataset": {"train": f"file://{root}/train.jsonl", "format": "chat", "validationSplit": VAL_SPLIT},
        "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "targetModules": ["all-linear"]},
        "training": {
            "maxSteps": steps,
            "learningRate": LR,
            "batchSize": batch,
            "maxSeqLength": max_len,
            "packing": True,
            "checkpointEverySteps": 100_000,
            "gradientCheckpointing": False,
            "warmupRatio": 0.0,
            "seed": SEED,
        },
        "output": {"uri": f"file://{root}/out-ours"},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    for old in ("out-ours", "work"):
        shutil.rmtree(root / old, ignore_errors=True)
    report = root / "ours.jsonl"
    report.unlink(missing_ok=True)
    torch.cuda.reset_peak_memory_stats()
    rc = main(["--spec", str(root / "spec.yaml"), "--report-file", str(report), "--workdir", str(root / "work")])
    events = [json.loads(x) for x in report.read_text().splitlines()]
    result = next(e for e in events if e["type"] == "result")
    model_event = next(e for e in events if e["type"] == "model")
    return {
        "exitCode": rc,
        "steps": result["training"]["steps"],
        "tokensPerSecond": result["training"]["tokensPerSecond"],
        "trainLoss": result["training"]["trainLoss"],
        "peakGpuMemoryGiB": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "settings": {k: model_event.get(k) for k in ("attention", "optim", "use_liger_kernel", "precision")},
    }


def child_trl(root: Path, steps: int, batch: int, max_len: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from kubelora.trainer import data, modeling

    examples = data.read_jsonl(root / "train.jsonl", "chat").examples
    train, _ = data.split(examples, VAL_SPLIT, SEED)
    tok = modeling.load_tokenizer(root / "model", False)
    rows, _ = data.tokenize(train, data.Renderer(tok), max_len)
    bf16 = torch.cuda.get_device_capability()[0] >= 8
    attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(
        root / "model", dtype=torch.bfloat16 if bf16 else torch.float16, attn_implementation=attn
    ).to("cuda")
    args = SFTConfig(
        output_dir=str(root / "out-trl"),
        max_steps=steps,
        learning_rate=LR,
        per_device_train_batch_size=batch,
        max_length=max_len,
        packing=True,
        padding_free=True,
        use_liger_kernel=importlib.util.find_spec("liger_kernel") is not None,
        bf16=bf16,
        fp16=not bf16,
        activation_checkpointing=False,
        seed=SEED,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )
    peft_config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )

    class Clock(TrainerCallback):
        t0 = 0.0
        seconds = 0.0

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            torch.cuda.synchronize()
            Clock.t0 = time.monotonic()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            torch.cuda.synchronize()
            Clock.seconds = time.monotonic() - Clock.t0

    torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.to_dataset(rows, "chat"),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[Clock()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    return {
        "exitCode": 0,
        "steps": int(trainer.state.global_step),
        "tokensPerSecond": int(trainer.state.num_input_tokens_seen) / Clock.seconds,
        "trainLoss": sum(losses) / len(losses) if losses else None,
        "peakGpuMemoryGiB": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "settings": {"attention": attn, "use_liger_kernel": args.use_liger_kernel, "optim": args.optim},
    }


def run_child(side: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-P", __file__, "--child", side, "--root", str(root)]
    cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--max-len", str(args.max_len)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{side} failed with exit code {proc.returncode}")
    return dict(json.loads(lines[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps, the same for both sides")
    p.add_argument("--batch", type=int, default=8, help="rows (packed rows for both sides) per step")
    p.add_argument("--max-len", type=int, default=2048, help="maxSeqLength / packed row length")
    p.add_argument("--rows", type=int, default=3000, help="chat rows generated")
    p.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16/fp16 TFLOPs (default: by name)")
    p.add_argument("--keep", type=Path, help="work in this directory and keep it")
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import logging

        logging.disable(logging.WARNING)
        child = child_ours if args.child == "ours" else child_trl
        print(json.dumps(child(args.root, args.steps, args.batch, args.max_len)))
        return

    sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer")]
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/trainer_gpu.py needs a CUDA GPU (bench/trainer.py is the CPU benchmark)")
    from kubelora.trainer import tiny

    root = args.keep or Path(tempfile.mkdtemp(prefix="kubelora-bench-gpu-"))
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "model" / "config.json").is_file():
        build_model(root / "model")
    tiny.write_jsonl(bench_rows()(args.rows, SEED), root / "train.jsonl")
    ours = run_child("ours", root, args)
    trl = run_child("trl", root, args)

    from transformers import AutoConfig, AutoModelForCausalLM

    from kubelora.trainer import data, modeling

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root / "model"))
    n_params = sum(p.numel() for p in meta.parameters())  # tied embeddings count once
    renderer = data.Renderer(modeling.load_tokenizer(root / "model", False))
    examples = data.read_jsonl(root / "train.jsonl", "chat").examples
    lengths = [min(len(renderer.encode(ex)[0]), args.max_len) for ex in examples]
    mean_context = sum(n * n / 2 for n in lengths) / sum(lengths)  # attention within each document
    peak = peak_flops(args.peak_tflops)
    for side in (ours, trl):
        fpt = flops_per_token(n_params, mean_context)
        side["mfu"] = round(side["tokensPerSecond"] * fpt / peak, 4) if peak else None
    report = {
        "gpu": torch.cuda.get_device_name(0),
        "model": "random Qwen2.5-0.5B shape",
        "parameters": n_params,
        "steps": args.steps,
        "batch": args.batch,
        "maxSeqLength": args.max_len,
        "ours": ours,
        "trlFast": trl,
        "ratio": {
            "tokensPerSecond": round(ours["tokensPerSecond"] / trl["tokensPerSecond"], 3),
            "peakGpuMemory": round(ours["peakGpuMemoryGiB"] / trl["peakGpuMemoryGiB"], 3),
        },
    }
    print(json.dumps(report, indent=2))
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
