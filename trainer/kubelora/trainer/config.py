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
from kubelora.trainer.errors import InvalidSpec, RankTooLarge

#: Largest LoRA rank the trainer accepts; ``KUBELORA_MAX_LORA_RANK`` lowers it (e.g. to the serving limit).
DEFAULT_MAX_RANK = 512
GENERATION_METRICS = frozenset({"exact_match", "f1", "accuracy", "json_valid", "json_match"})


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


def read_document(path: Path) -> dict[str, Any]:
    """Parse a YAML or JSON file (JSON is YAML) into a mapping."""
    try:
        text = path.read_text()
    except OSError as e:
        raise InvalidSpec(f"Cannot read spec file {path}: {e.strerror or e}") from e
    try:
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise InvalidSpec(f"{path}: not valid YAML or JSON: {e}") from e
    if not isinstance(doc, dict):
        raise InvalidSpec(f"{path}: expected a LoRAJob manifest or a spec mapping, got {type(doc).__name__}")
    return doc


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for item in err.errors()[:5]:
        loc = ".".join(str(p) for p in item.get("loc", ())) or "spec"
        parts.append(f"spec.{loc}: {item.get('msg')}")
    more = len(err.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_spec(doc: dict[str, Any]) -> tuple[LoRAJobSpec, str | None, str | None]:
    """Accept a whole ``LoRAJob`` object (``kind``/``spec``) or a bare spec."""
    name = namespace = None
    if "spec" in doc and ("kind" in doc or "metadata" in doc or "apiVersion" in doc):
        kind = doc.get("kind", "LoRAJob")
        if kind != "LoRAJob":
            raise InvalidSpec(f"Expected kind LoRAJob, got {kind}")
        meta = doc.get("metadata") or {}
        name, namespace = meta.get("name"), meta.get("namespace")
        body = doc["spec"]
    else:
        body = doc
    if not isinstance(body, dict):
        raise InvalidSpec("spec must be a mapping")
    try:
        spec = LoRAJobSpec.model_validate(body)
    except ValidationError as e:
        raise InvalidSpec(_format_validation_error(e)) from e
    return spec, name, namespace


def max_rank_limit() -> int:
    raw = os.environ.get("KUBELORA_MAX_LORA_RANK")
    if not raw:
        return DEFAULT_MAX_RANK
    try:
        return max(1, int(raw))
    except ValueError as e:
        raise InvalidSpec(f"KUBELORA_MAX_LORA_RANK must be an integer, got {raw!r}") from e


def validate(spec: LoRAJobSpec, max_rank: int) -> None:
    """Checks that need no model: everything else is checked once the base config is fetched."""
    if spec.lora.rank > max_rank:
        raise RankTooLarge(f"LoRA rank {spec.lora.rank} is above the limit of {max_rank}")
    if not spec.lora.target_modules:
        raise InvalidSpec("spec.lora.targetModules must name at least one module, or all-linear")
    if "all-linear" in spec.lora.target_modules and len(spec.lora.target_modules) > 1:
        raise InvalidSpec("spec.lora.targetModules: all-linear cannot be combined with module names")
    ev = spec.eval
    if ev is not None:
        gen = GENERATION_METRICS.intersection(ev.metrics)
        if gen and spec.dataset.format == "completion":
            raise InvalidSpec(
                f"spec.eval.metrics {sorted(gen)} need prompts and answers, "
                "but dataset.format completion has only text: use loss or perplexity"
            )
        for gate in ev.gates:
            if gate.min is None and gate.max is None and gate.min_improvement_over_base is None:
                raise InvalidSpec(f"spec.eval.gates: the {gate.metric} gate sets none of min, max, minImprovementOverBase")
            if gate.metric not in ev.metrics:
                raise InvalidSpec(f"spec.eval.gates: metric {gate.metric} is not in spec.eval.metrics")
        if ev.labels is not None and len(set(ev.labels)) != len(ev.labels):
            raise InvalidSpec("spec.eval.labels has duplicates")


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
