"""The kubelora.dev/v1alpha1 API: LoRAJob and AdapterDeployment.

These pydantic models are the one definition of the API. ``make crds`` generates
``crds/*.yaml`` from them; the operator and the trainer read specs through them.
Field names are camelCase on the wire (aliases) and snake_case in Python.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "kubelora.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

Metric = Literal["exact_match", "f1", "accuracy", "json_valid", "json_match", "loss", "perplexity"]
Method = Literal["lora", "qlora", "dora"]
DatasetFormat = Literal["chat", "instruction", "completion"]
LoRAJobPhase = Literal["Pending", "Queued", "Training", "Evaluating", "Succeeded", "Failed"]
AdapterDeploymentPhase = Literal["Pending", "Refused", "Loading", "Canary", "Promoting", "Ready", "RolledBack", "Failed"]

StorageUri = Annotated[str, Field(pattern=r"^(s3|pvc|hf|file)://.+", max_length=2048)]


class Model(BaseModel):
    """Base for API objects: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SecretRef(Model):
    name: Annotated[str, Field(min_length=1, max_length=253, description="A Secret in the object's own namespace")]


class BaseModelSource(Model):
    uri: StorageUri = Field(description="s3://bucket/prefix/, pvc://claim/path or hf://org/name")
    revision: str | None = Field(default=None, description="Revision for hf:// models")
    secret_ref: SecretRef | None = Field(default=None, description="S3 credentials: keys accessKey and secretKey")
    trust_remote_code: bool = Field(default=False, description="Allow the model's own Python code to run")


class DatasetSource(Model):
    train: StorageUri
    validation: StorageUri | None = None
    validation_split: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    format: DatasetFormat = "chat"
    secret_ref: SecretRef | None = None
    max_bad_rows: Annotated[int, Field(ge=0)] = Field(default=0, description="Malformed rows to skip before failing")


class LoRAConfig(Model):
    rank: Annotated[int, Field(ge=1, le=512)] = 16
    alpha: Annotated[float, Field(gt=0)] = 32.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], description="Module names, or all-linear")
    rs_lora: bool = Field(default=False, alias="rsLoRA")


class TrainingConfig(Model):
    epochs: Annotated[float, Field(gt=0)] | None = None
    max_steps: Annotated[int, Field(ge=1)] | None = None
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 2.0e-4
    batch_size: Annotated[int, Field(ge=1)] = 8
    gradient_accumulation: Annotated[int, Field(ge=1)] = 1
    max_seq_length: Annotated[int, Field(ge=16)] = 2048
    packing: bool = False
    gradient_checkpointing: bool = True
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    seed: int = 42
    checkpoint_every_steps: Annotated[int, Field(ge=1)] = 100


