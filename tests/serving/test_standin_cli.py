"""Command-line parsing of the vLLM stand-in (no model, no server)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from kubelora.serving.standin import (
    LoRAModulePath,
    build_parser,
    parse_lora_module,
    runtime_lora_updating_allowed,
    validate_args,
)

from .conftest import REPO


def test_help_says_it_is_a_development_and_test_server() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "operator"))
    done = subprocess.run(
        [sys.executable, "-m", "kubelora.serving.standin", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    text = " ".join(done.stdout.split())
    assert "DEVELOPMENT AND TEST server" in text
    assert "not vLLM and not a product" in text
    assert "--max-lora-rank" in text


@pytest.mark.parametrize(
    ("value", "allowed"),
    [("1", True), ("True", True), (" true ", True), ("0", False), ("yes", False), ("", False), (None, False)],
)
def test_runtime_lora_updating_env(value: str | None, allowed: bool) -> None:
    env = {} if value is None else {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": value}
    assert runtime_lora_updating_allowed(env) is allowed


def test_lora_modules_formats() -> None:
    assert parse_lora_module("a=/x/y") == LoRAModulePath("a", "/x/y")
    assert parse_lora_module('{"name": "b", "path": "/p", "base_model_name": "m"}') == LoRAModulePath("b", "/p", "m")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_lora_module("no-equals-sign")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_lora_module('{"name": "missing-path"}')


def test_flags_are_validated_like_vllm() -> None:
    parser = build_parser()
    args = parser.parse_args(["--model", "m", "--enable-lora", "--max-loras", "4"])
    validate_args(parser, args)
    assert (args.max_loras, args.max_lora_rank, args.max_cpu_loras, args.port) == (4, 16, None, 8000)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--max-lora-rank", "24"])  # vLLM accepts only its listed ranks
    bad = parser.parse_args(["--model", "m", "--max-loras", "4", "--max-cpu-loras", "2"])
    with pytest.raises(SystemExit):
        validate_args(parser, bad)
