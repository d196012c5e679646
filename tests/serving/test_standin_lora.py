"""The vLLM stand-in as a real subprocess: runtime LoRA loading, completions and vLLM's error shapes."""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from .conftest import Standin, TinyArtifacts

pytestmark = pytest.mark.slow

BASE = "tiny-base"
PROMPT = "the cat sat on the"


@pytest.fixture(scope="module")
def server(tiny: TinyArtifacts, standin_factory: Callable[..., Standin]) -> Standin:
    return standin_factory(
        tiny.model,
        "127.0.0.2",
        "--served-model-name",
        BASE,
        "--enable-lora",
        "--max-loras",
        "2",
        "--max-lora-rank",
        "16",
    )


def load(c: httpx.Client, name: str, path: Any, **extra: Any) -> httpx.Response:
    return c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), **extra})


def unload(c: httpx.Client, name: str) -> httpx.Response:
    return c.post("/v1/unload_lora_adapter", json={"lora_name": name})


def complete(c: httpx.Client, model: str, prompt: str | list[str] = PROMPT, **extra: Any) -> httpx.Response:
    return c.post("/v1/completions", json={"model": model, "prompt": prompt, **extra})


def model_ids(c: httpx.Client) -> list[str]:
    return [m["id"] for m in c.get("/v1/models").json()["data"]]


