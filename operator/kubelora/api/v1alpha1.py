"""The kubelora.dev/v1alpha1 API: LoRAJob and AdapterDeployment.

These pydantic models are the one definition of the API. ``make crds`` generates
``crds/*.yaml`` (and ``docs/api-reference.md``) from them; the operator and the trainer read specs
through them. Field names are camelCase on the wire (aliases) and snake_case in Python.

Validation rules live next to the fields they guard (``cel_rules`` and ``immutable(...)``). Each rule
is both a CEL expression the API server evaluates and a Python check, so :func:`validate_lorajob`,
:func:`validate_adapterdeployment` and :func:`validate_lorajob_update` reject what ``kubectl apply``
rejects, with the same message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    WithJsonSchema,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from kubelora.api.cel import IMMUTABLE_KEY, VALIDATIONS_KEY, Rule, immutable, presence_fixed
from kubelora.serving.vllm import VLLM_IMAGE

__all__ = [
    "ALWAYS_COMPUTED_METRICS",
    "API_VERSION",
    "GROUP",
    "VERSION",
    "AdapterArtifact",
    "AdapterDeployment",
    "AdapterDeploymentPhase",
    "AdapterDeploymentSpec",
    "AdapterDeploymentStatus",
    "AdapterSource",
    "BaseModelSource",
    "Condition",
    "DatasetFormat",
    "DatasetSource",
    "EvalResults",
    "EvalSpec",
    "Gate",
    "GatePolicy",
    "GateVerdict",
    "InvalidObjectError",
    "LoRAConfig",
    "LoRAJob",
    "LoRAJobPhase",
    "LoRAJobSpec",
    "LoRAJobStatus",
    "ManagedServer",
    "Method",
    "Metric",
    "Model",
    "ObjectMeta",
    "OutputTarget",
    "RegressionCheck",
    "ReplicaState",
    "Resources",
    "RolloutStep",
    "RolloutStrategy",
    "SecretRef",
    "ServingTarget",
    "StorageUri",
    "Toleration",
    "TrainingConfig",
    "TrainingProgress",
    "dump",
    "immutable_fields",
    "short_digest",
    "validate_adapterdeployment",
    "validate_lorajob",
    "validate_lorajob_update",
]

GROUP = "kubelora.dev"
VERSION = "v1alpha1"
API_VERSION: Literal["kubelora.dev/v1alpha1"] = "kubelora.dev/v1alpha1"

Metric = Literal["exact_match", "f1", "accuracy", "json_valid", "json_match", "loss", "perplexity"]
#: Metrics every evaluation computes, whether or not ``eval.metrics`` lists them.
ALWAYS_COMPUTED_METRICS: tuple[Metric, ...] = ("loss", "perplexity")
Method = Literal["lora", "qlora", "dora"]
DatasetFormat = Literal["chat", "instruction", "completion"]
LoRAJobPhase = Literal["Pending", "Queued", "Training", "Evaluating", "Succeeded", "Failed"]
AdapterDeploymentPhase = Literal[
    "Pending", "Refused", "Loading", "Canary", "Promoting", "Ready", "RolledBack", "Failed"
]

_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)

StorageUri = Annotated[str, Field(pattern=r"^(s3|pvc|hf|file)://.+", max_length=2048)]
# What an AdapterDeployment may name: the operator reads it itself, and never reads pods' paths (file://, pvc://).
S3Uri = Annotated[str, Field(pattern=r"^s3://.+", max_length=2048)]
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN)]
Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$", max_length=71)]


def _quantity_to_str(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


#: A Kubernetes resource quantity ("8", "500m", "64Gi"). YAML may give a number; Python always sees a string.
Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    Field(pattern=_QUANTITY, max_length=64),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": _QUANTITY,
            "x-kubernetes-int-or-string": True,
        }
    ),
]

_T = TypeVar("_T")


def _unique(values: list[_T]) -> list[_T]:
    seen: list[_T] = []
    for value in values:
        if value in seen:
            raise PydanticCustomError("duplicate", "Duplicate value: {value}", {"value": repr(value)})
        seen.append(value)
    return values


_SET = {"x-kubernetes-list-type": "set"}


def _model_schema_extra(schema: dict[str, Any], cls: type[Any]) -> None:
    rules: tuple[Rule, ...] = cls.__dict__.get("cel_rules", ())
    if rules:
        schema[VALIDATIONS_KEY] = [rule.to_openapi() for rule in rules]


class Model(BaseModel):
    """Base for API objects: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        json_schema_extra=_model_schema_extra,
    )

    #: Rules on this object (``self`` in CEL is an instance of the class). Emitted as x-kubernetes-validations.
    cel_rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rules(self) -> Self:
        broken = [rule.message for rule in type(self).cel_rules if not rule.transition and not rule.check(self)]
        if broken:
            raise PydanticCustomError("kubelora_rule", "{message}", {"message": "; ".join(broken)})
        return self


def _with_derived(model: BaseModel, data: dict[str, Any], info: SerializationInfo, **values: Any) -> dict[str, Any]:
    """Set derived fields (shown in printer columns) on serialisation, so they never go stale."""
    for name, value in values.items():
        if value is None:
            continue
        alias = type(model).model_fields[name].alias
        data[alias if info.by_alias and alias else name] = value
    return data


