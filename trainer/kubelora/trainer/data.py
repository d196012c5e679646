"""Step 4, data: parse JSONL datasets, render them with the tokenizer's chat template and tokenize.

Formats (``spec.dataset.format``), one JSON object a line:

* ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``; the last
  message must be the assistant's and is the completion; everything before it is the prompt.
* ``instruction``: ``{"prompt": str, "completion": str}`` (optional ``"system": str``), rendered as a
  user and an assistant message.
* ``completion``: ``{"text": str}``: raw text, no template, loss on every token.

Loss is computed on completion tokens only (prompt labels are -100).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubelora.trainer.errors import MalformedDatasetError
from kubelora.trainer.report import kv

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = frozenset({"system", "user", "assistant", "tool"})
#: Used only when the tokenizer has no chat template (a base model); recorded in the manifest.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


@dataclasses.dataclass
class Example:
    """One parsed row: a chat prompt and its expected completion, or raw text."""

    source: str
    messages: list[dict[str, str]] | None = None
    completion: str | None = None
    text: str | None = None


@dataclasses.dataclass
class DatasetFile:
    name: str
    uri: str
    sha256: str
    size: int
    examples: list[Example]
    bad_rows: list[str]

    def digest(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "sha256": self.sha256,
            "sizeBytes": self.size,
            "rows": len(self.examples),
            "badRows": len(self.bad_rows),
        }


def _row_problem(obj: Any, fmt: str) -> tuple[str | None, Example | None]:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}", None
    if fmt == "chat":
        if "messages" not in obj:
            return 'missing "messages"', None
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return '"messages" must be a non-empty list', None
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                return f"messages[{i}] is not an object", None
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                return f'messages[{i}]: "role" must be one of {sorted(ROLES)}', None
            if not isinstance(content, str):
                return f'messages[{i}]: "content" must be a string', None
            clean.append({"role": role, "content": content})
        if clean[-1]["role"] != "assistant":
            return 'the last message must have role "assistant"', None
        if len(clean) < 2:
            return "a prompt message must come before the assistant's", None
        return None, Example("", messages=clean[:-1], completion=clean[-1]["content"])
    if fmt == "instruction":
        for key in ("prompt", "completion"):
            if key not in obj:
                return f'missing "{key}"', None
            if not isinstance(obj[key], str):
                return f'"{key}" must be a string', None
        msgs = []
        if isinstance(obj.get("system"), str) and obj["system"]:
            msgs.append({"role": "system", "content": obj["system"]})
        msgs.append({"role": "user", "content": obj["prompt"]})
        return None, Example("", messages=msgs, completion=obj["completion"])
    if "text" not in obj:
        return 'missing "text"', None
    if not isinstance(obj["text"], str) or not obj["text"]:
        return '"text" must be a non-empty string', None
    return None, Example("", text=obj["text"])


def read_jsonl(path: Path, fmt: str, *, name: str | None = None, uri: str = "", max_bad_rows: int = 0) -> DatasetFile:
    """Parse a JSONL file. A malformed row fails with ``name:line: problem`` once more than
    ``max_bad_rows`` rows are malformed; tolerated ones are skipped and counted."""
    name = name or path.name
    h = hashlib.sha256()
    examples: list[Example] = []
    bad: list[str] = []
    size = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            h.update(raw)
            size += len(raw)
            line = raw.strip()
            if not line:
                continue
            where = f"{name}:{lineno}"
            try:
                obj = json.loads(line)
                problem, ex = _row_problem(obj, fmt)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                problem, ex = f"invalid JSON: {getattr(e, 'msg', e)}", None
            if problem is not None or ex is None:
                bad.append(f"{where}: {problem}")
                if len(bad) > max_bad_rows:
                    msg = bad[-1]
                    if max_bad_rows:
                        earlier = ", ".join(b.split(": ", 1)[0] for b in bad[:-1][:5])
                        msg += f" ({len(bad)} malformed rows, more than maxBadRows={max_bad_rows}; also {earlier})"
                    raise MalformedDatasetError(msg)
                continue
            ex.source = where
            examples.append(ex)
    if bad:
        log.warning(kv("Skipped malformed rows", file=name, count=len(bad), first=bad[0]))
    if not examples:
        raise MalformedDatasetError(f"{name}: no usable rows")
    return DatasetFile(name, uri, h.hexdigest(), size, examples, bad)


def split(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded train/validation split (at least one validation row, at least one training row)."""
    if len(examples) < 2:
        return list(examples), []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)  # noqa: S311 - a reproducible split, not a secret
    n_val = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    val = sorted(idx[:n_val])
    train = sorted(idx[n_val:])
    return [examples[i] for i in train], [examples[i] for i in val]