def error(message: str, err_type: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def test_health_version_and_models(server: Standin, tiny: TinyArtifacts) -> None:
    with server.client() as c:
        health = c.get("/health")
        assert health.status_code == 200
        assert health.content == b""
        version = c.get("/version").json()
        assert "kubelora-standin" in version["version"]
        assert "not vLLM" in version["notice"]
        models = c.get("/v1/models").json()
    assert models["object"] == "list"
    (card,) = [m for m in models["data"] if m["id"] == BASE]
    assert card["object"] == "model"
    assert card["root"] == str(tiny.model)
    assert card["parent"] is None
    assert card["max_model_len"] == 128
    assert card["owned_by"] == "vllm"


def test_load_list_complete_unload(server: Standin, tiny: TinyArtifacts) -> None:
    ids = tiny.tokenizer()(PROMPT).input_ids
    with server.client() as c:
        r = load(c, "lora-a", tiny.adapter_a)
        assert r.status_code == 200, r.text
        assert r.text == "Success: LoRA adapter 'lora-a' added successfully."

        cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert cards["lora-a"]["root"] == str(tiny.adapter_a)
        assert cards["lora-a"]["parent"] == BASE

        base = complete(c, BASE, max_tokens=8).json()
        adapted = complete(c, "lora-a", max_tokens=8).json()

        assert base["model"] == BASE
        assert adapted["model"] == "lora-a"
        assert adapted["object"] == "text_completion"
        assert adapted["id"].startswith("cmpl-")
        expected = tiny.reference_text(tiny.adapter_a, ids, 8)
        assert adapted["choices"][0]["text"] == expected
        assert base["choices"][0]["text"] == tiny.reference_text(None, ids, 8)
        assert adapted["choices"][0]["text"] != base["choices"][0]["text"]
        generated = len(tiny.reference(tiny.adapter_a, ids, 8))
        assert adapted["usage"] == {
            "prompt_tokens": len(ids),
            "completion_tokens": generated,
            "total_tokens": len(ids) + generated,
            "prompt_tokens_details": None,
        }

        r = unload(c, "lora-a")
        assert r.status_code == 200
        assert r.text == "Success: LoRA adapter 'lora-a' removed successfully."
        gone = complete(c, "lora-a", max_tokens=2)
        assert gone.status_code == 404
        assert gone.json() == error("The model `lora-a` does not exist.", "NotFoundError", 404, "model")
        assert "lora-a" not in model_ids(c)
        # with no adapter left the base model still answers, unchanged
        after = complete(c, BASE, max_tokens=8).json()
        assert after["choices"][0]["text"] == base["choices"][0]["text"]
        chat = c.post("/v1/chat/completions", json={"model": "lora-a", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 404
        assert chat.json()["error"]["type"] == "NotFoundError"


def test_load_errors_have_vllm_status_codes_and_shapes(server: Standin, tiny: TinyArtifacts) -> None:
    with server.client() as c:
        assert load(c, "dup", tiny.adapter_a).status_code == 200
        again = load(c, "dup", tiny.adapter_b)
        assert again.status_code == 400
        assert again.json() == error(
            "The lora adapter 'dup' has already been loaded. If you want to load the adapter in place, "
            "set 'load_inplace' to True.",
            "InvalidUserInput",
            400,
        )

        missing = unload(c, "never-loaded")
        assert missing.status_code == 404
        assert missing.json() == error("The lora adapter 'never-loaded' cannot be found.", "NotFoundError", 404)

        ghost_path = tiny.model.parent / "no-such-adapter"
        ghost = load(c, "ghost", ghost_path)
        assert ghost.status_code == 404
        assert ghost.json() == error(
            f"Loading lora ghost failed: No adapter found for {ghost_path}", "NotFoundError", 404
        )

        too_big = load(c, "rank32", tiny.adapter_rank32)
        assert too_big.status_code == 500
        assert too_big.json() == error("LoRA rank 32 is greater than max_lora_rank 16.", "InternalServerError", 500)

        empty = load(c, "", tiny.adapter_a)
        assert empty.status_code == 400
        assert empty.json() == error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)

        no_path = c.post("/v1/load_lora_adapter", json={"lora_name": "x"})
        assert no_path.status_code == 400
        assert no_path.json()["error"]["type"] == "Bad Request"
        assert no_path.json()["error"]["param"] == "body.lora_path"

        listed = model_ids(c)
        assert "dup" in listed
        assert not {"ghost", "rank32", "x"} & set(listed)
        assert unload(c, "dup").status_code == 200


def test_base_model_name_is_not_checked_but_shapes_are(server: Standin, tiny: TinyArtifacts) -> None:
    """vLLM does not compare adapter_config.json's base_model_name_or_path with the served model."""
    ids = tiny.tokenizer()(PROMPT).input_ids
    with server.client() as c:
        r = load(c, "other-name", tiny.adapter_other_base_name)
        assert r.status_code == 200, r.text
        text = complete(c, "other-name", max_tokens=6).json()["choices"][0]["text"]
        assert text == tiny.reference_text(tiny.adapter_other_base_name, ids, 6)

        wrong = load(c, "wrong-shape", tiny.adapter_wrong_shape)
        assert wrong.status_code == 500
        body = wrong.json()["error"]
        assert body["type"] == "InternalServerError"
        assert body["message"].startswith("Loading lora wrong-shape failed:")
        assert "wrong-shape" not in model_ids(c)

        # the failed load left the model as it was
        base = complete(c, BASE, max_tokens=6).json()["choices"][0]["text"]
        assert base == tiny.reference_text(None, ids, 6)
        again = complete(c, "other-name", max_tokens=6).json()["choices"][0]["text"]
        assert again == text
        assert unload(c, "other-name").status_code == 200


def test_load_inplace_replaces_weights(server: Standin, tiny: TinyArtifacts) -> None:
    ids = tiny.tokenizer()(PROMPT).input_ids
    with server.client() as c:
        assert load(c, "swap", tiny.adapter_a).status_code == 200
        first = complete(c, "swap", max_tokens=6).json()["choices"][0]["text"]
        assert first == tiny.reference_text(tiny.adapter_a, ids, 6)

        r = load(c, "swap", tiny.adapter_b, load_inplace=True)
        assert r.status_code == 200, r.text
        second = complete(c, "swap", max_tokens=6).json()["choices"][0]["text"]
        assert second == tiny.reference_text(tiny.adapter_b, ids, 6)
        assert second != first
        cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert cards["swap"]["root"] == str(tiny.adapter_b)
        assert unload(c, "swap").status_code == 200


def test_more_adapters_than_max_loras_are_served(server: Standin, tiny: TinyArtifacts) -> None:
    """vLLM has no "max loras reached" error: --max-cpu-loras (default --max-loras) bounds an LRU cache."""
    ids = tiny.tokenizer()(PROMPT).input_ids
    adapters = {"lru-a": tiny.adapter_a, "lru-b": tiny.adapter_b, "lru-c": tiny.adapter_other_base_name}
    with server.client() as c:
        for name, path in adapters.items():
            r = load(c, name, path)
            assert r.status_code == 200, r.text
        assert set(adapters) <= set(model_ids(c))
        for _ in range(2):  # every round reloads evicted adapters from disk
            for name, path in adapters.items():
                text = complete(c, name, max_tokens=5).json()["choices"][0]["text"]
                assert text == tiny.reference_text(path, ids, 5), name
        for name in adapters:
            assert unload(c, name).status_code == 200
    assert "Evicted LoRA adapter from memory" in server.log()


def test_sampling_controls_and_validation(server: Standin, tiny: TinyArtifacts) -> None:
    tokenizer = tiny.tokenizer()
    ids = tokenizer(PROMPT).input_ids
    reference = tiny.reference(None, ids, 8)
    full = tiny.reference_text(None, ids, 8)
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    expected = full[: full.find(stop)]
    # tokens generated until the stop string first appears in the text
    used = next(
        k for k in range(1, len(reference) + 1) if stop in tokenizer.decode(reference[:k], skip_special_tokens=True)
    )
    with server.client() as c:
        r = complete(c, BASE, max_tokens=8, stop=[stop]).json()
        assert r["choices"][0]["text"] == expected
        assert r["choices"][0]["finish_reason"] == "stop"
        assert r["choices"][0]["stop_reason"] == stop
        assert r["usage"]["completion_tokens"] == used

        kept = complete(c, BASE, max_tokens=8, stop=stop, include_stop_str_in_output=True).json()
        assert kept["choices"][0]["text"] == expected + stop

        one = complete(c, BASE, max_tokens=1).json()
        assert one["usage"]["completion_tokens"] == 1
        assert one["choices"][0]["finish_reason"] == "length"

        default = complete(c, BASE).json()  # vLLM's completions default max_tokens is 16
        assert default["usage"]["completion_tokens"] == len(tiny.reference(None, ids, 16))

        sampled = [complete(c, BASE, max_tokens=8, temperature=1.5, seed=7).json()["choices"][0]["text"] for _ in "ab"]
        assert sampled[0] == sampled[1]

        batch = complete(c, BASE, prompt=[PROMPT, "hello world"], max_tokens=3).json()
        assert [ch["index"] for ch in batch["choices"]] == [0, 1]
        assert batch["choices"][0]["text"] == tiny.reference_text(None, ids, 3)

        streamed = complete(c, BASE, max_tokens=2, stream=True)
        assert streamed.status_code == 400
        assert streamed.json()["error"]["type"] == "BadRequestError"

        long_prompt = " ".join(["the"] * 130)
        too_long = complete(c, BASE, prompt=long_prompt, max_tokens=2)
        assert too_long.status_code == 400
        assert too_long.json()["error"]["param"] == "input_tokens"
        assert too_long.json()["error"]["message"].startswith("This model's maximum context length is 128 tokens.")

        too_many = complete(c, BASE, max_tokens=500)
        assert too_many.status_code == 400
        assert too_many.json()["error"]["param"] == "max_tokens"
        assert re.match(
            r"'max_tokens' or 'max_completion_tokens' is too large: 500\.", too_many.json()["error"]["message"]
        )

        bad_type = complete(c, BASE, max_tokens="many")
        assert bad_type.status_code == 400
        assert bad_type.json()["error"]["type"] == "Bad Request"


def test_openai_client(server: Standin, tiny: TinyArtifacts) -> None:
    tokenizer = tiny.tokenizer()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0)
    loaded = client.post("load_lora_adapter", cast_to=str, body={"lora_name": "oa", "lora_path": str(tiny.adapter_b)})
    assert "success" in loaded.lower()
    assert "oa" in [m.id for m in client.models.list().data]

    messages = [{"role": "user", "content": "hello world"}]
    chat = client.chat.completions.create(model="oa", messages=messages, max_tokens=6)  # type: ignore[arg-type]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert chat.model == "oa"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == tiny.reference_text(tiny.adapter_b, chat_ids, 6)
    assert chat.usage is not None
    assert chat.usage.prompt_tokens == len(chat_ids)

    completion = client.completions.create(model="oa", prompt=PROMPT, max_tokens=6)
    ids = tokenizer(PROMPT).input_ids
    assert completion.model == "oa"
    assert completion.choices[0].text == tiny.reference_text(tiny.adapter_b, ids, 6)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(tiny.reference(tiny.adapter_b, ids, 6))

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="already been loaded"):
        client.post("load_lora_adapter", cast_to=str, body={"lora_name": "oa", "lora_path": str(tiny.adapter_b)})
    with pytest.raises(openai.InternalServerError, match="is greater than max_lora_rank"):
        client.post("load_lora_adapter", cast_to=str, body={"lora_name": "r32", "lora_path": str(tiny.adapter_rank32)})
    assert "success" in client.post("unload_lora_adapter", cast_to=str, body={"lora_name": "oa"}).lower()


