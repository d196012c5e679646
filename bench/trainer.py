"""Benchmark: kubelora's trainer (packing, padding-free) against TRL ``SFTTrainer`` defaults (padded batches).

Both train the same tiny Llama on the same rows: variable-length multi-turn chat rows whose lengths
are spread like real chat data (log-normal, median ~200 tokens, clipped to 30-1,500 tokens), the same
seeded 95% training split, tokenized once by kubelora's data path (so both train on exactly the same
tokens and assistant-turn masks), with the same hyperparameters and the same number of optimizer
steps on the CPU (one thread each).

* ours: the whole CLI (``python -m kubelora.trainer``) with ``packing: true``: TRL's best-fit-decreasing
  packing into ``maxSeqLength`` rows, per-document ``position_ids``, no padding inside a row;
* TRL defaults: ``SFTTrainer`` with its default collation, ``packing=False``: each batch is padded to
  its longest row.

Each side runs in its own process. The JSON printed at the end has, per side, non-padding training
tokens per second, peak RSS and the final loss (the mean of the last 10 logged step losses), and the
ratio ours/TRL of the throughput.

    .venv/bin/python bench/trainer.py [--steps 8] [--rows 600] [--keep DIR]
"""

from __future__ import annotations

import sys

# bench/ holds operator.py, which would shadow the standard library's operator module: drop the
# script's own directory from the import path before anything imports it.
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("/bench")]

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LR, BATCH, RANK, ALPHA, MAX_LEN, SEED, VAL_SPLIT = 1e-3, 4, 8, 16, 1536, 7, 0.05
MIN_TOKENS, MAX_TOKENS, MEDIAN_TOKENS, SIGMA = 30, 1500, 200, 0.9
MODEL = {"hidden_size": 256, "intermediate_size": 768, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def chat_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Multi-turn rows in the tiny vocabulary; a row's token count is drawn from a clipped log-normal."""
    from kubelora.trainer import tiny

    rng = random.Random(seed)
    words = [w for w in tiny.vocabulary() if not w.startswith("<")]
    rows = []
    for _ in range(n):
        target = int(min(MAX_TOKENS, max(MIN_TOKENS, rng.lognormvariate(math.log(MEDIAN_TOKENS), SIGMA))))
        # the tiny tokenizer is word-level: a message is its words plus two tokens (<|role|>, <|end|>)
        messages: list[dict[str, str]] = [{"role": "system", "content": tiny.SYSTEM}]
        used = 2 + len(tiny.SYSTEM.split())
        while target - used >= 8:
            room = target - used - 4
            u = min(room // 2, rng.randint(2, 60))
            a = min(room - u, rng.randint(2, 120))
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=u))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=a))})
            used += u + a + 4
        short = target - used
        if short > 0:  # the last assistant message makes up the rest
            last = messages[-1]["content"].split() + rng.choices(words, k=short)
            messages[-1]["content"] = " ".join(last)
        rows.append({"messages": messages})
    return rows


def child_ours(root: Path, steps: int) -> dict[str, Any]:
    import yaml

    from kubelora.trainer.cli import main

    spec = {
        "baseModel": {"uri": f"file://{root}/model"},
        "dataset": {"train": f"file://{root}/train.jsonl", "format": "chat", "validationSplit": VAL_SPLIT},
        "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0},
        "training": {
            "maxSteps": steps,
            "learningRate": LR,
            "batchSize": BATCH,
            "maxSeqLength": MAX_LEN,
            "packing": True,
            "checkpointEverySteps": 10_000,
            "gradientCheckpointing": False,
            "warmupRatio": 0.0,
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
    losses = [e["loss"] for e in events if e["type"] == "progress" and e.get("loss") is not None]
    training = result["training"]
    return {
        "exitCode": rc,
        "steps": training["steps"],
        "tokensPerSecond": training["tokensPerSecond"],
        "finalLoss": losses[-1] if losses else None,
        "trainLoss": training["trainLoss"],
    }


def child_trl(root: Path, steps: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # what kubelora picks for a model this small; the same for both sides
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from kubelora.trainer import data, modeling
    from kubelora.trainer.modeling import Runtime

    examples = data.read_jsonl(root / "train.jsonl", "chat").examples
    train, _ = data.split(examples, VAL_SPLIT, SEED)  # the rows kubelora trains on
    tok = modeling.load_tokenizer(root / "model", False)
    rows, _ = data.tokenize(train, data.Renderer(tok), MAX_LEN)
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    from peft import get_peft_model

    from kubelora.api.v1alpha1 import LoRAJobSpec

    spec = LoRAJobSpec.model_validate(
        {
            "baseModel": {"uri": "file:///m"},
            "dataset": {"train": "file:///t"},
            "output": {"uri": "file:///o"},
            "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0},
        }
    )
    model = get_peft_model(model, modeling.lora_config(spec))
    del Runtime
    args = SFTConfig(
        output_dir=str(root / "out-trl"),
        max_steps=steps,
        learning_rate=LR,
        per_device_train_batch_size=BATCH,
        warmup_steps=0.0,
        max_length=MAX_LEN,
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
    )

    class Clock(TrainerCallback):
        t0 = 0.0
        seconds = 0.0

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            Clock.t0 = time.monotonic()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            Clock.seconds = time.monotonic() - Clock.t0

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.to_dataset(rows, "chat"),
        processing_class=tok,
        callbacks=[Clock()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    return {
        "exitCode": 0,
        "steps": int(trainer.state.global_step),
        "tokensPerSecond": int(trainer.state.num_input_tokens_seen) / Clock.seconds,
        "finalLoss": losses[-1] if losses else None,
        "trainLoss": sum(losses) / len(losses) if losses else None,
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="optimizer steps, the same for both sides")
    p.add_argument("--rows", type=int, default=600, help="chat rows generated")
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
    model = root / "model"
    if not (model / "config.json").is_file():
        tiny.build_tiny_model(model, **MODEL)
        config = json.loads((model / "config.json").read_text())
        config["max_position_embeddings"] = 2048
        (model / "config.json").write_text(json.dumps(config, indent=2))
    rows = chat_rows(args.rows, SEED)
    tiny.write_jsonl(rows, root / "train.jsonl")
    from kubelora.trainer import data, modeling

    tok = modeling.load_tokenizer(model, False)
    renderer = data.Renderer(tok)
    examples = data.read_jsonl(root / "train.jsonl", "chat").examples
    lengths = sorted(len(renderer.encode(ex)[0]) for ex in examples)
    ours = run_child("ours", root, args.steps)
    trl = run_child("trl", root, args.steps)
    report = {
        "model": f"tiny llama {MODEL}, CPU, 1 thread",
        "rows": len(rows),
        "rowTokens": {
            "min": lengths[0],
            "median": lengths[len(lengths) // 2],
            "p90": lengths[int(len(lengths) * 0.9)],
            "max": lengths[-1],
        },
        "steps": args.steps,
        "batchSize": BATCH,
        "maxSeqLength": MAX_LEN,
        "ours": ours,
        "trlDefaults": trl,
        "ratio": {"tokensPerSecond": round(ours["tokensPerSecond"] / trl["tokensPerSecond"], 3)},
    }
    print(json.dumps(report, indent=2))
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
