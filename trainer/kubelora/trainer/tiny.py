"""A tiny-model kit for tests, the demo and benchmarks: no downloads, seconds on a CPU.

* :func:`build_tiny_model` writes a tiny Llama-architecture model (a few hundred thousand
  parameters, safetensors) and a word-level tokenizer (``tokenizers``, with a chat template and
  special tokens) to a directory.
* :func:`make_tickets` generates a synthetic chat-format classification task: a support ticket whose
  label (one of :data:`LABELS`) is decided by one keyword in it. A random tiny base cannot do it
  (exact match at or below chance); a LoRA adapter learns it in a few hundred steps.
  ``shuffled_labels=True`` assigns labels at random, so nothing generalises to the test set.
* :func:`upload_dir` puts a directory into MinIO.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

KEYWORDS: dict[str, list[str]] = {
    "billing": ["invoice", "refund", "charge", "payment", "bill", "overcharged"],
    "technical": ["crash", "error", "bug", "freeze", "timeout", "glitch"],
    "account": ["password", "login", "username", "profile", "locked", "signin"],
    "shipping": ["delivery", "package", "tracking", "courier", "parcel", "shipment"],
}
LABELS: list[str] = list(KEYWORDS)
FILLERS = [
    "hello",
    "hi",
    "my",
    "the",
    "is",
    "not",
    "working",
    "please",
    "help",
    "i",
    "have",
    "a",
    "problem",
    "with",
    "today",
    "again",
    "since",
    "yesterday",
    "urgent",
    "thanks",
    "can",
    "you",
    "check",
    "this",
    "it",
    "was",
    "still",
    "need",
    "an",
    "update",
    "on",
    "order",
    "team",
    "support",
    "why",
    "does",
    "keep",
    "happening",
    "hey",
    "there",
    "we",
    "our",
    "customer",
    "about",
    "sorry",
    "to",
    "bother",
    "week",
    "morning",
]
INSTRUCTION = "classify this ticket :"
SYSTEM = "you are a support ticket router"

TOKENS = {"bos_token": "<s>", "eos_token": "<|end|>", "unk_token": "<unk>", "pad_token": "<pad>"}
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def vocabulary(extra: Iterable[str] = ()) -> list[str]:
    words = set(FILLERS) | set(LABELS) | set(INSTRUCTION.split()) | set(SYSTEM.split()) | set(extra)
    for kws in KEYWORDS.values():
        words.update(kws)
    words.update(["{", "}", '"', ":", ",", ".", "?", "!", "label", "yes", "no"])
    return SPECIAL_TOKENS + sorted(words - set(SPECIAL_TOKENS))


def build_tokenizer(extra_words: Iterable[str] = ()) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` (lower-cased, split on whitespace and punctuation)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(extra_words))}
    tk = Tokenizer(WordLevel(vocab, unk_token=TOKENS["unk_token"]))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        **TOKENS,
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(
    path: Path | str,
    *,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    extra_words: Iterable[str] = (),
) -> Path:
    """Write a random tiny Llama model (safetensors) and its tokenizer to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(extra_words)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        # wider than the usual 0.02 so the frozen random head can express confident predictions
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def ticket_row(rng: random.Random, label: str, keyword: str | None = None, system: bool = False) -> dict[str, Any]:
    keyword = keyword or rng.choice(KEYWORDS[label])
    words = rng.sample(FILLERS, rng.randint(4, 8))
    words.insert(rng.randint(0, len(words)), keyword)
    messages = [{"role": "user", "content": f"{INSTRUCTION} {' '.join(words)}"}]
    if system:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": [*messages, {"role": "assistant", "content": label}]}


def make_tickets(n: int, *, seed: int = 0, shuffled_labels: bool = False) -> list[dict[str, Any]]:
    """``n`` chat rows; the label follows the keyword, or is random with ``shuffled_labels``."""
    rng = random.Random(seed)  # noqa: S311 - reproducible data, not secrets
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        row = ticket_row(rng, label)
        if shuffled_labels:
            row["messages"][-1]["content"] = rng.choice(LABELS)
        rows.append(row)
    return rows


def to_instruction(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"prompt": r["messages"][-2]["content"], "completion": r["messages"][-1]["content"]} for r in rows]


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def write_task(
    directory: Path | str,
    *,
    n_train: int = 400,
    n_test: int = 48,
    n_regression: int = 24,
    seed: int = 0,
    shuffled_labels: bool = False,
) -> dict[str, Path]:
    """Write ``train.jsonl`` (labels shuffled if asked), ``test.jsonl`` and ``regression.jsonl`` (true labels)."""
    d = Path(directory)
    return {
        "train": write_jsonl(make_tickets(n_train, seed=seed, shuffled_labels=shuffled_labels), d / "train.jsonl"),
        "test": write_jsonl(make_tickets(n_test, seed=seed + 1000), d / "test.jsonl"),
        "regression": write_jsonl(make_tickets(n_regression, seed=seed + 2000), d / "regression.jsonl"),
    }


def upload_dir(minio_client: Any, bucket: str, prefix: str, path: Path | str) -> str:
    """Upload every file under ``path`` to ``s3://bucket/prefix/``; returns that URI."""
    root = Path(path)
    prefix = prefix.strip("/")
    if not minio_client.bucket_exists(bucket):
        minio_client.make_bucket(bucket)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            key = f"{prefix}/{p.relative_to(root).as_posix()}" if prefix else p.relative_to(root).as_posix()
            minio_client.fput_object(bucket, key, str(p))
    return f"s3://{bucket}/{prefix}/" if prefix else f"s3://{bucket}/"


def upload_file(minio_client: Any, bucket: str, key: str, path: Path | str) -> str:
    if not minio_client.bucket_exists(bucket):
        minio_client.make_bucket(bucket)
    minio_client.fput_object(bucket, key, str(path))
    return f"s3://{bucket}/{key}"