class Renderer:
    """Turns examples into prompt and completion text with the tokenizer's chat template."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.template_source = "tokenizer"
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
            self.template_source = "fallback"
            log.warning(kv("Tokenizer has no chat template, using the fallback template"))
        self._warned = False

    def prompt(self, messages: list[dict[str, str]]) -> str:
        out = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(out)

    def split_text(self, ex: Example) -> tuple[str, str]:
        """(prompt text, completion text) as the model sees them in training."""
        if ex.text is not None:
            return "", ex.text
        assert ex.messages is not None and ex.completion is not None
        prompt = self.prompt(ex.messages)
        full = str(
            self.tokenizer.apply_chat_template(
                [*ex.messages, {"role": "assistant", "content": ex.completion}], tokenize=False
            )
        )
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
        n = 0
        while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
            n += 1
        if not self._warned:
            self._warned = True
            log.warning(kv("Chat template renders the prompt differently alone; splitting at the common prefix"))
        return full[:n], full[n:]


@dataclasses.dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def tokenize(examples: Sequence[Example], renderer: Renderer, max_len: int) -> tuple[list[Tokenized], dict[str, int]]:
    """Token ids with prompt labels masked; prompts are cut from the left when a row is too long."""
    tok = renderer.tokenizer
    out: list[Tokenized] = []
    stats = {"rows": 0, "truncated": 0, "tokens": 0, "completionTokens": 0}
    for ex in examples:
        prompt, completion = renderer.split_text(ex)
        if ex.text is not None:
            p_ids: list[int] = []
            c_ids = list(tok(completion, add_special_tokens=True)["input_ids"])
            if tok.eos_token_id is not None and (not c_ids or c_ids[-1] != tok.eos_token_id):
                c_ids.append(tok.eos_token_id)
        else:
            p_ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
            c_ids = list(tok(completion, add_special_tokens=False)["input_ids"])
        if len(p_ids) + len(c_ids) > max_len:
            stats["truncated"] += 1
            if len(c_ids) > max_len - min(len(p_ids), max_len // 2):
                c_ids = c_ids[: max_len - min(len(p_ids), max_len // 2)]
            keep = max_len - len(c_ids)
            p_ids = p_ids[-keep:] if keep > 0 else []
        if not c_ids:
            continue
        out.append(Tokenized(p_ids + c_ids, [IGNORE_INDEX] * len(p_ids) + c_ids))
        stats["rows"] += 1
        stats["tokens"] += len(p_ids) + len(c_ids)
        stats["completionTokens"] += len(c_ids)
    if stats["truncated"]:
        log.warning(kv("Truncated rows longer than maxSeqLength", count=stats["truncated"], maxSeqLength=max_len))
    return out, stats


def pack(rows: Sequence[Tokenized], max_len: int) -> list[Tokenized]:
    """Greedy packing of whole rows into sequences of at most ``max_len`` tokens.

    Attention is not masked between packed rows (as in classic packing); labels keep prompts masked.
    """
    packed: list[Tokenized] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    for r in rows:
        if cur_ids and len(cur_ids) + len(r.input_ids) > max_len:
            packed.append(Tokenized(cur_ids, cur_labels))
            cur_ids, cur_labels = [], []
        cur_ids = cur_ids + r.input_ids
        cur_labels = cur_labels + r.labels
    if cur_ids:
        packed.append(Tokenized(cur_ids, cur_labels))
    return packed


class TokenDataset:
    """A map-style dataset of token rows (what ``Trainer`` needs: ``__len__`` and ``__getitem__``)."""

    def __init__(self, rows: Sequence[Tokenized]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        r = self.rows[i]
        return {"input_ids": r.input_ids, "labels": r.labels}


class Collator:
    """Right-pads a batch; padded label positions are ignored by the loss."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
