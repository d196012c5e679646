"""A row the model's chat template refuses fails with file:line, before the model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kubelora.trainer import tiny
from tests.trainer.helpers import TinyKit, make_spec, read_events, write_spec

pytestmark = [pytest.mark.trainer, pytest.mark.filterwarnings("ignore::FutureWarning")]

#: Gemma's rules (no system role, strict user/assistant alternation starting with the user) in the tiny
#: model's vocabulary, raising as the real templates do with ``raise_exception``.
STRICT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

GOOD = {"messages": [{"role": "user", "content": "hello invoice"}, {"role": "assistant", "content": "billing"}]}


def strict_model(tiny_kit: TinyKit, root: Path) -> Path:
    model = root / "strict-model"
    shutil.copytree(tiny_kit.model, model)
    (model / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    return model


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (
            [{"role": "system", "content": "be brief"}, *GOOD["messages"]],
            "System role not supported",
        ),
        (
            [GOOD["messages"][0], {"role": "user", "content": "again"}, GOOD["messages"][1]],
            "Conversation roles must alternate",
        ),
        (
            [GOOD["messages"][0], {"role": "tool", "content": "{}"}, GOOD["messages"][1]],
            "Unknown role: tool",
        ),
    ],
    ids=["system", "alternation", "tool"],
)
def test_template_error_names_file_and_line_before_the_model_loads(
    tiny_kit: TinyKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: list[dict[str, str]], problem: str
) -> None:
    from kubelora.trainer import cli, modeling

    model = strict_model(tiny_kit, tmp_path)
    train = tiny.write_jsonl([GOOD, GOOD, {"messages": bad}, GOOD], tmp_path / "data" / "train.jsonl")
    manifest = make_spec(base=f"file://{model}", train=f"file://{train}", output=f"file://{tmp_path}/out")
    spec = write_spec(tmp_path / "run", manifest)
    report = tmp_path / "run" / "report.jsonl"

    # Any weight read fails the test: the error must come before the model is loaded.
    loaded: list[Any] = []

    def no_weights(*args: Any, **kwargs: Any) -> Any:
        loaded.append(args)
        raise AssertionError("the model was loaded before the data was rendered")

    monkeypatch.setattr(modeling, "load_base", no_weights)
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", no_weights)
    monkeypatch.setattr(safetensors, "safe_open", no_weights)

    rc = cli.main(["--spec", str(spec), "--report-file", str(report), "--workdir", str(tmp_path / "work")])

    events = read_events(report)
    error = [e for e in events if e["type"] == "error"][-1]
    assert rc == 3, error  # not retryable
    assert error["reason"] == "MalformedDataset"
    assert error["message"].startswith("train.jsonl:3: the chat template cannot render this row: "), error
    assert problem in error["message"]
    assert not loaded
    assert not [e for e in events if e["type"] == "model"]
    assert [e.get("step") for e in events if e["type"] == "phase"][-1] == "data"


def test_a_template_that_accepts_the_rows_trains(tiny_kit: TinyKit, tmp_path: Path) -> None:
    """The same strict template with well-formed rows gets past rendering (the check is not a blanket refusal)."""
    from kubelora.trainer import data, modeling

    model = strict_model(tiny_kit, tmp_path)
    tok = modeling.load_tokenizer(model, False)
    assert "raise_exception" in str(tok.chat_template)
    examples = data.read_jsonl(tiny.write_jsonl([GOOD] * 3, tmp_path / "t.jsonl"), "chat").examples
    rows, stats = data.tokenize(examples, data.Renderer(tok), 64)
    assert stats["rows"] == 3 and all(json.dumps(r.input_ids) for r in rows)