def short_digest(digest: str | None) -> str | None:
    """The first 12 hex digits of a ``sha256:<hex>`` digest, as shown by ``kubectl get``."""
    if not digest:
        return None
    return digest.split(":", 1)[-1][:12]


# --------------------------------------------------------------------------------------------------------------------
# LoRAJob spec


class SecretRef(Model):
    """A reference to a Secret in the object's own namespace."""

    name: ObjectName = Field(description="Name of a Secret in the object's own namespace")


class SecretKeyRef(Model):
    """A key of a Secret in the object's own namespace."""

    name: ObjectName = Field(description="Name of a Secret in the object's own namespace")
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")] = Field(
        default="apiKey", description="The key in the Secret"
    )


class TokenSecretKeyRef(Model):
    """A key of a Secret in the object's own namespace that holds a bearer token."""

    name: ObjectName = Field(description="Name of a Secret in the object's own namespace")
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")] = Field(
        default="token", description="The key in the Secret"
    )


class BaseModelSource(Model):
    """The pretrained model the adapter is trained on."""

    uri: StorageUri = Field(
        description="Where the base model is read from: s3://bucket/prefix/, pvc://claim/path or hf://org/name"
    )
    revision: Annotated[str, Field(min_length=1, max_length=255)] | None = Field(
        default=None, description="Branch, tag or commit for hf:// models"
    )
    secret_ref: SecretRef | None = Field(default=None, description="S3 credentials: keys accessKey and secretKey")
    trust_remote_code: bool = Field(default=False, description="Allow the model's own Python code to run")


class DatasetSource(Model):
    """Training and validation data."""

    train: StorageUri = Field(description="Training rows (JSON Lines)")
    validation: StorageUri | None = Field(
        default=None, description="Validation rows; when unset, validationSplit of the training rows is held out"
    )
    validation_split: Annotated[float, Field(gt=0, lt=0.5)] = Field(
        default=0.05, description="Fraction of the training rows held out for validation when validation is unset"
    )
    format: DatasetFormat = Field(default="chat", description="Row layout: chat, instruction or completion")
    secret_ref: SecretRef | None = Field(default=None, description="S3 credentials: keys accessKey and secretKey")
    max_bad_rows: Annotated[int, Field(ge=0)] = Field(default=0, description="Malformed rows to skip before failing")


class LoRAConfig(Model):
    """Adapter shape."""

    cel_rules = (
        Rule(
            # The API server also checks `default: {}` against this rule, before nested defaults: hence has().
            cel="!has(self.targetModules) || !('all-linear' in self.targetModules) || size(self.targetModules) == 1",
            message="spec.lora.targetModules: all-linear cannot be combined with module names",
            check=lambda c: "all-linear" not in c.target_modules or len(c.target_modules) == 1,
            field_path=".targetModules",
        ),
    )

    rank: Annotated[int, Field(ge=1, le=512)] = Field(default=16, description="Rank r of the update matrices")
    alpha: Annotated[float, Field(gt=0)] = Field(
        default=32.0, description="Scaling numerator: updates are scaled by alpha/rank (alpha/sqrt(rank) with rsLoRA)"
    )
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(default=0.05, description="Dropout on the adapter input")
    target_modules: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128)]],
        AfterValidator(_unique),
        Field(min_length=1, max_length=64, json_schema_extra=_SET),
    ] = Field(
        default_factory=lambda: ["all-linear"],
        description="Module names to adapt (e.g. q_proj, v_proj), or all-linear for all linear layers but the head",
    )
    rs_lora: bool = Field(default=False, alias="rsLoRA", description="Rank-stabilised scaling (alpha/sqrt(rank))")


class TrainingConfig(Model):
    """Optimisation settings. When neither epochs nor maxSteps is set, the trainer runs one epoch."""

    cel_rules = (
        Rule(
            cel="!(has(self.epochs) && has(self.maxSteps))",
            message="spec.training: epochs and maxSteps are mutually exclusive",
            check=lambda t: t.epochs is None or t.max_steps is None,
        ),
    )

    epochs: Annotated[float, Field(gt=0, le=1000)] | None = Field(
        default=None,
        description="Passes over the training data; mutually exclusive with maxSteps. "
        "When both epochs and maxSteps are unset, the trainer runs epochs=1",
    )
    max_steps: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Optimizer steps to run; mutually exclusive with epochs"
    )
    learning_rate: Annotated[float, Field(gt=0, le=1)] = Field(default=2.0e-4, description="Peak learning rate")
    batch_size: Annotated[int, Field(ge=1, le=4096)] = Field(default=8, description="Rows per device per micro-batch")
    gradient_accumulation: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=1, description="Micro-batches per optimizer step"
    )
    max_seq_length: Annotated[int, Field(ge=16, le=1048576)] = Field(
        default=2048, description="Tokens per row; longer rows are truncated"
    )
    packing: bool = Field(default=False, description="Pack several short rows into one sequence")
    gradient_checkpointing: bool = Field(default=True, description="Trade compute for activation memory")
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.03, description="Fraction of the steps spent warming the learning rate up"
    )
    seed: Annotated[int, Field(ge=0)] = Field(default=42, description="Random seed for shuffling and initialisation")
    checkpoint_every_steps: Annotated[int, Field(ge=1)] = Field(
        default=100, description="Save a resumable checkpoint every this many steps"
    )


