"""Evaluation stops at the end of the assistant's turn, for the chat templates of real model families.

A tiny random model does not emit an end-of-turn token by itself, so a logits processor scripts what it emits:
an answer, the family's end-of-turn token, then more words. The scripted tokens go through the real
``model.generate`` path (left padding, batches, the stop list, decoding): the answer must be cut exactly at the
terminator, and the same script must run on past it when the terminator set lacks that token.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubelora.trainer import evaluate
from kubelora.trainer.data import Example, Renderer
from tests.trainer import families

pytestmark = [pytest.mark.trainer, pytest.mark.filterwarnings("ignore::UserWarning")]

PROMPTS = [
    [{"role": "user", "content": "classify this ticket : my password is locked"}],
    [{"role": "user", "content": "classify this ticket : the invoice was charged twice please help"}],
    [{"role": "user", "content": "help"}],
]


class Scripted:
    """The model, whose ``generate`` emits ``script`` token by token (a logits processor masks everything else)."""

    def __init__(self, model: Any, script: list[int]) -> None:
        self.model = model
        self.script = script
        self.calls = 0

    def generate(self, **kwargs: Any) -> Any:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        width = kwargs["input_ids"].shape[1]
        script = self.script

        class Force(LogitsProcessor):
            def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
                step = input_ids.shape[1] - width
                forced = torch.full_like(scores, float("-inf"))
                forced[:, script[min(step, len(script) - 1)]] = 0.0
                return forced

        self.calls += 1
        return self.model.generate(**kwargs, logits_processor=LogitsProcessorList([Force()]))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def run(model: Any, tok: Any, stops: list[int] | None, max_new_tokens: int) -> list[str]:
    examples = [Example(f"t:{i}", messages=m, completion="") for i, m in enumerate(PROMPTS)]
    return evaluate.generate(
        model,
        tok,
        Renderer(tok),
        examples,
        max_new_tokens=max_new_tokens,
        max_len=128,
        batch_size=2,  # two batches, one of them with left padding
        stop_ids=stops,
    )


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_generation_stops_at_the_end_of_the_turn(name: str) -> None:
    family, tok, model = families.build(name)
    eot = tok.convert_tokens_to_ids(family.end_of_turn)
    assert isinstance(eot, int) and eot != tok.unk_token_id
    stops = evaluate.stop_token_ids(model, tok)
    # the union: generation_config's EOS, the tokenizer's EOS and the template's end of turn
    assert eot in stops and tok.eos_token_id in stops
    for token in family.generation_eos:
        assert tok.convert_tokens_to_ids(token) in stops

    answer, garbage = "account locked", "shipping delivery garbage"
    script = [*ids(tok, answer), eot, *ids(tok, garbage)]
    if name == "qwen3":  # Qwen 3 answers after an (empty) reasoning block
        script = [tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>"), *script]
    scripted = Scripted(model, script)
    out = run(scripted, tok, None, max_new_tokens=len(script))
    assert out == [answer] * len(PROMPTS), out
    assert scripted.calls == 2

    # Without the terminator the very same generation runs on into the garbage: the cut above is the stop list's.
    without = [i for i in stops if i != eot]
    out = run(Scripted(model, script), tok, without, max_new_tokens=len(script))
    assert out == [f"{answer} {garbage}"] * len(PROMPTS), out


def test_the_only_terminator_some_families_have_is_the_templates() -> None:
    """Llama 3, Qwen 2.5 (base) and Gemma name an EOS that is not their end of turn: only the template tells."""
    for name in ("llama3", "qwen2.5", "gemma"):
        family, tok, model = families.build(name)
        eot = tok.convert_tokens_to_ids(family.end_of_turn)
        config_eos = model.generation_config.eos_token_id
        assert eot != tok.eos_token_id and eot not in (config_eos if isinstance(config_eos, list) else [config_eos])
        assert evaluate.template_end_of_turn(tok) == [eot]


def test_the_kit_template_and_the_fallback_template() -> None:
    from kubelora.trainer import tiny
    from kubelora.trainer.data import FALLBACK_CHAT_TEMPLATE

    tok = tiny.build_tokenizer()
    assert evaluate.template_end_of_turn(tok) == [tok.convert_tokens_to_ids("<|end|>")]
    tok.chat_template = FALLBACK_CHAT_TEMPLATE  # closes a turn with {{ eos_token }}
    assert evaluate.template_end_of_turn(tok) == [tok.eos_token_id]


def test_answer_cleaning() -> None:
    assert evaluate.cut_at_stop([5, 6, 7, 2, 9, 7], [7, 2]) == [5, 6]
    assert evaluate.cut_at_stop([5, 6], [7]) == [5, 6]
    assert evaluate.clean_answer("<think>\n\n</think>\n\n billing ") == "billing"
    assert evaluate.clean_answer("<think> </think> billing") == "billing"
    # a reasoning block with content is the model's answer as served: kept
    assert evaluate.clean_answer("<think>hmm</think> billing") == "<think>hmm</think> billing"
