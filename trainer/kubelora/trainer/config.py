"""Step 1, config: read a LoRAJob manifest or a bare spec (YAML or JSON) and resolve defaults."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubelora.api.v1alpha1 import LoRAJobSpec
from kubelora.trainer.errors import InvalidSpecError, RankTooLargeError

#: Largest LoRA rank the trainer accepts; ``KUBELORA_MAX_LORA_RANK`` lowers it (e.g. to the serving limit).
DEFAULT_MAX_RANK = 512


@dataclasses.dataclass
class TrainerConfig:
    """The spec plus everything the trainer derived from it and from its environment."""

    spec: LoRAJobSpec
    job_name: str | None
    namespace: str | None
    epochs: float | None
    max_steps: int | None
    max_rank: int
    workdir: Path
    report_file: Path | None = None
    #: Set by the CLI once the world size and strategy are known; None: one process.
    layout: Layout | None = None

    @property
    def run_layout(self) -> Layout:
        """The layout, or one process with the spec's batch and accumulation."""
        if self.layout is not None:
            return self.layout
        return Layout("Single", 1, 1, self.spec.training.batch_size, self.spec.training.gradient_accumulation)

    @property
    def output_uri(self) -> str:
        return self.spec.output.uri

    def hyperparameters(self) -> dict[str, Any]:
        """What the manifest records about how the adapter was trained."""
        lora = self.spec.lora
        tr = self.spec.training
        return {
            "method": self.spec.method,
            "rank": lora.rank,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "targetModules": list(lora.target_modules),
            "rsLoRA": lora.rs_lora,
            "useDoRA": self.spec.method == "dora",
            "epochs": self.epochs,
            "maxSteps": self.max_steps,
            "learningRate": tr.learning_rate,
            "batchSize": tr.batch_size,
            "gradientAccumulation": tr.gradient_accumulation,
            "maxSeqLength": tr.max_seq_length,
            "packing": tr.packing,
            "gradientCheckpointing": tr.gradient_checkpointing,
            "warmupRatio": tr.warmup_ratio,
            "seed": tr.seed,
        }


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a run is spread over processes, and its batch: ``world_size`` processes (``nodes`` pods of
    ``processes_per_node``) each see ``per_device_batch`` rows per micro-batch and accumulate
    ``gradient_accumulation`` micro-batches per optimizer step, so every step sees ``global_batch_size`` rows."""

    strategy: str
    nodes: int
    processes_per_node: int
    per_device_batch: int
    gradient_accumulation: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.per_device_batch * self.gradient_accumulation

    def to_dict(self) -> dict[str, Any]:
        """The ``training`` block of progress and result events and of the manifest (status.training)."""
        return {
            "strategy": self.strategy,
            "nodes": self.nodes,
            "processesPerNode": self.processes_per_node,
            "worldSize": self.world_size,
            "globalBatchSize": self.global_batch_size,
        }


def spec_global_batch(spec: LoRAJobSpec) -> int:
    """The spec's global batch: ``batchSize`` rows per micro-batch times ``gradientAccumulation`` micro-batches
    per optimizer step, counted over every process. It does not depend on how many processes run."""
    return spec.training.batch_size * spec.training.gradient_accumulation


def layout(spec: LoRAJobSpec, *, nodes: int, processes_per_node: int, strategy: str | None = None) -> Layout:
    """The run's layout for this world size: each process keeps ``batchSize`` and accumulates
    ``gradientAccumulation / worldSize`` micro-batches, so the global batch is the spec's at any world size (a
    resumed run on another world size keeps it). Refused when the world size does not divide
    ``gradientAccumulation``."""
    nodes, per_node = max(1, nodes), max(1, processes_per_node)
    world = nodes * per_node
    tr = spec.training
    if tr.gradient_accumulation % world:
        global_batch = spec_global_batch(spec)
        raise InvalidSpecError(
            f"spec.training.gradientAccumulation ({tr.gradient_accumulation}) must be a multiple of the world size "
            f"({world} processes: spec.resources.nodes {nodes} x {per_node} per node) to keep the global batch of "
            f"{global_batch} (spec.training.batchSize {tr.batch_size} x gradientAccumulation "
            f"{tr.gradient_accumulation}) with batchSize {tr.batch_size} per process; set gradientAccumulation to a "
            f"multiple of {world}"
        )
    if strategy is None:
        strategy = "Single" if world == 1 else "DDP"
    elif world == 1:
        strategy = "Single"
    return Layout(
        strategy=strategy,
        nodes=nodes,
        processes_per_node=per_node,
        per_device_batch=tr.batch_size,
        gradient_accumulation=tr.gradient_accumulation // world,
    )


def read_document(path: Path) -> dict[str, Any]:
    """Parse a YAML or JSON file (JSON is YAML) into a mapping."""
    try:
        text = path.read_text()
    except OSError as e:
        raise InvalidSpecError(f"Cannot read spec file {path}: {e.strerror or e}") from e
    try:
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise InvalidSpecError(f"{path}: not valid YAML or JSON: {e}") from e
    if not isinstance(doc, dict):
        raise InvalidSpecError(f"{path}: expected a LoRAJob manifest or a spec mapping, got {type(doc).__name__}")
    return doc


def _format_validation_error(err: ValidationError) -> str:
    """The API's messages: rule violations as written, field errors as ``spec.<path>: <problem>``."""
    parts = []
    for item in err.errors(include_url=False):
        if item["type"] == "kubelora_rule":
            parts.append(str(item["msg"]))
            continue
        loc = "spec"
        for p in item.get("loc", ()):
            loc += f"[{p}]" if isinstance(p, int) else f".{p}"
        parts.append(f"{loc}: {item.get('msg')}")
    more = len(parts) - 5
    return "; ".join(parts[:5]) + (f" (and {more} more)" if more > 0 else "")