class Toleration(Model):
    """A pod toleration for the training pod (as in core/v1 Toleration)."""

    key: Annotated[str, Field(max_length=317)] | None = Field(default=None, description="Taint key; empty matches all")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Equal when unset")
    value: Annotated[str, Field(max_length=63)] | None = Field(default=None, description="Taint value for Equal")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect; empty matches all"
    )
    toleration_seconds: int | None = Field(default=None, description="NoExecute: how long the pod stays bound")


class Resources(Model):
    """What the training pod asks the scheduler for."""

    gpus: Annotated[int, Field(ge=0, le=64)] = Field(
        default=1, description="nvidia.com/gpu for the training pod; qlora needs at least 1"
    )
    gpu_type: Annotated[str, Field(max_length=128)] | None = Field(
        default=None, description="Value of the nvidia.com/gpu.product node label"
    )
    cpu: Quantity | None = Field(default=None, description="CPU request, e.g. 8 or 7500m")
    memory: Quantity | None = Field(default=None, description="Memory request, e.g. 64Gi")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="Training pod tolerations")
    priority_class_name: Annotated[str, Field(max_length=253)] | None = Field(
        default=None, description="PriorityClass of the training pod"
    )
    nodes: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1,
        description="Training pods (nodes), each with `gpus` GPUs. Above 1 the operator runs an Indexed Job and a "
        "headless Service, and the pods rendezvous through torchrun's c10d backend at pod 0",
    )


class OutputTarget(Model):
    """Where the trained adapter is published. Only deleteOnJobDeletion may change after creation."""

    cel_rules = (presence_fixed("secretRef", "secret_ref", "spec.output.secretRef"),)

    uri: StorageUri = Field(
        description="Destination prefix for the adapter files, e.g. s3://adapters/support/",
        json_schema_extra=immutable("spec.output.uri"),
    )
    secret_ref: SecretRef | None = Field(
        default=None,
        description="S3 credentials: keys accessKey and secretKey",
        json_schema_extra=immutable("spec.output.secretRef"),
    )
    merged_model: bool = Field(
        default=False,
        description="Also publish the base with the adapter merged in",
        json_schema_extra=immutable("spec.output.mergedModel"),
    )
    delete_on_job_deletion: bool = Field(
        default=False,
        description="When the LoRAJob is deleted, remove what it wrote under the output: its sha256/<hex>/ "
        "directory (kept while an AdapterDeployment serves or may roll back to it), its reports and checkpoints, "
        "and the pointer if it names this adapter; never other jobs' adapters or a bucket root. The one spec field "
        "that may change after creation: it is read only when the LoRAJob is deleted",
    )


class Gate(Model):
    """A pass/fail threshold on one metric. Set exactly one of min, max and minImprovementOverBase."""

    cel_rules = (
        Rule(
            cel="[has(self.min), has(self.max), has(self.minImprovementOverBase)].exists_one(x, x)",
            message="spec.eval.gates: each gate sets exactly one of min, max or minImprovementOverBase",
            check=lambda g: sum(v is not None for v in (g.min, g.max, g.min_improvement_over_base)) == 1,
        ),
    )

    metric: Metric = Field(description="Metric the gate reads; must be in eval.metrics unless it is loss or perplexity")
    min: float | None = Field(default=None, description="Pass when the adapter's value is at least this")
    max: float | None = Field(default=None, description="Pass when the adapter's value is at most this")
    min_improvement_over_base: float | None = Field(
        default=None,
        description="Pass when the adapter beats the base model by at least this much "
        "(absolute; for loss and perplexity a decrease is an improvement)",
    )


class RegressionCheck(Model):
    """General-ability check: the adapter must not lose much on data it was not trained for."""

    dataset: StorageUri = Field(description="Rows both the base model and the adapter are scored on")
    max_loss_increase: Annotated[float, Field(ge=0)] = Field(
        default=0.05, description="Largest allowed increase of the adapter's loss over the base model's"
    )


