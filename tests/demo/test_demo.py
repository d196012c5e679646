"""`make demo`, the README's main command, runs to a completion served by the adapter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kubelora.trainer import tiny
from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.trainer]


def test_demo_ends_with_a_completion_from_the_adapter(devenv, kubectl):
    env = {**os.environ, "COLUMNS": "200"}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "kubelora.demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
        )
    finally:
        # The demo leaves its objects for people to explore; tests after this one need none of them.
        kubectl("delete", "namespace", "kubelora-demo", "--wait=false", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "AdapterDeployment support-tickets: Ready 3/3" in output
    assert "AdapterDeployment support-tickets-shuffled: Refused" in output
    served = next(line for line in output.splitlines() if line.startswith("Served completion:"))
    answer = served.split("'")[1]
    # The random tiny base answers with arbitrary words; the adapter answers with a label.
    assert answer in tiny.LABELS, served
