"""Dataset parsing (file:line errors, maxBadRows), splitting, rendering and loss masking."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kubelora.trainer import tiny
from kubelora.trainer.data import IGNORE_INDEX, Collator, Renderer, read_jsonl, split, to_dataset, tokenize
from kubelora.trainer.errors import MalformedDatasetError

pytestmark = pytest.mark.trainer


def write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "billing"}]}


def test_malformed_row_names_file_and_line(tmp_path: Path) -> None:
    rows: list[object] = [GOOD] * 16 + [{"msgs": []}] + [GOOD]
    path = write(tmp_path / "train.jsonl", rows)
    with pytest.raises(MalformedDatasetError) as e:
        read_jsonl(path, "chat")
    assert str(e.value) == 'train.jsonl:17: missing "messages"'
    assert e.value.reason == "MalformedDataset"


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("{not json", "invalid JSON"),
        ([1, 2], "expected a JSON object"),
        ({"messages": []}, '"messages" must be a non-empty list'),
        ({"messages": [{"role": "user", "content": "x"}]}, 'the last message must have role "assistant"'),
        ({"messages": [{"role": "bot", "content": "x"}]}, 'messages[0]: "role" must be one of'),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
            'messages[0]: "content" must be a string',
        ),
    ],
)
def test_chat_problems(tmp_path: Path, row: object, problem: str) -> None:
    path = write(tmp_path / "d.jsonl", [GOOD, row])
    with pytest.raises(MalformedDatasetError, match=r"^d\.jsonl:2: " + re.escape(problem)):
        read_jsonl(path, "chat")


def test_max_bad_rows_skips_then_fails(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [GOOD, "oops", GOOD, {"x": 1}, GOOD, "", GOOD])
    ok = read_jsonl(path, "chat", max_bad_rows=2)
    assert len(ok.examples) == 4 and len(ok.bad_rows) == 2
    assert ok.bad_rows[0].startswith("t.jsonl:2: invalid JSON")
    assert [e.source for e in ok.examples] == ["t.jsonl:1", "t.jsonl:3", "t.jsonl:5", "t.jsonl:7"]
    with pytest.raises(MalformedDatasetError, match=r"^t\.jsonl:4: missing \"messages\" \(2 malformed rows"):
        read_jsonl(path, "chat", max_bad_rows=1)


def test_instruction_and_completion_formats(tmp_path: Path) -> None:
    inst = read_jsonl(write(tmp_path / "i.jsonl", [{"prompt": "p", "completion": "c", "system": "s"}]), "instruction")
    ex = inst.examples[0]
    assert ex.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}]
    assert ex.completion == "c"
    with pytest.raises(MalformedDatasetError, match=r'^i2\.jsonl:1: missing "completion"'):
        read_jsonl(write(tmp_path / "i2.jsonl", [{"prompt": "p"}]), "instruction")
    comp = read_jsonl(write(tmp_path / "c.jsonl", [{"text": "hello world"}]), "completion")
    assert comp.examples[0].text == "hello world"
    with pytest.raises(MalformedDatasetError, match=r'^c2\.jsonl:1: missing "text"'):
        read_jsonl(write(tmp_path / "c2.jsonl", [{"prompt": "p"}]), "completion")


def test_digest_is_sha256_of_the_file(tmp_path: Path) -> None:
    import hashlib

    path = write(tmp_path / "t.jsonl", [GOOD, GOOD])
    parsed = read_jsonl(path, "chat", uri="s3://b/t.jsonl")
    assert parsed.digest() == {
        "uri": "s3://b/t.jsonl",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "sizeBytes": path.stat().st_size,
        "rows": 2,
        "badRows": 0,
    }


def test_seeded_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    rows = tiny.make_tickets(100, seed=3)
    examples = read_jsonl(tiny.write_jsonl(rows, tmp_path / "t.jsonl"), "chat").examples
    a_train, a_val = split(examples, 0.1, seed=42)
    _b_train, b_val = split(examples, 0.1, seed=42)
    _c_train, c_val = split(examples, 0.1, seed=43)
    assert [e.source for e in a_val] == [e.source for e in b_val]
    assert [e.source for e in a_val] != [e.source for e in c_val]
    assert len(a_val) == 10 and len(a_train) == 90
    assert not {e.source for e in a_val} & {e.source for e in a_train}


def test_loss_is_masked_on_prompts(tmp_path: Path) -> None:
    tok = tiny.build_tokenizer()
    renderer = Renderer(tok)
    rows = tiny.make_tickets(5, seed=1)
    examples = read_jsonl(tiny.write_jsonl(rows, tmp_path / "t.jsonl"), "chat").examples
    tokenized, stats = tokenize(examples, renderer, max_len=64)
    assert stats["rows"] == 5 and stats["truncated"] == 0
    for row, ex in zip(tokenized, examples, strict=True):
        trained = [t for t in row.labels if t != IGNORE_INDEX]
        # the completion is the label and the end-of-turn token; nothing of the prompt is trained on
        assert tok.decode(trained) == f"{ex.completion} <|end|>"
        n_prompt = row.labels.count(IGNORE_INDEX)
        assert row.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert tok.decode(row.input_ids[:n_prompt]).endswith("<|assistant|>")
    batch = Collator(tok.pad_token_id)([{"input_ids": r.input_ids, "labels": r.labels} for r in tokenized])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == 10


def test_long_rows_keep_the_completion(tmp_path: Path) -> None:
    tok = tiny.build_tokenizer()
    long_prompt = " ".join(["hello"] * 100)
    examples = read_jsonl(
        write(
            tmp_path / "t.jsonl",
            [{"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "billing"}]}],
        ),
        "chat",
    ).examples
    rows, stats = tokenize(examples, Renderer(tok), max_len=32)
    assert stats["truncated"] == 1 and len(rows[0].input_ids) == 32
    assert tok.decode([t for t in rows[0].labels if t != IGNORE_INDEX]) == "billing <|end|>"


def test_completion_format_trains_on_every_token(tmp_path: Path) -> None:
    tok = tiny.build_tokenizer()
    examples = read_jsonl(write(tmp_path / "c.jsonl", [{"text": "hello there"}]), "completion").examples
    rows, _ = tokenize(examples, Renderer(tok), max_len=32)
    assert IGNORE_INDEX not in rows[0].labels and rows[0].labels == rows[0].input_ids
    assert rows[0].input_ids[-1] == tok.eos_token_id


def test_fallback_template_when_the_tokenizer_has_none() -> None:
    tok = tiny.build_tokenizer()
    tok.chat_template = None
    r = Renderer(tok)
    assert r.template_source == "fallback"
    prompt = r.prompt([{"role": "user", "content": "hi"}])
    assert prompt.endswith("### Assistant:\n")


def test_dataset_columns_carry_the_mask_trl_applies(tmp_path: Path) -> None:
    tok = tiny.build_tokenizer()
    examples = read_jsonl(tiny.write_jsonl(tiny.make_tickets(3, seed=2), tmp_path / "t.jsonl"), "chat").examples
    rows, _ = tokenize(examples, Renderer(tok), max_len=64)
    chat = to_dataset(rows, "chat")
    assert chat.column_names == ["input_ids", "assistant_masks"]
    assert chat[0]["assistant_masks"] == [0 if t == IGNORE_INDEX else 1 for t in rows[0].labels]
    assert to_dataset(rows, "instruction").column_names == ["input_ids", "completion_mask"]
    assert to_dataset(rows, "completion").column_names == ["input_ids"]
