"""`make demo`, the README's main command, runs to a completion served by the adapter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from kubelora.serving import vllm
from kubelora.trainer import tiny
from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.trainer]


def test_demo_ends_with_a_completion_from_the_adapter(devenv, kubectl):
    env = {**os.environ, "COLUMNS": "200"}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "kubelora.demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
        )
        jobs = json.loads(kubectl("get", "jobs", "-n", "kubelora-demo", "-o", "json").stdout)["items"]
        pods = json.loads(kubectl("get", "pods", "-n", "kubelora-demo", "-o", "json").stdout)["items"]
    finally:
        # The demo leaves its objects for people to explore; tests after this one need none of them.
        kubectl("delete", "namespace", "kubelora-demo", "--wait=false", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    # Both LoRAJobs trained through Jobs whose pods ran the trainer image and exited 0 for real.
    owners = sorted(
        ref["name"] for j in jobs for ref in j["metadata"].get("ownerReferences", []) if ref.get("controller")
    )
    assert owners == ["support-tickets", "support-tickets-shuffled"], [j["metadata"]["name"] for j in jobs]
    for job in jobs:
        assert any(c["type"] == "Complete" and c["status"] == "True" for c in job["status"]["conditions"]), job
    trainer_pods = [p for p in pods if p["metadata"].get("labels", {}).get("kubelora.dev/lorajob")]
    assert len(trainer_pods) == 2
    for pod in trainer_pods:
        (container,) = pod["status"]["containerStatuses"]
        assert container["image"].startswith("ghcr.io/kubelora/trainer:")
        assert container["state"]["terminated"]["exitCode"] == 0
    assert "AdapterDeployment support-tickets: Ready 3/3" in output
    # The canary's smoke check compared real vLLM's answers with the trainer's eval predictions.
    assert re.search(r"Smoke check against real vLLM: Smoke check on \S+: (\d+)/\1 answers matched", output), output[
        -4000:
    ]
    assert "AdapterDeployment support-tickets-shuffled: Refused" in output
    # The completion came from real vLLM (its CPU build, the pinned version), which names itself.
    assert f"Served by:   vllm-{vllm.VLLM_VERSION}-" in output, output[-3000:]
    served = next(line for line in output.splitlines() if line.startswith("Served completion:"))
    answer = served.split("'")[1]
    # The random tiny base answers with arbitrary words; the adapter answers with a label.
    assert answer in tiny.LABELS, served