class EvalSpec(Model):
    """Evaluation after training; failing gates mark the job Failed and block deployment."""

    cel_rules = (
        Rule(
            cel="self.gates.all(g, g.metric in ['loss', 'perplexity'] || g.metric in self.metrics)",
            message="spec.eval.gates: a gate's metric must be listed in spec.eval.metrics "
            "(loss and perplexity are always available)",
            check=lambda e: all(g.metric in ALWAYS_COMPUTED_METRICS or g.metric in e.metrics for g in e.gates),
            field_path=".gates",
        ),
        Rule(
            cel="!('accuracy' in self.metrics) || has(self.labels)",
            message="spec.eval.labels: the accuracy metric needs labels",
            check=lambda e: "accuracy" not in e.metrics or bool(e.labels),
            field_path=".labels",
            reason="FieldValueRequired",
        ),
    )

    test_set: StorageUri = Field(description="Held-out rows the base model and the adapter are scored on")
    metrics: Annotated[
        list[Metric], AfterValidator(_unique), Field(min_length=1, max_length=7, json_schema_extra=_SET)
    ] = Field(default_factory=lambda: list[Metric](["exact_match"]), description="Metrics to compute on testSet")
    labels: (
        Annotated[
            list[Annotated[str, Field(min_length=1, max_length=256)]],
            AfterValidator(_unique),
            Field(min_length=1, max_length=256, json_schema_extra=_SET),
        ]
        | None
    ) = Field(default=None, description="Label set for the accuracy metric")
    gates: list[Gate] = Field(default_factory=list, max_length=16, description="All gates must pass for eval to pass")
    regression: RegressionCheck | None = Field(default=None, description="Optional general-ability regression check")
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=64, description="Generation limit per test row"
    )
    sample_predictions: Annotated[int, Field(ge=0, le=1000)] = Field(
        default=20, description="Predictions kept for inspection (status.eval.samplesUri)"
    )


class LoRAJobSpec(Model):
    """What to train, on what, and how to judge it.

    The spec defines one run and is fixed when the LoRAJob is created: every field but
    output.deleteOnJobDeletion is immutable (the API server refuses the change). A changed job is a new
    LoRAJob.
    """

    cel_rules = (
        Rule(
            cel="self.method != 'qlora' || self.resources.gpus >= 1",
            message="spec.resources.gpus: method qlora needs at least 1 GPU",
            check=lambda s: s.method != "qlora" or s.resources.gpus >= 1,
            field_path=".resources.gpus",
        ),
        Rule(
            # vLLM cannot load a DoRA adapter as a runtime LoRA: a DoRA job is served (and evaluated) merged.
            cel="self.method != 'dora' || self.output.mergedModel",
            message="spec.output.mergedModel: method dora needs mergedModel: true (vLLM cannot load DoRA adapters "
            "as runtime LoRA; a DoRA job is served and evaluated as its merged model)",
            check=lambda s: s.method != "dora" or s.output.merged_model,
            field_path=".output.mergedModel",
            reason="FieldValueRequired",
        ),
        Rule(
            cel="self.dataset.format != 'completion' || !has(self.eval) "
            "|| self.eval.metrics.all(m, m in ['loss', 'perplexity'])",
            message="spec.eval.metrics: dataset.format completion has no answers to score; use only loss or perplexity",
            check=lambda s: (
                s.dataset.format != "completion"
                or s.eval is None
                or all(m in ALWAYS_COMPUTED_METRICS for m in s.eval.metrics)
            ),
            field_path=".eval.metrics",
        ),
        presence_fixed("eval", "eval", "spec.eval"),
        presence_fixed("activeDeadlineSeconds", "active_deadline_seconds", "spec.activeDeadlineSeconds"),
        presence_fixed("queueName", "queue_name", "spec.queueName"),
    )

    base_model: BaseModelSource = Field(
        description="The pretrained model", json_schema_extra=immutable("spec.baseModel")
    )
    dataset: DatasetSource = Field(description="Training data", json_schema_extra=immutable("spec.dataset"))
    method: Method = Field(
        default="lora",
        description="lora, qlora (4-bit base, needs a GPU) or dora (weight-decomposed LoRA; needs "
        "output.mergedModel: vLLM serves DoRA only merged)",
        json_schema_extra=immutable("spec.method"),
    )
    lora: LoRAConfig = Field(
        default_factory=LoRAConfig, description="Adapter shape", json_schema_extra=immutable("spec.lora")
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig,
        description="Optimisation settings; one epoch unless epochs or maxSteps is set",
        json_schema_extra=immutable("spec.training"),
    )
    resources: Resources = Field(
        default_factory=Resources,
        description="Training pod resources and scheduling",
        json_schema_extra=immutable("spec.resources"),
    )
    output: OutputTarget = Field(description="Where the adapter is published")
    eval: EvalSpec | None = Field(
        default=None,
        description="Evaluation and gates; without it the adapter is published unjudged",
        json_schema_extra=immutable("spec.eval"),
    )
    retries: Annotated[int, Field(ge=0, le=20)] = Field(
        default=2,
        description="Failed training attempts to retry (the Job's backoffLimit, set when the Job is created)",
        json_schema_extra=immutable("spec.retries"),
    )
    queue_name: (
        Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")] | None
    ) = Field(
        default=None,
        description="Kueue LocalQueue in the LoRAJob's namespace. When set, the Job is created suspended with the "
        "kueue.x-k8s.io/queue-name label and starts when Kueue admits it (docs/gpu-cluster.md)",
        json_schema_extra=immutable("spec.queueName"),
    )
    active_deadline_seconds: Annotated[int, Field(ge=60)] | None = Field(
        default=None,
        description="Wall-clock limit of each training attempt (the trainer pod's activeDeadlineSeconds), in "
        "seconds, counted from when a node takes the pod: time queued for a GPU is not in it. An attempt that "
        "runs longer is stopped (DeadlineExceeded) and counts against retries",
        json_schema_extra=immutable("spec.activeDeadlineSeconds"),
    )


