"""Checks made once the base model's config.json is here, before any weights are fetched.

Unknown target modules, QLoRA without a working bitsandbytes and a memory estimate beyond the
GPU's memory all fail here. ``KUBELORA_GPU_MEMORY_BYTES`` overrides the device memory (also on a
CPU-only machine, where the check is otherwise skipped).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubelora.trainer import estimate as est_mod
from kubelora.trainer.config import TrainerConfig
from kubelora.trainer.errors import InsufficientGPUMemoryError, InvalidSpecError
from kubelora.trainer.modeling import Runtime, check_bitsandbytes, meta_linear_layers
from kubelora.trainer.report import kv

log = logging.getLogger(__name__)


def device_memory(rt: Runtime) -> int | None:
    raw = os.environ.get("KUBELORA_GPU_MEMORY_BYTES")
    if raw:
        try:
            return int(float(raw))
        except ValueError as e:
            raise InvalidSpecError(f"KUBELORA_GPU_MEMORY_BYTES must be a number, got {raw!r}") from e
    if rt.device == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)
    return None


def model_layers(base_config: dict[str, Any], config_dir: Path, trust_remote_code: bool) -> list[est_mod.LinearShape]:
    """Linear layers from the estimator's table, or from a meta-device model for other architectures."""
    try:
        return est_mod.linear_layers(base_config)
    except est_mod.UnsupportedArchitectureError:
        return meta_linear_layers(config_dir, trust_remote_code)


def estimate(
    cfg: TrainerConfig,
    base_config: dict[str, Any],
    layers: list[est_mod.LinearShape],
    rt: Runtime,
    train_tokens: int | None = None,
    train_examples: int | None = None,
) -> est_mod.Estimate:
    return est_mod.estimate_for_spec(
        base_config,
        cfg.spec,
        train_tokens=train_tokens,
        train_examples=train_examples,
        gpu_memory=device_memory(rt),
        precision=rt.precision_name,
        layers=layers,
    )


def check(
    cfg: TrainerConfig,
    base_config: dict[str, Any],
    config_dir: Path,
    rt: Runtime,
    on_estimate: Callable[[est_mod.Estimate], None] | None = None,
) -> tuple[est_mod.Estimate, list[est_mod.LinearShape]]:
    """Raise on a spec that cannot run; ``on_estimate`` sees the estimate before any verdict on it."""
    layers = model_layers(base_config, config_dir, cfg.spec.base_model.trust_remote_code)
    est = estimate(cfg, base_config, layers, rt)  # raises UnknownTargetModulesError
    if on_estimate is not None:
        on_estimate(est)
    if cfg.spec.method == "qlora":
        check_bitsandbytes(rt.device)
    if est.gpu_memory_bytes is not None and est.total_memory_bytes > est.gpu_memory_bytes:
        parts = ", ".join(f"{k} {v / est_mod.GIB:.2f}" for k, v in est.memory_bytes.items() if k != "total")
        raise InsufficientGPUMemoryError(
            f"estimated {est.total_memory_bytes / est_mod.GIB:.2f} GiB ({parts} GiB) exceeds the device's "
            f"{est.gpu_memory_bytes / est_mod.GIB:.2f} GiB; lower batchSize or maxSeqLength, enable "
            "gradientCheckpointing, or use qlora"
        )
    log.info(
        kv(
            "Preflight passed",
            modelType=est.model_type,
            trainableParameters=est.trainable_parameters,
            memoryGiB=round(est.total_memory_bytes / est_mod.GIB, 3),
        )
    )
    return est, layers
