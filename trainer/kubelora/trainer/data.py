"""Step 4, data: parse JSONL datasets, render them with the tokenizer's chat template and tokenize.

Formats (``spec.dataset.format``), one JSON object a line:

* ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}``; the last
  message must be the assistant's. Training computes the loss on **every** assistant turn (TRL's
  ``assistant_masks``); evaluation uses the last assistant message as the expected completion.
* ``instruction``: ``{"prompt": str, "completion": str}`` (optional ``"system": str``), rendered as a
  user and an assistant message; loss on the completion only (TRL's ``completion_mask`` with
  ``completion_only_loss``).
* ``completion``: ``{"text": str}``: raw text, no template, loss on every token.

Each row is rendered once with the model's chat template and tokenized **as one string** (prompt and
completion together, as TRL does), so SentencePiece merges at the prompt/completion boundary come
out as the model will see them. The trained spans are found on the rendered text and mapped to
tokens through the tokenizer's offsets (see :meth:`Renderer.encode`). Rendering runs right after the
tokenizer is fetched and before the model loads, so a template that refuses a row (Gemma and a
``system`` message, Mistral's strict alternation, an unknown ``tool`` role) fails fast as a
non-retryable ``MalformedDataset`` error naming ``file:line``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
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


def _rows(lines: Iterable[bytes], fmt: str, name: str, max_bad_rows: int, bad: list[str]) -> Iterator[Example]:
    """The usable rows of JSONL ``lines``, one at a time (``source`` is ``name:line``). A malformed row is
    appended to ``bad`` and skipped; MalformedDatasetError once more than ``max_bad_rows`` rows are malformed."""
    for lineno, raw in enumerate(lines, start=1):
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
        yield ex


def read_jsonl(path: Path, fmt: str, *, name: str | None = None, uri: str = "", max_bad_rows: int = 0) -> DatasetFile:
    """Parse a JSONL file. A malformed row fails with ``name:line: problem`` once more than
    ``max_bad_rows`` rows are malformed; tolerated ones are skipped and counted."""
    name = name or path.name
    h = hashlib.sha256()
    bad: list[str] = []
    size = 0
    with path.open("rb") as f:

        def hashed() -> Iterator[bytes]:
            nonlocal size
            for raw in f:
                h.update(raw)
                size += len(raw)
                yield raw

        examples = list(_rows(hashed(), fmt, name, max_bad_rows, bad))
    if bad:
        log.warning(kv("Skipped malformed rows", file=name, count=len(bad), first=bad[0]))
    if not examples:
        raise MalformedDatasetError(f"{name}: no usable rows")
    return DatasetFile(name, uri, h.hexdigest(), size, examples, bad)


def validate_jsonl(path: Path, fmt: str, *, name: str | None = None, start: int = 0, end: int | None = None) -> int:
    """Check every row of a JSONL file as :func:`read_jsonl` does (no malformed row tolerated), one row at a
    time without keeping them; the number of rows. ``start``/``end`` limit the check to that byte range of
    ``path`` (line numbers count from ``start``). MalformedDatasetError names ``name:line`` of the first bad row."""
    name = name or path.name
    rows = 0
    with path.open("rb") as f:
        f.seek(start)

        def lines() -> Iterator[bytes]:
            remaining = None if end is None else end - start
            while remaining is None or remaining > 0:
                raw = f.readline() if remaining is None else f.readline(remaining)
                if not raw:
                    return
                if remaining is not None:
                    remaining -= len(raw)
                yield raw

        for _ in _rows(lines(), fmt, name, 0, []):
            rows += 1
    if not rows:
        raise MalformedDatasetError(f"{name}: no usable rows")
    return rows


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
    """Renders examples with the tokenizer's chat template and finds the spans the loss is computed on."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.template_source = "tokenizer"
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
            self.template_source = "fallback"
            log.warning(kv("Tokenizer has no chat template, using the fallback template"))
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str, **fields: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(kv(message, **fields))

    def _apply(self, messages: list[dict[str, str]], *, generation_prompt: bool, source: str = "") -> str:
        try:
            out = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja2's TemplateError (raise_exception), or a TypeError/KeyError inside the template
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            where = f"{source}: " if source else ""
            raise MalformedDatasetError(f"{where}the chat template cannot render this row: {msg}") from e
        return str(out)

    def prompt(self, messages: list[dict[str, str]], source: str = "") -> str:
        return self._apply(messages, generation_prompt=True, source=source)

    def conversation(self, ex: Example) -> list[dict[str, str]]:
        assert ex.messages is not None and ex.completion is not None
        return [*ex.messages, {"role": "assistant", "content": ex.completion}]

    def split_text(self, ex: Example) -> tuple[str, str]:
        """(prompt text, completion text) of the last turn as the model sees them in training."""
        if ex.text is not None:
            return "", ex.text
        text, spans = self.render(ex)
        start = spans[-1][0] if spans else len(text)
        return text[:start], text[start:]

    def render(self, ex: Example, *, all_turns: bool = True) -> tuple[str, list[tuple[int, int]]]:
        """The whole row as text and the character spans that are trained on.

        Chat templates carry no ``{% generation %}`` markers (TRL's ``assistant_only_loss`` relies on
        them), so the assistant spans are found by rendering prefixes of the conversation: for the
        assistant message ``i``, ``render(messages[:i], add_generation_prompt=True)`` ends where its
        content starts and ``render(messages[:i+1])`` ends after its end-of-turn marker. Both must be
        prefixes of the whole rendering, which holds for templates that render a turn independently of
        what follows. Templates that don't (Qwen3 drops the reasoning of earlier turns, some templates
        put a system prompt only on the last turn) fall back to locating the message content in the
        whole rendering, after the previous span, plus the end-of-turn text that follows it when it is
        rendered last. ``all_turns=False`` keeps only the last assistant turn (instruction format).
        """
        if ex.text is not None:
            return ex.text, [(0, len(ex.text))]
        conv = self.conversation(ex)
        full = self._apply(conv, generation_prompt=False, source=ex.source)
        turns = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
        if not all_turns:
            turns = turns[-1:]
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i in turns:
            content = conv[i]["content"]
            before = self._apply(conv[:i], generation_prompt=True, source=ex.source) if i else ""
            upto = self._apply(conv[: i + 1], generation_prompt=False, source=ex.source)
            if full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
                span = (len(before), len(upto))
            else:
                self._warn_once(
                    "prefix", "Chat template renders a turn differently alone; locating assistant turns by content"
                )
                pos = full.find(content, cursor) if content else -1
                if pos < 0:
                    raise MalformedDatasetError(
                        f"{ex.source}: the chat template does not render assistant message {i} verbatim"
                    )
                end = pos + len(content)
                k = upto.rfind(content) if content else -1
                suffix = upto[k + len(content) :] if k >= 0 else ""
                if suffix and full.startswith(suffix, end):
                    end += len(suffix)
                span = (pos, end)
            if span[1] > span[0]:
                spans.append(span)
            cursor = max(cursor, span[1])
        return full, spans

    def encode(self, ex: Example, *, all_turns: bool = True) -> tuple[list[int], list[int]]:
        """(token ids, loss mask): the row tokenized as one string, 1 where the token is trained on."""
        tok = self.tokenizer
        text, spans = self.render(ex, all_turns=all_turns)
        plain = ex.text is not None
        # A chat template writes its own BOS; raw text gets the tokenizer's special tokens and an EOS.
        if getattr(tok, "is_fast", False):
            enc = tok(text, add_special_tokens=plain, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            offsets = list(enc["offset_mapping"])
            mask = [0] * len(ids)
            for j, (s, e) in enumerate(offsets):
                if e <= s:  # special tokens added by the tokenizer (BOS) have empty offsets
                    mask[j] = 1 if plain and j > 0 else 0
                    continue
                if any(s < b and e > a for a, b in spans):
                    mask[j] = 1
        else:
            # Slow tokenizers have no offsets: the boundary is the token count of the text before it.
            self._warn_once("slow", "Tokenizer has no offsets; masking by prefix token counts")
            ids = list(tok(text, add_special_tokens=plain)["input_ids"])
            mask = [0] * len(ids)
            for a, b in spans:
                lo = len(tok(text[:a], add_special_tokens=plain)["input_ids"]) if a else 0
                hi = len(tok(text[:b], add_special_tokens=plain)["input_ids"])
                for j in range(lo, min(hi, len(ids))):
                    mask[j] = 1
        if plain and tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
            ids.append(tok.eos_token_id)
            mask.append(1)
        return ids, mask


@dataclasses.dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    mask: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.mask:
            self.mask = [0 if t == IGNORE_INDEX else 1 for t in self.labels]


def _truncate(ids: list[int], mask: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Keep the last trained turn: the prompt is cut from the left (down to half of ``max_len`` if the
    completion needs the room), the completion from the right."""
    trained = [j for j, m in enumerate(mask) if m]
    start = trained[-1] if trained else len(mask)
    while start > 0 and mask[start - 1] == 1:
        start -= 1
    p_ids, c_ids = ids[:start], ids[start:]
    p_mask, c_mask = mask[:start], mask[start:]
    room = max_len - min(len(p_ids), max_len // 2)
    if len(c_ids) > room:
        c_ids, c_mask = c_ids[:room], c_mask[:room]
    keep = max_len - len(c_ids)
    if keep > 0:
        p_ids, p_mask = p_ids[-keep:], p_mask[-keep:]
    else:
        p_ids, p_mask = [], []
    return p_ids + c_ids, p_mask + c_mask


def tokenize(
    examples: Sequence[Example], renderer: Renderer, max_len: int, *, all_turns: bool = True
) -> tuple[list[Tokenized], dict[str, int]]:
    """Token ids and labels (-100 where the loss is not computed) of every row, at most ``max_len`` long.

    A chat row is trained on every assistant turn (``all_turns``); an instruction row on its completion.
    A row longer than ``max_len`` keeps its last turn: the prompt is cut from the left.
    """
    out: list[Tokenized] = []
    stats = {"rows": 0, "truncated": 0, "tokens": 0, "completionTokens": 0, "dropped": 0}
    for ex in examples:
        ids, mask = renderer.encode(ex, all_turns=all_turns)
        if len(ids) > max_len:
            stats["truncated"] += 1
            ids, mask = _truncate(ids, mask, max_len)
        if not any(mask):
            stats["dropped"] += 1
            continue
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
        out.append(Tokenized(ids, labels, mask))
        stats["rows"] += 1
        stats["tokens"] += len(ids)
        stats["completionTokens"] += sum(mask)
    if stats["truncated"]:
        log.warning(kv("Truncated rows longer than maxSeqLength", count=stats["truncated"], maxSeqLength=max_len))
    return out, stats


def mask_column(fmt: str) -> str | None:
    """The TRL dataset column that carries the loss mask of a format."""
    return {"chat": "assistant_masks", "instruction": "completion_mask"}.get(fmt)


def to_dataset(rows: Sequence[Tokenized], fmt: str) -> Any:
    """A ``datasets.Dataset`` that ``SFTTrainer`` takes as already processed (it has ``input_ids``).

    TRL builds the labels from the mask column: ``assistant_masks`` always applies,
    ``completion_mask`` with ``completion_only_loss=True``. The ``completion`` format has no mask: every
    token is trained on.
    """
    from datasets import Dataset

    body: dict[str, list[list[int]]] = {"input_ids": [r.input_ids for r in rows]}
    col = mask_column(fmt)
    if col is not None:
        body[col] = [r.mask for r in rows]
    return Dataset.from_dict(body)


class PackedRowsCollator:
    """Packed rows as a ``[batch, longest]`` batch; the documents in a row are told apart by ``position_ids``.

    TRL's padding-free collator flattens the whole batch into one sequence. That is what varlen
    kernels (flash attention) want, but sdpa and eager build a dense mask over the flat sequence:
    ``(batch x maxSeqLength)^2`` entries, 64x the work and memory of the rows alone at batch 8. Here
    each packed row stays a row, with no attention mask: transformers sees the position resets and
    builds a block-diagonal causal mask per row (``find_packed_sequence_indices``), so rows never
    attend to each other and the cost stays ``batch x maxSeqLength^2``. The right padding gets
    positions of its own (a separate block) and ``-100`` labels. The first token of every document
    is not a target (``-100``), as in TRL's collator, so no document is predicted from the one before.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b.get("labels", b["input_ids"]))
            lengths = list(b.get("seq_lengths") or [k])
            pos[i, :k] = torch.cat([torch.arange(x) for x in lengths])
            pos[i, k:] = torch.arange(n - k)
        labels[pos == 0] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels, "position_ids": pos}


#: Attention implementations with varlen kernels, which take TRL's flat padding-free batches.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2")


class Collator:
    """Right-pads a batch; padded label positions are ignored by the loss (used by evaluation)."""

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
