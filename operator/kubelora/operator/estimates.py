"""Size a LoRAJob before it runs, from nothing but the base model's config.json.

Shared by the operator's preflight check (which reads config.json itself, from s3:// only, with the tenant's
credentials) and `kubelora estimate` (which runs on the user's machine and may read local paths). No torch is
imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from kubelora import storage
from kubelora.api.v1alpha1 import LoRAJobSpec
from kubelora.operator.config import OperatorConfig
from kubelora.trainer import estimate as estimator


def _local_path(uri: str) -> Path | None:
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if uri.startswith("pvc://"):
        root = Path(os.environ.get("KUBELORA_PVC_ROOT", "/mnt/pvc"))
        return root / uri.removeprefix("pvc://")
    return None


def read_model_config(uri: str, credentials: dict[str, str]) -> dict[str, Any] | None:
    """The base model's config.json, or None where it cannot be read without downloading the model."""
    local = _local_path(uri)
    if local is not None:
        return dict(json.loads((local / "config.json").read_text()))
    if uri.startswith("s3://"):
        location = storage.parse_s3(uri).child("config.json")
        data = storage.read_json(storage.client_from_env(credentials, timeouts=storage.QUICK_TIMEOUTS), location)
        if data is None:
            raise ValueError(f"spec.baseModel.uri: {location} does not exist")
        return dict(data)
    return None  # hf:// needs the hub; the trainer reports its own estimate at run time


def estimate_spec(
    spec: LoRAJobSpec, model_config: dict[str, Any], config: OperatorConfig | None = None
) -> dict[str, Any]:
    config = config or OperatorConfig()
    result = estimator.estimate_for_spec(model_config, spec).to_dict()
    gpu_hours = result.get("gpuHours")
    price = config.price_per_hour(spec.resources.gpu_type)
    result["pricePerGpuHour"] = price
    result["costEstimate"] = None if gpu_hours is None else f"{gpu_hours * price:.2f} USD"
    return result


def estimate_manifest(manifest: Path, model_config_path: Path | None = None) -> dict[str, Any]:
    try:
        document = yaml.safe_load(manifest.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{manifest}: not YAML: {exc}") from exc
    if not isinstance(document, dict) or "spec" not in document:
        raise ValueError(f"{manifest}: expected a LoRAJob manifest with a spec")
    try:
        spec = LoRAJobSpec.model_validate(document["spec"])
    except Exception as exc:
        raise ValueError(f"{manifest}: {exc}") from exc
    if model_config_path is not None:
        model_config = json.loads(model_config_path.read_text())
    else:
        found = read_model_config(spec.base_model.uri, dict(os.environ))
        if found is None:
            raise ValueError(
                f"spec.baseModel.uri: cannot read config.json from {spec.base_model.uri}; pass --model-config"
            )
        model_config = found
    return estimate_spec(spec, model_config)


def refusal(result: dict[str, Any]) -> str | None:
    """Why the estimated run does not fit its GPUs (the trainer and the operator's preflight refuse it), or None."""
    if result.get("fits") is not False:
        return None
    need, have = result["totalBytesPerGpu"] / 2**30, (result.get("gpuMemoryBytes") or 0) / 2**30
    world = int(result.get("worldSize") or 1)
    message = (
        f"Refused: estimated {need:.1f} GiB per GPU with {result.get('strategy')} exceeds the {have:.1f} GiB of "
        f"{world} x {result.get('gpuType') or 'GPU'}"
    )
    if result.get("strategy") != "FSDP":
        message += "; more GPUs (spec.resources.gpus, spec.resources.nodes) let FSDP shard the model"
    return message


def render_estimate(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title="LoRAJob estimate", show_header=False)
    summary.add_row("Model type", str(result["modelType"]))
    summary.add_row("Method", f"{result['method']} (weights in {result['weightPrecision']})")
    summary.add_row("Parameters", f"{result['totalParameters']:,}")
    summary.add_row("Trainable parameters", f"{result['trainableParameters']:,} ({result['trainablePercent']}%)")
    summary.add_row("Target modules", ", ".join(result["targetModules"]))
    gpu_hours = result.get("gpuHours")
    summary.add_row("GPU-hours", "unknown (give maxSteps)" if gpu_hours is None else f"{gpu_hours:.2f}")
    summary.add_row("Cost", str(result.get("costEstimate") or "unknown"))
    summary.add_row(
        "Strategy",
        f"{result.get('strategy', 'Single')} over {result.get('worldSize', 1)} GPU(s) on {result.get('nodes', 1)} "
        f"node(s), global batch {result.get('globalBatchSize')}",
    )
    fits = result.get("fits")
    summary.add_row("Fits the GPU", "unknown GPU" if fits is None else ("yes" if fits else "NO"))
    console.print(summary)
    memory = Table(title=f"Memory per GPU ({result.get('strategy', 'Single')})")
    memory.add_column("Component")
    memory.add_column("GiB", justify="right")
    for component, size in result["memoryBytes"].items():
        memory.add_row(component, f"{size / 2**30:.2f}")
    memory.add_row("total per GPU", f"{result['totalBytesPerGpu'] / 2**30:.2f}")
    console.print(memory)
