"""docs/api-reference.md is generated from the models and says what the API server enforces."""

from __future__ import annotations

import subprocess
import sys

from kubelora.api import docgen
from tests.api.helpers import DOCS, REPO


def test_reference_is_current():
    result = subprocess.run(
        [sys.executable, "-m", "kubelora.api.docgen", "--out", str(DOCS), "--check"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, f"docs/api-reference.md is stale; run `make crds`:\n{result.stdout}"


def test_stdout_form_matches_the_file():
    out = subprocess.run(
        [sys.executable, "-m", "kubelora.api.docgen"], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout == DOCS.read_text()


def test_reference_documents_every_type_once_with_rules_and_defaults():
    text = docgen.generate()
    sections = [line[4:] for line in text.splitlines() if line.startswith("### ")]
    assert len(sections) == len(set(sections))
    for name in ("LoRAJobSpec", "TrainingConfig", "EvalSpec", "Gate", "LoRAJobStatus", "AdapterDeploymentSpec"):
        assert name in sections
    assert "spec.training: epochs and maxSteps are mutually exclusive" in text
    assert "When both epochs and maxSteps are unset, the trainer runs epochs=1" in text
    assert "| `rank` | integer | `16` |" in text
    assert "| `lora` | [LoRAConfig](#loraconfig) | `{}` |" in text
    assert "**Immutable.**" in text
