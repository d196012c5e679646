"""Fixtures for the trainer tests: a tiny model and task, built once per session."""

from __future__ import annotations

import pytest

from tests.trainer.helpers import TinyKit


@pytest.fixture(scope="session")
def tiny_kit(tmp_path_factory: pytest.TempPathFactory) -> TinyKit:
    from kubelora.trainer import tiny

    root = tmp_path_factory.mktemp("tiny")
    model = tiny.build_tiny_model(root / "model")
    task = tiny.write_task(root / "task", n_train=400, n_test=48, n_regression=24)
    shuffled = tiny.write_task(root / "shuffled", n_train=400, shuffled_labels=True)
    return TinyKit(root, model, task["train"], task["test"], task["regression"], shuffled["train"])