# --------------------------------------------------------------------------------------------------------------------
# LoRAJob status


class Condition(Model):
    """A metav1.Condition-shaped status condition."""

    type: Annotated[str, Field(min_length=1, max_length=316)] = Field(description="Ready, Trained, Evaluated, ...")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown")
    reason: Annotated[str, Field(min_length=1, max_length=1024)] = Field(description="CamelCase reason")
    message: Annotated[str, Field(max_length=32768)] = Field(default="", description="Human-readable detail")
    last_transition_time: str | None = Field(default=None, description="RFC 3339 time of the last status change")
    observed_generation: int | None = Field(default=None, description="metadata.generation the condition describes")


class TrainingProgress(Model):
    """Live training progress, reported by the trainer."""

    step: int = Field(default=0, description="Optimizer steps done")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned")
    epoch: float | None = Field(default=None, description="Fractional epoch reached")
    loss: float | None = Field(default=None, description="Latest training loss")
    eval_loss: float | None = Field(default=None, description="Latest validation loss")
    tokens_per_second: float | None = Field(default=None, description="Training throughput")
    eta_seconds: float | None = Field(default=None, description="Estimated time to the end of training")
    percent: float | None = Field(default=None, description="0-100; derived from step/totalSteps when unset")
    updated_at: str | None = Field(default=None, description="RFC 3339 time of this report")
    summary: str | None = Field(
        default=None, description="Derived on serialisation (e.g. 42%); the Progress column of kubectl get"
    )

    def render_summary(self) -> str | None:
        percent = self.percent
        if percent is None and self.total_steps:
            percent = 100.0 * self.step / self.total_steps
        if percent is None:
            return None
        return f"{int(max(0.0, min(percent, 100.0)))}%"

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        return _with_derived(self, handler(self), info, summary=self.render_summary())


class GateVerdict(Model):
    """How one gate came out."""

    metric: Metric
    rule: str = Field(description="min, max or minImprovementOverBase")
    threshold: float = Field(description="The gate's bound")
    value: float | None = Field(default=None, description="The adapter's value")
    base_value: float | None = Field(default=None, description="The base model's value")
    passed: bool = Field(description="The gate held")
    message: str = Field(default="", description="Human-readable verdict")


class EvalResults(Model):
    """Evaluation outcome."""

    passed: bool = Field(description="All gates and the regression check passed")
    base: dict[str, float] = Field(default_factory=dict, description="Base model metrics")
    adapter: dict[str, float] = Field(default_factory=dict, description="Adapter on the base in serving precision")
    adapter_training_precision: dict[str, float] | None = Field(
        default=None, description="QLoRA: the adapter on the 4-bit base it was trained against"
    )
    gates: list[GateVerdict] = Field(
        default_factory=list, max_length=16, description="One verdict per spec.eval.gates entry"
    )
    samples_uri: str | None = Field(default=None, description="Sample predictions (JSON Lines)")
    verdict: Literal["Passed", "Failed"] | None = Field(
        default=None, description="Derived from passed on serialisation; the Eval column of kubectl get"
    )

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        return _with_derived(self, handler(self), info, verdict="Passed" if self.passed else "Failed")


class AdapterArtifact(Model):
    """The published adapter."""

    uri: str = Field(description="Where the adapter files are")
    digest: str = Field(description="sha256 of the manifest, as sha256:<hex>")
    size_bytes: int = Field(description="Total size of the adapter files")
    trainable_parameters: int = Field(description="Parameters the adapter trains")
    rank: int = Field(description="LoRA rank")
    base_model: str = Field(description="Identity of the base model the adapter was trained on")
    short_digest: str | None = Field(
        default=None, description="Derived from digest on serialisation (12 hex digits); the Adapter column"
    )

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        return _with_derived(self, handler(self), info, short_digest=short_digest(self.digest))


class TrainingLayout(Model):
    """How the run is spread over processes, as the trainer ran it."""

    strategy: Literal["Single", "DDP", "FSDP"] | None = Field(
        default=None, description="Single (one process), DDP or FSDP"
    )
    nodes: int | None = Field(default=None, description="Training pods")
    processes_per_node: int | None = Field(default=None, description="Processes (one per GPU) in each pod")
    world_size: int | None = Field(default=None, description="Processes in all: nodes times processesPerNode")
    global_batch_size: int | None = Field(
        default=None,
        description="Sequences per optimizer step over all processes: batch size per process times gradient "
        "accumulation steps times world size",
    )


