"""The data path on TRL: every assistant turn is trained on, and packed rows never see each other.

Everything here goes through the real pipeline: ``data.tokenize`` → ``data.to_dataset`` →
``SFTTrainer`` (label building, best-fit-decreasing packing, padding-free collation) → the model.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from kubelora.trainer import tiny
from kubelora.trainer.data import IGNORE_INDEX, Renderer, read_jsonl, to_dataset, tokenize
from tests.trainer.helpers import TinyKit

pytestmark = [pytest.mark.trainer, pytest.mark.filterwarnings("ignore::FutureWarning")]


def conversations(n: int, seed: int) -> list[dict[str, Any]]:
    """Chat rows of 1-4 exchanges, some with a system message."""
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        messages: list[dict[str, str]] = []
        if k % 2 == 0:
            messages.append({"role": "system", "content": tiny.SYSTEM})
        for _ in range(rng.randint(1, 4)):
            label = rng.choice(tiny.LABELS)
            turn = tiny.ticket_row(rng, label)["messages"]
            messages.extend(turn)
        rows.append({"messages": messages})
    return rows


def expected_trained(tok: Any, ids: list[int]) -> list[bool]:
    """An oracle for the tiny template (``<|role|> content <|end|>``): a token is trained on iff it is
    inside an assistant turn (its content or its closing ``<|end|>``), never the role marker itself."""
    roles = {tok.convert_tokens_to_ids(f"<|{r}|>"): r for r in ("system", "user", "assistant")}
    end = tok.convert_tokens_to_ids("<|end|>")
    out, role = [], None
    for t in ids:
        if t in roles:
            role = roles[t]
            out.append(False)
            continue
        out.append(role == "assistant")
        if t == end:
            role = None
    return out


def sft_trainer(model: Any, tok: Any, rows: Any, fmt: str, tmp_path: Path, *, packing: bool, max_len: int) -> Any:
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_length=max_len,
        packing=packing,
        packing_strategy="bfd",
        padding_free=packing,
        completion_only_loss=fmt == "instruction",
        assistant_only_loss=False,
        report_to="none",
        use_cpu=True,
        max_steps=1,
    )
    return SFTTrainer(model=model, args=args, train_dataset=to_dataset(rows, fmt), processing_class=tok)


@pytest.fixture(scope="module")
def tiny_model(tiny_kit: TinyKit) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_kit.model, dtype="float32")


@pytest.mark.parametrize("packing", [False, True])
def test_multi_turn_chat_trains_on_every_assistant_turn(
    tiny_kit: TinyKit, tiny_model: Any, tmp_path: Path, packing: bool
) -> None:
    tok = tiny.build_tokenizer()
    path = tiny.write_jsonl(conversations(24, seed=1), tmp_path / "chat.jsonl")
    examples = read_jsonl(path, "chat").examples
    assert sum(1 for ex in examples if sum(m["role"] == "assistant" for m in ex.messages or []) >= 2) >= 10
    rows, stats = tokenize(examples, Renderer(tok), max_len=256)
    assert stats["truncated"] == 0 and stats["rows"] == 24

    trainer = sft_trainer(tiny_model, tok, rows, "chat", tmp_path, packing=packing, max_len=256)
    prepared = trainer.train_dataset
    if packing:
        assert len(prepared) < len(rows)  # several rows per packed sequence
    n_assistant_turns = 0
    for item in prepared:
        ids, labels = item["input_ids"], item["labels"]
        want = expected_trained(tok, ids)
        got = [lbl != IGNORE_INDEX for lbl in labels]
        assert got == want, tok.decode(ids)
        assert all(lbl == t for lbl, t in zip(labels, ids, strict=True) if lbl != IGNORE_INDEX)
        n_assistant_turns += ids.count(tok.convert_tokens_to_ids("<|assistant|>"))
    # every assistant turn of every conversation, not only the last one
    assert n_assistant_turns == sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in conversations(24, 1))

    # the collated batch keeps the labels; padding-free batches carry per-row positions, no attention mask
    batch = next(iter(trainer.get_train_dataloader()))
    if packing:
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
        starts = int((batch["position_ids"][0] == 0).sum())
        assert starts > batch["input_ids"].shape[0]  # several rows in the flat sequence
    trained = batch["labels"] != IGNORE_INDEX
    user = tok.convert_tokens_to_ids("<|user|>")
    system = tok.convert_tokens_to_ids("<|system|>")
    assert not bool(trained[batch["input_ids"] == user].any()) and not bool(trained[batch["input_ids"] == system].any())


def test_instruction_trains_on_the_completion_only(tiny_model: Any, tmp_path: Path) -> None:
    tok = tiny.build_tokenizer()
    rows_in = tiny.to_instruction(tiny.make_tickets(8, seed=4))
    path = tiny.write_jsonl([{**r, "system": tiny.SYSTEM} for r in rows_in], tmp_path / "i.jsonl")
    rows, _ = tokenize(read_jsonl(path, "instruction").examples, Renderer(tok), max_len=64)
    prepared = sft_trainer(tiny_model, tok, rows, "instruction", tmp_path, packing=False, max_len=64).train_dataset
    for item, src in zip(prepared, rows_in, strict=True):
        trained = [t for t, lbl in zip(item["input_ids"], item["labels"], strict=True) if lbl != IGNORE_INDEX]
        assert tok.decode(trained) == f"{src['completion']} <|end|>"


def test_sentencepiece_boundary_is_tokenized_together() -> None:
    """Prompt and completion are one string to the tokenizer: a word split across the boundary keeps
    the tokens the model sees at inference, and the mask covers the tokens that overlap the completion."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kubelora.trainer.data import Example

    # a BPE where "ab" is one token: rendering "...a" + "b..." must not tokenize as "a", "b"
    vocab = {"<unk>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4, "x": 5, ":": 6}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}{% endif %}"
    ids, mask = Renderer(tok).encode(Example("t:1", messages=[{"role": "user", "content": "x:a"}], completion="bx"))
    assert ids == [5, 6, 4, 5]  # "x", ":", "ab", "x": one merged token across the boundary
    assert mask == [0, 0, 1, 1]


def segments(pos: Any) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every document, from the position resets."""
    out = []
    for r in range(pos.shape[0]):
        starts = [int(i) for i in (pos[r] == 0).nonzero().flatten()] + [pos.shape[1]]
        out += [(r, a, b) for a, b in itertools.pairwise(starts)]
    return out


@pytest.mark.parametrize("collator", ["trl-flat", "rows"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_do_not_see_each_other(tiny_kit: TinyKit, tmp_path: Path, attn: str, collator: str) -> None:
    """Logits of a packed batch equal each row's logits alone, with TRL's flat padding-free batches
    (what varlen kernels get) and with our packed rows (what sdpa/eager get)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubelora.trainer.data import PackedRowsCollator

    tok = tiny.build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_kit.model, dtype="float32", attn_implementation=attn).eval()
    path = tiny.write_jsonl(conversations(12, seed=9), tmp_path / "chat.jsonl")
    rows, _ = tokenize(read_jsonl(path, "chat").examples, Renderer(tok), max_len=128)
    trainer = sft_trainer(model, tok, rows, "chat", tmp_path, packing=True, max_len=128)
    if collator == "rows":
        trainer.data_collator = PackedRowsCollator(tok.pad_token_id)
    batch = next(iter(trainer.get_train_dataloader()))
    ids, pos = batch["input_ids"], batch["position_ids"]
    assert "attention_mask" not in batch
    assert ids.shape[0] == (1 if collator == "trl-flat" else 4)
    docs = [d for d in segments(pos) if d[2] - d[1] > 1 or collator == "trl-flat"]
    assert len(docs) >= 4
    trained = batch["labels"] != IGNORE_INDEX
    assert not any(bool(trained[r, a]) for r, a, _ in docs)  # no document is a target of the one before
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits
        # the control: the same rows as plain causal rows (classic packing) do leak across documents
        leaky = model(input_ids=ids).logits
        worst_leak = 0.0
        for r, a, b in docs:
            alone = model(input_ids=ids[r : r + 1, a:b]).logits[0]
            if collator == "rows" and int(ids[r, a]) == tok.pad_token_id:
                continue  # the padding block
            torch.testing.assert_close(packed[r, a:b], alone, rtol=1e-4, atol=1e-4)
            worst_leak = max(worst_leak, float((leaky[r, a:b] - alone).abs().max()))
    assert worst_leak > 1e-2