def parse_spec(doc: dict[str, Any]) -> tuple[LoRAJobSpec, str | None, str | None]:
    """Accept a whole ``LoRAJob`` object (``kind``/``spec``) or a bare spec."""
    name = namespace = None
    if "spec" in doc and ("kind" in doc or "metadata" in doc or "apiVersion" in doc):
        kind = doc.get("kind", "LoRAJob")
        if kind != "LoRAJob":
            raise InvalidSpecError(f"Expected kind LoRAJob, got {kind}")
        meta = doc.get("metadata") or {}
        name, namespace = meta.get("name"), meta.get("namespace")
        body = doc["spec"]
    else:
        body = doc
    if not isinstance(body, dict):
        raise InvalidSpecError("spec must be a mapping")
    try:
        spec = LoRAJobSpec.model_validate(body)
    except ValidationError as e:
        raise InvalidSpecError(_format_validation_error(e)) from e
    return spec, name, namespace


def max_rank_limit() -> int:
    raw = os.environ.get("KUBELORA_MAX_LORA_RANK")
    if not raw:
        return DEFAULT_MAX_RANK
    try:
        return max(1, int(raw))
    except ValueError as e:
        raise InvalidSpecError(f"KUBELORA_MAX_LORA_RANK must be an integer, got {raw!r}") from e


def validate(spec: LoRAJobSpec, max_rank: int) -> None:
    """Checks beyond the API's own rules (which parsing applied); the rest need the base model's config."""
    if spec.lora.rank > max_rank:
        raise RankTooLargeError(f"spec.lora.rank: {spec.lora.rank} is above the limit of {max_rank}")


def load(spec_file: Path, *, workdir: Path, report_file: Path | None = None) -> TrainerConfig:
    spec, name, namespace = parse_spec(read_document(spec_file))
    limit = max_rank_limit()
    validate(spec, limit)
    epochs, max_steps = spec.training.epochs, spec.training.max_steps
    if epochs is None and max_steps is None:
        epochs = 1.0
    return TrainerConfig(
        spec=spec,
        job_name=name,
        namespace=namespace,
        epochs=epochs,
        max_steps=max_steps,
        max_rank=limit,
        workdir=workdir,
        report_file=report_file,
    )