class LoRAJobStatus(Model):
    """Observed state of a LoRAJob, written by the operator."""

    model_config = ConfigDict(extra="ignore")

    phase: LoRAJobPhase = Field(default="Pending", description="Where the job is in its life cycle")
    observed_generation: int | None = Field(default=None, description="metadata.generation this status describes")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    message: str | None = Field(default=None, description="Human-readable detail of the phase")
    job_name: str | None = Field(default=None, description="The batch/v1 Job of the current attempt")
    attempts: int = Field(default=0, description="Training attempts started")
    progress: TrainingProgress | None = Field(default=None, description="Live training progress")
    training: TrainingLayout | None = Field(
        default=None, description="Distribution strategy, world size and global batch of the run (the trainer's)"
    )
    eval: EvalResults | None = Field(default=None, description="Evaluation outcome")
    adapter: AdapterArtifact | None = Field(default=None, description="The published adapter")
    start_time: str | None = Field(default=None, description="RFC 3339 time the first attempt started")
    completion_time: str | None = Field(default=None, description="RFC 3339 time the job finished")
    gpu_seconds: float | None = Field(
        default=None,
        description="GPUs requested times the seconds the trainer container ran, summed over every attempt; time "
        "queued, pulling the image or between attempts is not counted. Never decreases while the job runs",
    )
    cost_estimate: str | None = Field(
        default=None,
        description="gpuSeconds / 3600 times the operator's price per GPU-hour for the GPU type, e.g. 12.40 USD",
    )
    estimate: dict[str, Any] | None = Field(
        default=None,
        description="Preflight estimate of memory, GPU-hours and cost (kubelora.trainer.estimate, camelCase keys); "
        "free-form, may change between versions",
    )
    kopf: dict[str, Any] | None = Field(
        default=None, exclude=True, description="kopf's own bookkeeping; not part of the API"
    )


# --------------------------------------------------------------------------------------------------------------------
# AdapterDeployment


class AdapterSource(Model):
    """The adapter to serve: the output of a LoRAJob, or files at a URI pinned by digest."""

    cel_rules = (
        Rule(
            cel="has(self.loraJob) != has(self.uri)",
            message="spec.adapter: set exactly one of loraJob or uri",
            check=lambda a: (a.lora_job is None) != (a.uri is None),
        ),
        Rule(
            cel="!has(self.uri) || has(self.digest)",
            message="spec.adapter.digest: is required when spec.adapter.uri is set",
            check=lambda a: a.uri is None or a.digest is not None,
            field_path=".digest",
            reason="FieldValueRequired",
        ),
    )

    lora_job: ObjectName | None = Field(default=None, description="A LoRAJob in the same namespace")
    uri: S3Uri | None = Field(
        default=None,
        description="Adapter files in S3 (the directory with kubelora-manifest.json, or an output URI whose "
        "sha256/<hex>/ holds the digest); needs digest. The operator and the agent read only s3://",
    )
    digest: Digest | None = Field(default=None, description="Expected manifest digest, sha256:<hex>")
    secret_ref: SecretRef | None = Field(default=None, description="S3 credentials: keys accessKey and secretKey")


class ManagedServer(Model):
    """A vLLM server the operator runs for this AdapterDeployment."""

    base_model: BaseModelSource = Field(description="The model vLLM serves")
    image: Annotated[str, Field(min_length=1, max_length=512)] | None = Field(
        default=None,
        description=f"vLLM server image; unset: the operator's vllmImage (chart default {VLLM_IMAGE})",
    )
    args: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list,
        max_length=64,
        description="More vLLM arguments, after those the operator sets (for example --dtype, --max-model-len)",
    )
    replicas: Annotated[int, Field(ge=1, le=1000)] = Field(default=1, description="Server pods")
    gpus: Annotated[int, Field(ge=0, le=64)] = Field(default=1, description="nvidia.com/gpu per server pod")
    gpu_type: Annotated[str, Field(max_length=128)] | None = Field(
        default=None, description="Value of the nvidia.com/gpu.product node label"
    )


class ServingTarget(Model):
    """The vLLM servers to load the adapter into. Set exactly one of deploymentName, selector and managed."""

    cel_rules = (
        Rule(
            cel="[has(self.deploymentName), has(self.selector), has(self.managed)].exists_one(x, x)",
            message="spec.target: set exactly one of deploymentName, selector or managed",
            check=lambda t: sum(v is not None for v in (t.deployment_name, t.selector, t.managed)) == 1,
        ),
        Rule(
            cel="has(self.managed) || has(self.agentTokenSecretRef)",
            message="spec.target.agentTokenSecretRef: is required for deploymentName and selector targets "
            "(the Secret your pods' kubelora-agent reads its token from)",
            check=lambda t: t.managed is not None or t.agent_token_secret_ref is not None,
            field_path=".agentTokenSecretRef",
            reason="FieldValueRequired",
        ),
    )

    deployment_name: ObjectName | None = Field(default=None, description="An existing vLLM Deployment")
    selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=16, description="Labels of existing vLLM pods"
    )
    managed: ManagedServer | None = Field(default=None, description="A vLLM server run by the operator")
    base_model: Annotated[str, Field(min_length=1, max_length=512)] = Field(
        description="Identity of the served base model, compared with the adapter's"
    )
    port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8000, description="vLLM's HTTP port")
    max_loras: Annotated[int, Field(ge=1, le=256)] = Field(default=4, description="vLLM --max-loras")
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        default=64, description="vLLM --max-lora-rank; vLLM accepts only 1, 8, 16, 32, 64, 128, 256, 320 and 512"
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="vLLM's --api-key, sent as a bearer token on every call the operator makes to the servers",
    )
    agent_token_secret_ref: TokenSecretKeyRef | None = Field(
        default=None,
        description="The kubelora-agent's token (its KUBELORA_AGENT_TOKEN), sent on every call to the agent. "
        "Required for deploymentName and selector targets; managed servers get a generated Secret",
    )


