"""The operator's own configuration, read from a YAML file (the Helm chart's ConfigMap)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubelora.serving.vllm import VLLM_IMAGE

# On-demand list prices, USD per GPU-hour; platform teams override them in the chart's values.
DEFAULT_GPU_PRICES = {
    "NVIDIA-A100-SXM4-80GB": 3.67,
    "NVIDIA-A100-SXM4-40GB": 3.06,
    "NVIDIA-H100-80GB-HBM3": 6.98,
    "NVIDIA-L4": 0.81,
    "NVIDIA-A10G": 1.01,
    "Tesla-T4": 0.53,
}


class OperatorConfig(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    trainer_image: str = "ghcr.io/kubelora/trainer:0.1.0"
    gpu_prices_per_hour: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_GPU_PRICES))
    default_gpu_price_per_hour: float = 2.0
    default_s3_endpoint: str | None = None
    s3_secure: bool = False
    progress_interval_seconds: float = Field(default=5.0, gt=0)
    executor: Literal["job", "local"] = "job"
    local_workdir: Path = Path("/tmp/kubelora-local")
    shm_size_per_gpu: str = "16Gi"
    trainer_uid: int = 65532  # the trainer image's user (images/Dockerfile.trainer)
    agent_image: str = "ghcr.io/kubelora/agent:0.1.0"
    # Managed vLLM servers' image when an AdapterDeployment names none: one pinned version fleet-wide.
    vllm_image: str = VLLM_IMAGE
    # Namespaces whose AdapterDeployments may read adapters with the operator's own S3 keys when they name no
    # Secret. Off by default: elsewhere no Secret means an anonymous read, never the operator's keys.
    operator_credentials_namespaces: list[str] = Field(default_factory=list)
    # Pull Secrets (names, in each tenant namespace) for the trainer Jobs and managed vLLM pods.
    image_pull_secrets: list[str] = Field(default_factory=list)
    # Managed vLLM servers: the agent's adapter directory (an emptyDir) and vLLM's memory-backed /dev/shm.
    adapter_cache_size_limit: str = "10Gi"
    vllm_shm_size: str = "4Gi"
    # Where the operator's own pods run and their labels (the chart fills both): a managed server's NetworkPolicy
    # admits its agent port only from them. Unset (the operator runs outside the cluster): no NetworkPolicy.
    operator_namespace: str | None = None
    operator_pod_labels: dict[str, str] = Field(default_factory=dict)
    # The LoRAJob controller: a per-LoRAJob work queue fed by watches (docs/concepts.md).
    # Every LoRAJob is looked at again at least this often, a safety net for a missed watch event.
    resync_seconds: float = Field(default=300.0, gt=0)
    # One reconcile of one LoRAJob (preflight, starting its Job, reading its report) never takes longer.
    reconcile_timeout_seconds: float = Field(default=60.0, gt=0)
    # The operator's own S3 reads (preflight, the trainer's report): a tenant's dead endpoint costs this much.
    s3_connect_timeout_seconds: float = Field(default=3.0, gt=0)
    s3_read_timeout_seconds: float = Field(default=15.0, gt=0)
    # Finished trainer Jobs (and their pods) are deleted this long after they finish; the LoRAJob keeps its status.
    # None keeps them until their LoRAJob is deleted.
    job_ttl_seconds_after_finished: int | None = Field(default=3600, ge=0)

    def price_per_hour(self, gpu_type: str | None) -> float:
        if gpu_type and gpu_type in self.gpu_prices_per_hour:
            return self.gpu_prices_per_hour[gpu_type]
        return self.default_gpu_price_per_hour

    @classmethod
    def load(cls, path: Path | None) -> OperatorConfig:
        if path is None:
            return cls()
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"Cannot read operator config {path}: {exc}") from exc
        return cls.model_validate(data)
