"""Shared by the API tests: the example manifests and their `# expect:` headers."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CRDS = REPO / "crds"
DOCS = REPO / "docs" / "api-reference.md"


@dataclasses.dataclass(frozen=True)
class Example:
    path: Path
    body: dict[str, Any]
    expect: str | None = None  # substring of the API server's error
    expect_offline: str | None = None  # substring of the Python validator's error, when it words it differently

    @property
    def id(self) -> str:
        return self.path.stem

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def offline_message(self) -> str | None:
        return self.expect_offline or self.expect


def load_example(path: Path) -> Example:
    text = path.read_text()
    headers: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line.lstrip("# ").partition(":")
        if sep and key in ("expect", "expect-offline"):
            headers[key] = value.strip()
    return Example(path, yaml.safe_load(text), headers.get("expect"), headers.get("expect-offline"))


def valid_examples() -> list[Example]:
    return [load_example(p) for p in sorted(EXAMPLES.glob("*.yaml"))]


def invalid_examples() -> list[Example]:
    return [load_example(p) for p in sorted((EXAMPLES / "invalid").glob("*.yaml"))]
