"""The one vLLM pin, and how vLLM's refusals are read (messages as vLLM 0.32.0's CPU build sends them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubelora.api.v1alpha1 import ManagedServer
from kubelora.devenv import images
from kubelora.operator.config import OperatorConfig
from kubelora.serving import vllm

REPO = Path(__file__).resolve().parents[2]


def test_every_default_follows_the_one_pin():
    assert f"vllm/vllm-openai:v{vllm.VLLM_VERSION}" == vllm.VLLM_IMAGE
    assert OperatorConfig().vllm_image == vllm.VLLM_IMAGE
    values = yaml.safe_load((REPO / "helm/kubelora/values.yaml").read_text())["vllm"]["image"]
    assert f"{values['repository']}:{values['tag']}" == vllm.VLLM_IMAGE
    assert ManagedServer.model_fields["image"].default is None  # unset: the operator's vllmImage
    assert images.build_args("", "vllm-cpu")["VLLM_VERSION"] == vllm.VLLM_VERSION
    assert images.image_ref("vllm-cpu").endswith(f":{vllm.VLLM_VERSION}")
    requirements = (REPO / "images/vllm-cpu/requirements.txt").read_text().splitlines()
    assert "torch==2.13.0" in requirements  # what vllm-cpu 0.32.0 is built against
    assert not [r for r in requirements if r.lower().startswith(("vllm", "-"))]
    for path in ("crds/adapterdeployments.kubelora.dev.yaml", "docs/api-reference.md", "docs/serving.md"):
        assert "vllm-openai:latest" not in (REPO / path).read_text(), path


DORA = (
    "Call to add_lora method failed: Worker failed with error 'vLLM does not yet support DoRA.', please check the "
    "stack trace above for the root cause"
)
RANK = (
    "Call to add_lora method failed: Worker failed with error 'LoRA rank 32 is greater than max_lora_rank 16.', "
    "please check the stack trace above for the root cause"
)


@pytest.mark.parametrize(
    ("status", "message", "reason"),
    [
        (500, DORA, "vLLM does not yet support DoRA."),
        (500, RANK, "LoRA rank 32 is greater than max_lora_rank 16."),
        (400, "No adapter found for /adapters/x", "No adapter found for /adapters/x"),
        (400, "The lora adapter 'a' has already been loaded.", None),
        (500, "EngineCore encountered an issue", None),  # the server's trouble, not the adapter's: retried
        (503, "Service Unavailable", None),
        (200, "Success", None),
    ],
)
def test_load_refusal(status, message, reason):
    assert vllm.load_refusal(status, message) == reason