class GatePolicy(Model):
    """When an adapter may be served."""

    require_eval_passed: bool = Field(default=True, description="Refuse adapters whose LoRAJob eval did not pass")


class RolloutStep(Model):
    """One step of a Canary rollout: how many pods serve the new version, and how long it bakes there."""

    cel_rules = (
        Rule(
            cel="has(self.replicas) != has(self.percent)",
            message="spec.rollout.steps: set exactly one of replicas or percent in each step",
            check=lambda s: (s.replicas is None) != (s.percent is None),
        ),
    )

    replicas: Annotated[int, Field(ge=1, le=1000)] | None = Field(default=None, description="Pods on this step")
    percent: Annotated[int, Field(ge=1, le=100)] | None = Field(
        default=None, description="Share of the target pods on this step, rounded up"
    )
    bake_seconds: Annotated[int, Field(ge=0, le=86400)] = Field(
        default=0, description="How long the step holds, watching its pods, before the next one"
    )


class RolloutStrategy(Model):
    """How a new adapter version replaces the old one."""

    strategy: Literal["AllAtOnce", "Canary"] = Field(
        default="Canary",
        description="Canary: load on canaryReplicas, smoke-test, then promote; AllAtOnce: load everywhere",
    )
    canary_replicas: Annotated[int, Field(ge=1, le=100)] = Field(
        default=1, description="Canary: replicas that load the new adapter first; at most target.managed.replicas"
    )
    smoke_prompts: Annotated[int, Field(ge=0, le=100)] = Field(
        default=5, description="Prompts sent to the canary before promotion"
    )
    smoke_min_match: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.8, description="Fraction of smoke prompts whose answers must match the LoRAJob's eval predictions"
    )
    auto_rollback: bool = Field(default=True, description="Return to the previous adapter when the rollout fails")
    steps: list[RolloutStep] = Field(
        default_factory=list,
        max_length=10,
        description="Canary: the steps after the smoke check, e.g. 1 pod, then 50%, each with a bake time; then "
        "all pods. Unset: one step of canaryReplicas pods, no bake. The first step is smoke-checked",
    )
    max_unavailable: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        default=None,
        description="Most pods switching to the new version at once (each reloads in place while it serves); "
        "unset: a step's pods all at once",
    )


class AdapterDeploymentSpec(Model):
    """Which adapter to serve, where, and how to roll it out."""

    cel_rules = (
        Rule(
            cel="self.rollout.strategy != 'Canary' || !has(self.target.managed) "
            "|| self.rollout.canaryReplicas <= self.target.managed.replicas",
            message="spec.rollout.canaryReplicas: must not exceed spec.target.managed.replicas",
            check=lambda s: (
                s.rollout.strategy != "Canary"
                or s.target.managed is None
                or s.rollout.canary_replicas <= s.target.managed.replicas
            ),
            field_path=".rollout.canaryReplicas",
        ),
    )

    adapter: AdapterSource = Field(description="The adapter to serve")
    served_name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")] = Field(
        description="Model name clients request from vLLM's OpenAI API"
    )
    target: ServingTarget = Field(description="The vLLM servers")
    gate_policy: GatePolicy = Field(default_factory=GatePolicy, description="When an adapter may be served")
    rollout: RolloutStrategy = Field(
        default_factory=RolloutStrategy, description="How a new adapter replaces the old one"
    )


class ReplicaState(Model):
    """One server pod's view of the adapter."""

    pod: str = Field(description="Server pod name")
    digest: str | None = Field(default=None, description="Adapter digest this pod serves or is loading")
    state: Literal["Pending", "Loading", "Loaded", "Failed", "Unloaded"] = Field(
        description="Adapter state on this pod"
    )
    message: str | None = Field(default=None, description="Detail, e.g. the load error")
    attempts: int = Field(default=0, description="Load attempts on this pod")


class AdapterDeploymentStatus(Model):
    """Observed state of an AdapterDeployment, written by the operator."""

    model_config = ConfigDict(extra="ignore")

    phase: AdapterDeploymentPhase = Field(default="Pending", description="Where the rollout is")
    observed_generation: int | None = Field(default=None, description="metadata.generation this status describes")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    message: str | None = Field(default=None, description="Human-readable detail of the phase")
    active_digest: str | None = Field(default=None, description="Digest of the adapter being served")
    previous_digest: str | None = Field(default=None, description="Digest to roll back to")
    active_uri: str | None = Field(default=None, description="Files of the adapter being served")
    previous_uri: str | None = Field(default=None, description="Files of the adapter to roll back to")
    desired_replicas: int = Field(default=0, description="Server pods that should serve the adapter")
    loaded_replicas: int = Field(default=0, description="Server pods that serve the active adapter")
    current_step: int | None = Field(default=None, description="Canary: the rollout step in progress (0-based)")
    step_started_at: str | None = Field(default=None, description="Canary: when the current step's pods were loaded")
    replicas: list[ReplicaState] = Field(
        default_factory=list, max_length=50, description="Per-pod state, capped at 50 entries"
    )
    active_short_digest: str | None = Field(
        default=None, description="Derived from activeDigest on serialisation; the Active column"
    )
    loaded: str | None = Field(
        default=None, description="Derived on serialisation as loadedReplicas/desiredReplicas; the Loaded column"
    )
    kopf: dict[str, Any] | None = Field(
        default=None, exclude=True, description="kopf's own bookkeeping; not part of the API"
    )

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        return _with_derived(
            self,
            handler(self),
            info,
            active_short_digest=short_digest(self.active_digest),
            loaded=f"{self.loaded_replicas}/{self.desired_replicas}",
        )