class Toleration(Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Resources(Model):
    gpus: Annotated[int, Field(ge=0, le=64)] = 1
    gpu_type: str | None = Field(default=None, description="Value of the nvidia.com/gpu.product node label")
    cpu: str | None = None
    memory: str | None = None
    tolerations: list[Toleration] = Field(default_factory=list)
    priority_class_name: str | None = None


class OutputTarget(Model):
    uri: StorageUri
    secret_ref: SecretRef | None = None
    merged_model: bool = Field(default=False, description="Also publish the base with the adapter merged in")
    delete_on_job_deletion: bool = Field(default=False, description="Remove the adapter files when the LoRAJob is deleted")


class Gate(Model):
    metric: Metric
    min: float | None = None
    max: float | None = None
    min_improvement_over_base: float | None = None


class RegressionCheck(Model):
    dataset: StorageUri
    max_loss_increase: Annotated[float, Field(ge=0)] = 0.05


class EvalSpec(Model):
    test_set: StorageUri
    metrics: list[Metric] = Field(default_factory=lambda: ["exact_match"])
    labels: list[str] | None = Field(default=None, description="Label set for the accuracy metric")
    gates: list[Gate] = Field(default_factory=list)
    regression: RegressionCheck | None = None
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 64
    sample_predictions: Annotated[int, Field(ge=0, le=1000)] = 20


class LoRAJobSpec(Model):
    base_model: BaseModelSource
    dataset: DatasetSource
    method: Method = "lora"
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    resources: Resources = Field(default_factory=Resources)
    output: OutputTarget
    eval: EvalSpec | None = None
    retries: Annotated[int, Field(ge=0, le=20)] = 2
    active_deadline_seconds: Annotated[int, Field(ge=60)] | None = None


class Condition(Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class TrainingProgress(Model):
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    percent: float | None = None
    updated_at: str | None = None


class GateVerdict(Model):
    metric: Metric
    rule: str
    threshold: float
    value: float | None = None
    base_value: float | None = None
    passed: bool
    message: str = ""


class EvalResults(Model):
    passed: bool
    base: dict[str, float] = Field(default_factory=dict)
    adapter: dict[str, float] = Field(default_factory=dict, description="Adapter on the base in serving precision")
    adapter_training_precision: dict[str, float] | None = Field(
        default=None, description="QLoRA: the adapter on the 4-bit base it was trained against"
    )
    gates: list[GateVerdict] = Field(default_factory=list)
    samples_uri: str | None = None


class AdapterArtifact(Model):
    uri: str
    digest: str = Field(description="sha256 of the manifest, as sha256:<hex>")
    size_bytes: int
    trainable_parameters: int
    rank: int
    base_model: str


class LoRAJobStatus(Model):
    phase: LoRAJobPhase = "Pending"
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    message: str | None = None
    job_name: str | None = None
    attempts: int = 0
    progress: TrainingProgress | None = None
    eval: EvalResults | None = None
    adapter: AdapterArtifact | None = None
    start_time: str | None = None
    completion_time: str | None = None
    gpu_seconds: float | None = None
    cost_estimate: str | None = Field(default=None, description="Estimated cost, e.g. 12.40 USD")


class AdapterSource(Model):
    lora_job: str | None = Field(default=None, description="A LoRAJob in the same namespace")
    uri: StorageUri | None = None
    digest: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")] | None = None
    secret_ref: SecretRef | None = None


class ManagedServer(Model):
    base_model: BaseModelSource
    image: str = "vllm/vllm-openai:latest"
    replicas: Annotated[int, Field(ge=1, le=1000)] = 1
    gpus: Annotated[int, Field(ge=0, le=64)] = 1
    gpu_type: str | None = None


class ServingTarget(Model):
    deployment_name: str | None = None
    selector: dict[str, str] | None = None
    managed: ManagedServer | None = None
    base_model: str = Field(description="Identity of the served base model, compared with the adapter's")
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    max_loras: Annotated[int, Field(ge=1)] = 4
    max_lora_rank: Annotated[int, Field(ge=1, le=512)] = 64


class GatePolicy(Model):
    require_eval_passed: bool = True


class RolloutStrategy(Model):
    strategy: Literal["AllAtOnce", "Canary"] = "Canary"
    canary_replicas: Annotated[int, Field(ge=1)] = 1
    smoke_prompts: Annotated[int, Field(ge=0, le=100)] = 5
    smoke_min_match: Annotated[float, Field(ge=0, le=1)] = 0.8
    auto_rollback: bool = True


class AdapterDeploymentSpec(Model):
    adapter: AdapterSource
    served_name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")]
    target: ServingTarget
    gate_policy: GatePolicy = Field(default_factory=GatePolicy)
    rollout: RolloutStrategy = Field(default_factory=RolloutStrategy)


class ReplicaState(Model):
    pod: str
    digest: str | None = None
    state: Literal["Pending", "Loading", "Loaded", "Failed", "Unloaded"]
    message: str | None = None
    attempts: int = 0


class AdapterDeploymentStatus(Model):
    phase: AdapterDeploymentPhase = "Pending"
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    message: str | None = None
    active_digest: str | None = None
    previous_digest: str | None = None
    active_uri: str | None = None
    previous_uri: str | None = None
    desired_replicas: int = 0
    loaded_replicas: int = 0
    replicas: list[ReplicaState] = Field(default_factory=list, description="Per-pod state, capped at 50 entries")


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class LoRAJob(Model):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    api_version: Literal["kubelora.dev/v1alpha1"] = API_VERSION
    kind: Literal["LoRAJob"] = "LoRAJob"
    metadata: ObjectMeta
    spec: LoRAJobSpec
    status: LoRAJobStatus | None = None


class AdapterDeployment(Model):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    api_version: Literal["kubelora.dev/v1alpha1"] = API_VERSION
    kind: Literal["AdapterDeployment"] = "AdapterDeployment"
    metadata: ObjectMeta
    spec: AdapterDeploymentSpec
    status: AdapterDeploymentStatus | None = None


def dump(model: BaseModel) -> dict[str, Any]:
    """Wire form: camelCase, None fields dropped."""
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")