@pytest.mark.parametrize("name", ["llama3", "qwen2.5", "qwen3", "mistral", "gemma"])
def test_every_assistant_turn_on_real_templates(name: str) -> None:
    """With the published templates of five families (tests/trainer/families.py), exactly the assistant
    turns are trained on: their content and the end-of-turn token that closes them, every turn. Qwen 3
    renders an empty reasoning block on the last turn only, so a turn rendered alone is not a prefix of
    the whole: that exercises the fallback that locates turns by content."""
    from kubelora.trainer.data import Example
    from tests.trainer.families import FAMILIES, build_tokenizer

    family = FAMILIES[name]
    tok = build_tokenizer(family)
    turns = [
        ("classify this ticket : my password is locked", "account"),
        ("please help the invoice was charged twice", "billing refund"),
        ("classify this ticket : delivery", "shipping"),
    ]
    messages: list[dict[str, str]] = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    ex = Example(f"{name}.jsonl:1", messages=messages[:-1], completion=messages[-1]["content"])
    rows, stats = tokenize([ex], Renderer(tok), max_len=256)
    assert stats["rows"] == 1
    ids, labels = rows[0].input_ids, rows[0].labels
    trained = [t for t, lbl in zip(ids, labels, strict=True) if lbl != IGNORE_INDEX]
    eot = tok.convert_tokens_to_ids(family.end_of_turn)
    think = {tok.convert_tokens_to_ids(t) for t in family.added}
    expected: list[int] = []
    for _, assistant in turns:
        expected += [*tok(assistant, add_special_tokens=False)["input_ids"], eot]
    assert [t for t in trained if t not in think] == expected, tok.convert_ids_to_tokens(trained)
    for user, _ in turns:  # no user word is trained on
        user_ids = set(tok(user, add_special_tokens=False)["input_ids"])
        assert not any(t in user_ids for t in trained if t not in set(expected))
