"""Adapters for the rollout tests: tiny peft LoRAs published to MinIO the way the trainer publishes them.

Each adapter is a peft LoRA with random non-zero weights on the tiny Llama from ``kubelora.trainer.tiny``,
so it changes the model's answers. Its eval samples are the trainer's own greedy predictions
(``kubelora.trainer.evaluate.generate``), and it is published with the trainer's ``publish.stage`` and
``publish.publish`` into ``<uri>/sha256/<hex>/``: adapter files, ``eval/samples.jsonl`` and
``kubelora-manifest.json`` with the sha256 of every file; the digest is the manifest's sha256.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

BASE_MODEL = "kubelora/tiny-llama"
MAX_NEW_TOKENS = 8
SAMPLES = 4


@dataclasses.dataclass
class Published:
    name: str
    uri: str
    digest: str
    rank: int
    base_model: str
    samples: list[dict[str, Any]]
    size_bytes: int
    trainable_parameters: int

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    def status_adapter(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "digest": self.digest,
            "sizeBytes": self.size_bytes,
            "trainableParameters": self.trainable_parameters,
            "rank": self.rank,
            "baseModel": self.base_model,
        }


def _examples(seed: int) -> list[Any]:
    from kubelora.trainer.data import Example
    from kubelora.trainer.tiny import make_tickets

    rows = make_tickets(SAMPLES, seed=seed)
    return [
        Example(source="test.jsonl", messages=r["messages"][:-1], completion=r["messages"][-1]["content"]) for r in rows
    ]


def build_adapter(model_dir: Path, out: Path, *, rank: int, seed: int, dora: bool = False) -> tuple[Any, Any]:
    """A peft LoRA (DoRA with ``dora``) with random weights, saved to ``out``; returns (peft model, tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0, use_dora=dora
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.6)
    model.save_pretrained(str(out))
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def predictions(model: Any, tokenizer: Any, examples: list[Any]) -> tuple[list[str], list[str]]:
    """(adapter predictions, base predictions) the way the trainer's evaluation makes them."""
    from kubelora.trainer.data import Renderer
    from kubelora.trainer.evaluate import generate

    renderer = Renderer(tokenizer)
    kwargs = {"max_new_tokens": MAX_NEW_TOKENS, "max_len": 512, "batch_size": 16}
    adapter = generate(model, tokenizer, renderer, examples, **kwargs)
    with model.disable_adapter():
        base = generate(model, tokenizer, renderer, examples, **kwargs)
    return adapter, base


def publish_adapter(
    workdir: Path,
    adapter_dir: Path,
    uri: str,
    *,
    name: str,
    rank: int,
    base_model: str,
    samples: list[dict[str, Any]],
    trainable_parameters: int,
    method: str = "lora",
) -> Published:
    from kubelora.api.v1alpha1 import EvalResults, GateVerdict, dump
    from kubelora.trainer import publish

    results = EvalResults(
        passed=True,
        base={"exact_match": 0.25},
        adapter={"exact_match": 0.9},
        gates=[GateVerdict(metric="exact_match", rule="min", threshold=0.5, value=0.9, passed=True)],
    )
    eval_doc = {"eval": dump(results)}
    files = publish.stage(workdir, adapter_dir, base_model, eval_doc, samples)
    body = {
        "apiVersion": "kubelora.dev/v1alpha1",
        "kind": publish.MANIFEST_KIND,
        "job": {"name": name, "namespace": "tests"},
        "baseModel": {"name": base_model, "uri": f"hf://{base_model}"},
        "adapter": {
            "format": "peft",
            "method": method,
            "rank": rank,
            "alpha": 2 * rank,
            "trainableParameters": trainable_parameters,
        },
        "eval": dump(results),
        "libraries": publish.library_versions(),
    }
    artifact = publish.publish(
        uri,
        files,
        body,
        trainable_parameters=trainable_parameters,
        rank=rank,
        base_identity=base_model,
        workdir=workdir,
    )
    return Published(
        name=name,
        uri=artifact.uri,
        digest=artifact.digest,
        rank=rank,
        base_model=base_model,
        samples=samples,
        size_bytes=artifact.size_bytes,
        trainable_parameters=trainable_parameters,
    )