# --------------------------------------------------------------------------------------------------------------------
# Objects


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class LoRAJob(Model):
    """Fine-tunes a LoRA, QLoRA or DoRA adapter, evaluates it against gates and publishes it."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    api_version: Literal["kubelora.dev/v1alpha1"] = API_VERSION
    kind: Literal["LoRAJob"] = "LoRAJob"
    metadata: ObjectMeta
    spec: LoRAJobSpec
    status: LoRAJobStatus | None = None


class AdapterDeployment(Model):
    """Serves an adapter from vLLM servers, with eval gating, canary and rollback."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    api_version: Literal["kubelora.dev/v1alpha1"] = API_VERSION
    kind: Literal["AdapterDeployment"] = "AdapterDeployment"
    metadata: ObjectMeta
    spec: AdapterDeploymentSpec
    status: AdapterDeploymentStatus | None = None


def dump(model: BaseModel) -> dict[str, Any]:
    """Wire form: camelCase, None fields dropped."""
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


# --------------------------------------------------------------------------------------------------------------------
# Offline validation (the same rules the API server applies)


class InvalidObjectError(ValueError):
    """An object the API server would reject. ``causes`` holds one message per problem, naming the field."""

    def __init__(self, kind: str, name: str | None, causes: list[str]) -> None:
        self.kind = kind
        self.name = name
        self.causes = causes
        super().__init__(f'{kind} "{name or "<unnamed>"}" is invalid: ' + "; ".join(causes))


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _causes(exc: ValidationError) -> list[str]:
    causes = []
    for error in exc.errors(include_url=False):
        if error["type"] == "kubelora_rule":
            causes.append(error["msg"])
        else:
            causes.append(f"{_loc(error['loc']) or '<object>'}: {error['msg']}")
    return causes


_M = TypeVar("_M", bound=BaseModel)


def _validate(cls: type[_M], obj: Mapping[str, Any] | BaseModel) -> _M:
    data = dump(obj) if isinstance(obj, BaseModel) else obj
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        metadata = data.get("metadata")
        name = metadata.get("name") if isinstance(metadata, Mapping) else None
        raise InvalidObjectError(cls.__name__, name, _causes(exc)) from None


def validate_lorajob(obj: Mapping[str, Any] | LoRAJob) -> LoRAJob:
    """Parse a LoRAJob (wire form) and apply the CRD's rules; raises InvalidObjectError."""
    return _validate(LoRAJob, obj)


def validate_adapterdeployment(obj: Mapping[str, Any] | AdapterDeployment) -> AdapterDeployment:
    """Parse an AdapterDeployment (wire form) and apply the CRD's rules; raises InvalidObjectError."""
    return _validate(AdapterDeployment, obj)


def immutable_fields(model: type[BaseModel]) -> dict[str, str]:
    """Python field name -> wire path of the fields marked ``immutable(...)`` on ``model``."""
    out = {}
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and isinstance(path := extra.get(IMMUTABLE_KEY), str):
            out[name] = path
    return out


def validate_lorajob_update(old: Mapping[str, Any] | LoRAJob, new: Mapping[str, Any] | LoRAJob) -> LoRAJob:
    """Validate ``new`` as an update of ``old``: the rules of :func:`validate_lorajob` plus immutability."""
    old_job = validate_lorajob(old)
    new_job = validate_lorajob(new)
    causes = []
    parts: tuple[tuple[type[BaseModel], BaseModel, BaseModel], ...] = (
        (LoRAJobSpec, old_job.spec, new_job.spec),
        (OutputTarget, old_job.spec.output, new_job.spec.output),
    )
    for cls, before_part, after_part in parts:
        for name, path in immutable_fields(cls).items():
            before, after = getattr(before_part, name), getattr(after_part, name)
            if before is not None and after is not None and _wire(before) != _wire(after):
                causes.append(f"{path}: is immutable once set")
        for rule in cls.__dict__.get("cel_rules", ()):
            if rule.transition and not rule.check(before_part, after_part):
                causes.append(rule.message)
    if causes:
        raise InvalidObjectError("LoRAJob", new_job.metadata.name, causes)
    return new_job


def _wire(value: Any) -> Any:
    return dump(value) if isinstance(value, BaseModel) else value
