"""Benchmark: kubelora's trainer against a plain TRL ``SFTTrainer`` script, in one run.

Both train the same tiny Llama (``kubelora.trainer.tiny``) on the same rows (the synthetic ticket
task, the same seeded 95% training split) with the same hyperparameters (LoRA r=8, alpha=16, all
linear layers, lr 5e-3, batch 16, the same steps, loss on completions only, one CPU thread each).
Each runs in its own process; the JSON printed at the end has, per side, the training throughput
(non-padding tokens per second of ``train()``), the process's wall time and peak RSS, and the ratios
ours/TRL (medians over ``--repeat`` runs, alternating which side goes first: the machine is shared).

    .venv/bin/python bench/trainer.py [--steps 160] [--repeat 3] [--keep DIR]

Our side runs the whole CLI (fetch, preflight, checkpoint upload, publish with verification) but no
test-set evaluation; TRL's side saves its adapter at the end.
"""

from __future__ import annotations

import sys

# bench/ holds operator.py, which would shadow the standard library's operator module: drop the
# script's own directory from the import path before anything imports it.
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("/bench")]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LR, BATCH, RANK, ALPHA, MAX_LEN, SEED = 5e-3, 16, 8, 16, 64, 7


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_ours(root: Path, steps: int) -> dict[str, Any]:
    import yaml

    from kubelora.trainer.cli import main

    spec = {
        "baseModel": {"uri": f"file://{root}/model"},
        "dataset": {"train": f"file://{root}/task/train.jsonl", "format": "chat"},
        "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0},
        "training": {
            "maxSteps": steps,
            "learningRate": LR,
            "batchSize": BATCH,
            "maxSeqLength": MAX_LEN,
            "checkpointEverySteps": 10_000,
            "gradientCheckpointing": False,
            "warmupRatio": 0.05,
            "seed": SEED,
        },
        "output": {"uri": f"file://{root}/out-ours"},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    for old in ("out-ours", "work"):  # no checkpoint of an earlier run to resume from
        shutil.rmtree(root / old, ignore_errors=True)
    report = root / "ours.jsonl"
    report.unlink(missing_ok=True)
    rc = main(["--spec", str(root / "spec.yaml"), "--report-file", str(report), "--workdir", str(root / "work")])
    events = [json.loads(x) for x in report.read_text().splitlines()]
    result = next(e for e in events if e["type"] == "result")
    training = result["training"]
    return {
        "exitCode": rc,
        "steps": training["steps"],
        "trainSeconds": training["seconds"],
        "tokensPerSecond": training["tokensPerSecond"],
        "trainLoss": training["trainLoss"],
    }


def child_trl(root: Path, steps: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # what kubelora picks for a model this small; the same for both sides
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from kubelora.trainer.data import read_jsonl, split

    examples = read_jsonl(root / "task" / "train.jsonl", "chat").examples
    train, _ = split(examples, 0.05, SEED)  # the rows kubelora trains on
    rows = [{"prompt": ex.messages, "completion": [{"role": "assistant", "content": ex.completion}]} for ex in train]
    tok = AutoTokenizer.from_pretrained(root / "model")
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(root / "out-trl"),
        max_steps=steps,
        learning_rate=LR,
        per_device_train_batch_size=BATCH,
        warmup_steps=0.05,
        max_length=MAX_LEN,
        completion_only_loss=True,
        packing=False,
        seed=SEED,
        data_seed=SEED,
        use_cpu=True,
        # TRL defaults to bf16 autocast and activation checkpointing: match kubelora's spec (fp32 on CPU, off)
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=False,
        optim="adamw_torch",
    )
    peft_config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft_config
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    out = trainer.train()
    trainer.save_model(str(root / "out-trl" / "adapter"))
    seconds = float(out.metrics["train_runtime"])
    return {
        "exitCode": 0,
        "steps": int(trainer.state.global_step),
        "trainSeconds": round(seconds, 3),
        "tokensPerSecond": int(trainer.state.num_input_tokens_seen) / seconds,
        "trainLoss": float(out.training_loss),
    }


def run_child(side: str, root: Path, steps: int) -> dict[str, Any]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer"), env.get("PYTHONPATH", "")])
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-P", __file__, "--child", side, "--root", str(root), "--steps", str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - t0
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{side} failed with exit code {proc.returncode}")
    out = dict(json.loads(lines[-1]))
    out["processSeconds"] = round(wall, 2)  # the whole process: imports, loading, training, saving
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median throughput and times over the repeats; the largest peak RSS."""

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 3)

    return {
        "steps": runs[0]["steps"],
        "tokensPerSecond": round(med("tokensPerSecond"), 1),
        "trainSeconds": med("trainSeconds"),
        "processSeconds": med("processSeconds"),
        "peakRssMiB": max(r["peakRssMiB"] for r in runs),
        "trainLoss": round(runs[0]["trainLoss"], 4),
        "tokensPerSecondAll": [round(r["tokensPerSecond"], 1) for r in runs],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--repeat", type=int, default=1, help="runs per side, alternating the order; medians reported")
    p.add_argument("--keep", type=Path, help="work in this directory and keep it")
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import logging

        logging.disable(logging.WARNING)
        result = child_ours(args.root, args.steps) if args.child == "ours" else child_trl(args.root, args.steps)
        result["peakRssMiB"] = round(peak_rss_mib(), 1)
        print(json.dumps(result))
        return

    sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer")]
    from kubelora.trainer import tiny

    root = args.keep or Path(tempfile.mkdtemp(prefix="kubelora-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "model" / "config.json").is_file():
        tiny.build_tiny_model(root / "model")
    tiny.write_task(root / "task")
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
    for i in range(max(1, args.repeat)):
        for side in ("ours", "trl") if i % 2 == 0 else ("trl", "ours"):
            runs[side].append(run_child(side, root, args.steps))
    ours, trl = summarise(runs["ours"]), summarise(runs["trl"])
    report = {
        "model": "tiny llama (kubelora.trainer.tiny), 3 layers, ~470K parameters; CPU, 1 thread",
        "steps": args.steps,
        "batchSize": BATCH,
        "repeats": max(1, args.repeat),
        "ours": ours,
        "trl": trl,
        "ratio": {
            "tokensPerSecond": round(ours["tokensPerSecond"] / trl["tokensPerSecond"], 3),
            "peakRss": round(ours["peakRssMiB"] / trl["peakRssMiB"], 3),
            "processSeconds": round(ours["processSeconds"] / trl["processSeconds"], 3),
        },
    }
    print(json.dumps(report, indent=2))
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