def make_adapters(root: Path, model_dir: Path, bucket: str) -> dict[str, Published]:
    """good-a, good-b: real predictions; bad-samples: predictions of other weights; rank32; dora; other-base."""
    made: dict[str, Published] = {}
    specs = {
        "good-a": (8, 11),
        "good-b": (8, 12),
        "bad-samples": (8, 13),
        "rank32": (32, 14),
        "liar": (8, 15),
        "dora": (8, 16),
    }
    built: dict[str, tuple[Path, list[dict[str, Any]], int]] = {}
    for name, (rank, seed) in specs.items():
        adapter_dir = root / name
        model, tokenizer = build_adapter(model_dir, adapter_dir, rank=rank, seed=seed, dora=name == "dora")
        examples = _examples(seed=100)
        adapter_out, base_out = predictions(model, tokenizer, examples)
        from kubelora.trainer.data import Renderer

        renderer = Renderer(tokenizer)
        samples = [
            {
                "source": ex.source,
                "messages": ex.messages,
                "prompt": renderer.prompt(ex.messages),
                "expected": ex.completion,
                "base": b,
                "adapter": a,
            }
            for ex, a, b in zip(examples, adapter_out, base_out, strict=True)
        ]
        trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        built[name] = (adapter_dir, samples, trainable)
    # bad-samples publishes its own weights with the predictions of "liar" (other weights): the smoke
    # check on a canary must catch it.
    bad_dir, _, bad_trainable = built["bad-samples"]
    built["bad-samples"] = (bad_dir, built["liar"][1], bad_trainable)
    del built["liar"]
    for name, (adapter_dir, samples, trainable) in built.items():
        made[name] = publish_adapter(
            root / f"publish-{name}",
            adapter_dir,
            f"s3://{bucket}/adapters/{name}/",
            name=name,
            rank=specs[name][0],
            base_model=BASE_MODEL,
            samples=samples,
            trainable_parameters=trainable,
            method="dora" if name == "dora" else "lora",
        )
    # Two trainings to one output URI, as a re-train writes: each lands under its own sha256/<hex>/.
    for name, weights in (("retrain-1", "good-a"), ("retrain-2", "good-b")):
        adapter_dir, samples, trainable = built[weights]
        made[name] = publish_adapter(
            root / f"publish-{name}",
            adapter_dir,
            f"s3://{bucket}/adapters/retrained/",
            name=name,
            rank=8,
            base_model=BASE_MODEL,
            samples=samples,
            trainable_parameters=trainable,
        )
    # Same weights as good-a, but the manifest says another base model.
    adapter_dir, samples, trainable = built["good-a"]
    made["other-base"] = publish_adapter(
        root / "publish-other-base",
        adapter_dir,
        f"s3://{bucket}/adapters/other-base/",
        name="other-base",
        rank=8,
        base_model="someone/other-model",
        samples=samples,
        trainable_parameters=trainable,
    )
    return made


def publish_synthetic(minio: Any, bucket: str, prefix: str, seed: int, rank: int = 8) -> Published:
    """An adapter for stand-in (fake vLLM) pods: an adapter_config.json, random bytes as weights and a manifest
    with their sha256s, under ``s3://bucket/prefix/``. Fake vLLM checks only the config's rank; the agent checks
    every file against the manifest, and the operator the manifest against the digest."""
    import hashlib
    import io
    import json
    import random

    files = {
        "adapter_config.json": json.dumps({"r": rank, "lora_alpha": 2 * rank, "peft_type": "LORA"}).encode(),
        "adapter_model.safetensors": random.Random(seed).randbytes(4096),
    }
    entries = []
    for path, data in files.items():
        minio.put_object(bucket, f"{prefix}/{path}", io.BytesIO(data), len(data))
        entries.append({"path": path, "sizeBytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = json.dumps({"baseModel": {"name": BASE_MODEL}, "files": entries}, sort_keys=True).encode()
    minio.put_object(bucket, f"{prefix}/kubelora-manifest.json", io.BytesIO(manifest), len(manifest))
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    size = sum(len(d) for d in files.values())
    return Published(prefix, f"s3://{bucket}/{prefix}/", digest, rank, BASE_MODEL, [], size, 0)