def test_load_and_unload_while_serving(server: Standin, tiny: TinyArtifacts) -> None:
    """Requests are served one at a time; loading and unloading adapters meanwhile changes no answer."""
    ids = tiny.tokenizer()(PROMPT).input_ids
    expected_base = tiny.reference_text(None, ids, 12)
    expected_a = tiny.reference_text(tiny.adapter_a, ids, 12)
    with server.client() as c:
        assert load(c, "steady", tiny.adapter_a).status_code == 200

    def base_request(_: int) -> str:
        with server.client() as c:
            r = complete(c, BASE, max_tokens=12)
            assert r.status_code == 200, r.text
            return str(r.json()["choices"][0]["text"])

    def steady_request(_: int) -> str:
        with server.client() as c:
            r = complete(c, "steady", max_tokens=12)
            assert r.status_code == 200, r.text
            return str(r.json()["choices"][0]["text"])

    def churn(i: int) -> None:
        with server.client() as c:
            r = load(c, f"churn-{i}", tiny.adapter_b)
            assert r.status_code == 200, r.text
            r = unload(c, f"churn-{i}")
            assert r.status_code == 200, r.text

    with ThreadPoolExecutor(max_workers=6) as pool:
        bases = [pool.submit(base_request, i) for i in range(6)]
        steadies = [pool.submit(steady_request, i) for i in range(4)]
        churns = [pool.submit(churn, i) for i in range(4)]
        assert [f.result(timeout=120) for f in bases] == [expected_base] * 6
        assert [f.result(timeout=120) for f in steadies] == [expected_a] * 4
        for f in churns:
            f.result(timeout=120)
    with server.client() as c:
        assert not [m for m in model_ids(c) if m.startswith("churn-")]
        assert unload(c, "steady").status_code == 200
