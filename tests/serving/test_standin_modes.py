"""Stand-in modes: runtime updating disabled, --lora-modules, several served names, startup failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import REPO, Standin, TinyArtifacts, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def static_server(tiny: TinyArtifacts, standin_factory: Callable[..., Standin]) -> Standin:
    static_b = json.dumps({"name": "static-b", "path": str(tiny.adapter_b), "base_model_name": "tiny-base"})
    return standin_factory(
        tiny.model,
        "127.0.0.3",
        "--served-model-name",
        "tiny-base",
        "tiny-alias",
        "--enable-lora",
        "--max-loras",
        "2",
        "--lora-modules",
        f"static-a={tiny.adapter_a}",
        static_b,
        runtime_updating=False,
    )


def test_runtime_updating_disabled_hides_the_endpoints(static_server: Standin) -> None:
    """Without VLLM_ALLOW_RUNTIME_LORA_UPDATING vLLM does not register the routes at all."""
    with static_server.client() as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
        assert r.status_code == 404
        assert r.json() == {"detail": "Not Found"}
        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "static-a"})
        assert r.status_code == 404
        assert "static-a" in [m["id"] for m in c.get("/v1/models").json()["data"]]


def test_static_adapters_and_served_names(static_server: Standin, tiny: TinyArtifacts) -> None:
    ids = tiny.tokenizer()("hello world").input_ids
    with static_server.client() as c:
        data = c.get("/v1/models").json()["data"]
        assert [m["id"] for m in data] == ["tiny-base", "tiny-alias", "static-a", "static-b"]
        cards = {m["id"]: m for m in data}
        assert cards["tiny-alias"]["root"] == str(tiny.model)
        assert cards["static-a"]["parent"] == "tiny-base"
        assert cards["static-b"]["parent"] == "tiny-base"
        assert cards["static-b"]["root"] == str(tiny.adapter_b)

        alias = c.post("/v1/completions", json={"model": "tiny-alias", "prompt": "hello world", "max_tokens": 4})
        assert alias.status_code == 200
        assert alias.json()["model"] == "tiny-base"  # vLLM answers with the first served name
        assert alias.json()["choices"][0]["text"] == tiny.reference_text(None, ids, 4)

        no_model = c.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 4})
        assert no_model.status_code == 200
        assert no_model.json()["model"] == "tiny-base"

        static = c.post("/v1/completions", json={"model": "static-a", "prompt": "hello world", "max_tokens": 4})
        assert static.json()["choices"][0]["text"] == tiny.reference_text(tiny.adapter_a, ids, 4)


def test_bad_lora_module_fails_startup(tiny: TinyArtifacts) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer")])
    cmd = [
        sys.executable,
        "-m",
        "kubelora.serving.standin",
        "--model",
        str(tiny.model),
        "--host",
        "127.0.0.4",
        "--port",
        str(free_port("127.0.0.4")),
        "--enable-lora",
        "--lora-modules",
        f"big={tiny.adapter_rank32}",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "LoRA rank 32 is greater than max_lora_rank 16." in done.stderr


def test_missing_model_directory_fails_startup(tmp_path: Any) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer")])
    cmd = [sys.executable, "-m", "kubelora.serving.standin", "--model", str(tmp_path), "--port", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 2
    assert "not a local Hugging Face model directory" in done.stderr
