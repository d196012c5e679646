"""The LoRAJob state machine: preflight checks, start the run, and turn what is observed into status.

Plain code with no kopf in it; the kopf handlers in `handlers.py` are thin wrappers.
Phases: Pending → Queued → Training → Evaluating → Succeeded | Failed.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import logging
from collections.abc import Callable
from typing import Any

from kubelora.api.v1alpha1 import LoRAJob
from kubelora.operator.conditions import now, set_condition
from kubelora.operator.config import OperatorConfig
from kubelora.operator.executors import Executor
from kubelora.operator.jobspec import GPU_PRODUCT_LABEL
from kubelora.operator.observe import Observation

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
logger = logging.getLogger("kubelora.lorajob")


@dataclasses.dataclass
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclasses.dataclass
class Preflight:
    """Outcome of the checks the API server cannot make."""

    blocking: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (reason, message): wait and retry
    fatal: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (reason, message): the job cannot run
    warnings: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    credentials: dict[str, str] = dataclasses.field(default_factory=dict)
    estimate: dict[str, Any] | None = None


class Cluster:
    """The reads the state machine needs from the API server; a fake stands in for it in unit tests."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def gpu_nodes(self, product: str) -> list[dict[str, str]]:
        """Labels of the nodes that carry this GPU product."""
        nodes = self.core.list_node(label_selector=f"{GPU_PRODUCT_LABEL}={product}").items
        return [dict((n.metadata.labels if n.metadata else None) or {}) for n in nodes]


# GPU memory in MiB by product, for types no node shows yet (an autoscaler may add them).
KNOWN_GPU_MEMORY_MIB = {
    "NVIDIA-A100-SXM4-80GB": 81920,
    "NVIDIA-A100-SXM4-40GB": 40960,
    "NVIDIA-H100-80GB-HBM3": 81559,
    "NVIDIA-L4": 23034,
    "NVIDIA-A10G": 23028,
    "Tesla-T4": 15360,
}


def credentials_for(lorajob: LoRAJob, secret: dict[str, str], config: OperatorConfig) -> dict[str, str]:
    endpoint = secret.get("endpoint") or config.default_s3_endpoint or ""
    creds = {"AWS_ACCESS_KEY_ID": secret.get("accessKey", ""), "AWS_SECRET_ACCESS_KEY": secret.get("secretKey", "")}
    if endpoint:
        creds["S3_ENDPOINT"] = endpoint
    creds["S3_SECURE"] = "true" if config.s3_secure else "false"
    return creds


def preflight(
    lorajob: LoRAJob,
    cluster: Cluster,
    config: OperatorConfig,
    estimate_memory: Callable[[LoRAJob, dict[str, str]], dict[str, Any] | None] | None = None,
) -> Preflight:
    result = Preflight()
    spec = lorajob.spec
    namespace = lorajob.metadata.namespace or "default"
    refs = {
        "spec.baseModel.secretRef": spec.base_model.secret_ref,
        "spec.dataset.secretRef": spec.dataset.secret_ref,
        "spec.output.secretRef": spec.output.secret_ref,
    }
    secrets: dict[str, dict[str, str]] = {}
    for field, ref in refs.items():
        if ref is None or ref.name in secrets:
            continue
        data = cluster.read_secret(namespace, ref.name)
        if data is None:
            result.blocking.append(("SecretNotFound", f"{field}: Secret {namespace}/{ref.name} does not exist"))
            continue
        missing = [k for k in ("accessKey", "secretKey") if k not in data]
        if missing:
            result.blocking.append(("SecretInvalid", f"{field}: Secret {namespace}/{ref.name} has no key {missing[0]}"))
            continue
        secrets[ref.name] = data
    first = next((secrets[r.name] for r in refs.values() if r is not None and r.name in secrets), {})
    result.credentials = credentials_for(lorajob, first, config)
    gpu_memory_mib: int | None = None
    if spec.resources.gpu_type:
        nodes = cluster.gpu_nodes(spec.resources.gpu_type)
        if not nodes:
            result.warnings.append(
                (
                    "GPUTypeNotFound",
                    f"spec.resources.gpuType: no node has {GPU_PRODUCT_LABEL}={spec.resources.gpu_type}",
                )
            )
        memory_labels = [int(n["nvidia.com/gpu.memory"]) for n in nodes if n.get("nvidia.com/gpu.memory", "").isdigit()]
        gpu_memory_mib = max(memory_labels) if memory_labels else KNOWN_GPU_MEMORY_MIB.get(spec.resources.gpu_type)
    if estimate_memory is not None and not result.blocking:
        try:
            result.estimate = estimate_memory(lorajob, result.credentials)
        except Exception as exc:
            result.warnings.append(("EstimateUnavailable", f"spec.baseModel: cannot read config.json: {exc}"))
        needed = (result.estimate or {}).get("totalBytesPerGpu")
        if needed and gpu_memory_mib and spec.resources.gpus:
            available = gpu_memory_mib * 1024 * 1024
            if needed > available:
                result.fatal.append(
                    (
                        "InsufficientGPUMemory",
                        f"spec.resources: estimated {needed / 2**30:.1f} GiB per GPU exceeds the "
                        f"{available / 2**30:.1f} GiB of {spec.resources.gpu_type}",
                    )
                )
    return result


def _seconds_between(start: str | None, end: str | None) -> float:
    if not start:
        return 0.0
    parse = datetime.datetime.fromisoformat
    finish = parse(end.replace("Z", "+00:00")) if end else datetime.datetime.now(datetime.UTC)
    return max(0.0, (finish - parse(start.replace("Z", "+00:00"))).total_seconds())


def _cost(lorajob: LoRAJob, started: str | None, finished: str | None, config: OperatorConfig) -> tuple[float, str]:
    gpus = max(lorajob.spec.resources.gpus, 0)
    gpu_seconds = round(gpus * _seconds_between(started, finished), 1)
    price = config.price_per_hour(lorajob.spec.resources.gpu_type)
    cost = gpu_seconds / 3600 * price
    # Cents hide a short run's cost entirely; show four decimals below one dollar.
    return gpu_seconds, f"{cost:.2f} USD" if cost >= 1 else f"{cost:.4f} USD"


def _phase_for_running(observation: Observation) -> str:
    trainer_phase = observation.report.phase or "Training"
    return "Evaluating" if trainer_phase in ("Evaluating", "Publishing") else "Training"


def derive_status(
    lorajob: LoRAJob,
    old_status: dict[str, Any],
    observation: Observation,
    config: OperatorConfig,
    preflight_result: Preflight | None = None,
) -> tuple[dict[str, Any], list[Event]]:
    """The new status (wire form) and the events to post, from the old status and what was observed."""
    generation = lorajob.metadata.generation
    old_phase = old_status.get("phase")
    status: dict[str, Any] = {k: v for k, v in old_status.items() if k != "kopf"}
    conditions: list[dict[str, Any]] = list(status.get("conditions", []))
    events: list[Event] = []
    status["observedGeneration"] = generation

    if preflight_result is not None:
        for reason, message in preflight_result.warnings:
            conditions = set_condition(
                conditions,
                "GPUTypeAvailable" if reason == "GPUTypeNotFound" else "Preflight",
                False,
                reason,
                message,
                generation,
            )
        if preflight_result.estimate is not None:
            status["estimate"] = preflight_result.estimate
        problems = preflight_result.fatal or preflight_result.blocking
        if problems:
            reason, message = problems[0]
            conditions = set_condition(conditions, "Preflight", False, reason, message, generation)
            phase = "Failed" if preflight_result.fatal else "Pending"
            conditions = set_condition(conditions, "Ready", False, reason, message, generation)
            status.update(conditions=conditions, phase=phase, message=message)
            if phase == "Failed":
                status["completionTime"] = now()
            _phase_events(old_phase, phase, reason, message, events, status)
            return status, events
        conditions = set_condition(
            conditions, "Preflight", True, "ChecksPassed", "Secrets, GPU type and memory estimate are fine", generation
        )

    state = observation.state
    report = observation.report
    if observation.run_name:
        status["jobName"] = observation.run_name
    status["attempts"] = observation.attempts
    if observation.started_at:
        status["startTime"] = observation.started_at
    if report.progress:
        progress = {k: v for k, v in report.progress.items() if v is not None}
        progress["updatedAt"] = now()
        status["progress"] = progress

    reason, message = observation.reason, observation.message
    if state in ("NotStarted", "Pending"):
        phase = "Pending"
        reason = reason or "Starting"
        message = message or "Waiting for the trainer to start"
        conditions = set_condition(conditions, "Ready", False, reason, message, generation)
    elif state == "Queued":
        phase = "Queued"
        reason = reason or "Unschedulable"
        conditions = set_condition(conditions, "Scheduled", False, reason, message, generation)
        conditions = set_condition(
            conditions, "Ready", False, "Queued", message or "Waiting for a free GPU", generation
        )
    elif state == "Running":
        phase = _phase_for_running(observation)
        reason = reason or phase
        message = message or (
            "Training the adapter" if phase == "Training" else "Evaluating the adapter against the base model"
        )
        conditions = set_condition(conditions, "Scheduled", True, "Scheduled", "", generation)
        conditions = set_condition(conditions, "Ready", False, phase, message, generation)
    elif state == "Succeeded":
        phase, reason, message, conditions = _finished(status, report.result, conditions, generation)
        status["completionTime"] = observation.finished_at or now()
    else:
        phase = "Failed"
        reason = reason or "TrainerFailed"
        if report.error:
            reason = str(report.error.get("reason") or reason)
            message = str(report.error.get("message") or message)
        message = message or "The trainer failed"
        conditions = set_condition(conditions, "Ready", False, reason, message, generation)
        status["completionTime"] = observation.finished_at or now()

    if observation.started_at:
        gpu_seconds, cost = _cost(lorajob, observation.started_at, status.get("completionTime"), config)
        status["gpuSeconds"], status["costEstimate"] = gpu_seconds, cost
    status["phase"], status["message"], status["conditions"] = phase, message, conditions
    _phase_events(old_phase, phase, reason, message, events, status)
    return status, events


def _finished(
    status: dict[str, Any], result: dict[str, Any] | None, conditions: list[dict[str, Any]], generation: int | None
) -> tuple[str, str, str, list[dict[str, Any]]]:
    if not result or not result.get("adapter"):
        message = "The trainer exited 0 but published no result; the adapter is not trusted"
        return "Failed", "NoResult", message, set_condition(conditions, "Ready", False, "NoResult", message, generation)
    adapter = dict(result["adapter"])
    digest = str(adapter.get("digest", ""))
    adapter.setdefault("shortDigest", digest.removeprefix("sha256:")[:12])
    status["adapter"] = adapter
    evaluation = result.get("eval")
    if evaluation is not None:
        status["eval"] = evaluation
    if evaluation is not None and not evaluation.get("passed", False):
        failed = [g for g in evaluation.get("gates", []) if not g.get("passed")]
        detail = "; ".join(
            g.get("message") or f"{g.get('metric')} {g.get('rule')} {g.get('threshold')}" for g in failed
        )
        message = f"Evaluation gates failed: {detail}" if detail else "Evaluation gates failed"
        conditions = set_condition(conditions, "EvalPassed", False, "GatesFailed", message, generation)
        return (
            "Failed",
            "GatesFailed",
            message,
            set_condition(conditions, "Ready", False, "GatesFailed", message, generation),
        )
    message = f"Adapter {digest[:19]} published to {adapter.get('uri')}"
    if evaluation is not None:
        conditions = set_condition(
            conditions, "EvalPassed", True, "GatesPassed", "Every evaluation gate passed", generation
        )
    return "Succeeded", "Succeeded", message, set_condition(conditions, "Ready", True, "Succeeded", message, generation)


def _phase_events(
    old: str | None, new: str, reason: str, message: str, events: list[Event], status: dict[str, Any]
) -> None:
    if old == new:
        return
    kind = "Warning" if new == "Failed" or (new == "Pending" and reason.endswith("NotFound")) else "Normal"
    events.append(Event(kind, reason or new, f"Phase {old or 'None'} -> {new}: {message}"))


def needs_reconcile(status: dict[str, Any] | None, generation: int | None) -> bool:
    status = status or {}
    return status.get("phase") not in TERMINAL_PHASES or status.get("observedGeneration") != generation


def reconcile(
    lorajob: LoRAJob,
    old: dict[str, Any],
    executor: Executor,
    cluster: Cluster,
    config: OperatorConfig,
    estimate_memory: Callable[[LoRAJob, dict[str, str]], dict[str, Any] | None] | None = None,
    read_progress: bool = True,
    started_runs: set[str] | None = None,
) -> tuple[dict[str, Any] | None, list[Event]]:
    """One level-based pass over `lorajob` with status `old`. Returns the status to write (None: unchanged)."""
    if not needs_reconcile(old, lorajob.metadata.generation):
        return None, []
    check: Preflight | None = None
    observation = executor.observe(lorajob, {}, read_progress=False)
    run_key = lorajob.metadata.uid or lorajob.metadata.name
    if observation.state == "NotStarted" and started_runs is not None and run_key in started_runs:
        # Started moments ago; the watch has not shown the Job yet. Creating it again would only get a 409.
        return None, []
    if observation.state != "NotStarted" and started_runs is not None:
        started_runs.discard(run_key)
    if observation.state == "NotStarted":
        check = preflight(lorajob, cluster, config, estimate_memory)
        if not (check.blocking or check.fatal):
            run_name = executor.start(lorajob, check.credentials)
            if started_runs is not None:
                started_runs.add(run_key)
            observation = executor.observe(lorajob, check.credentials, read_progress=False)
            observation.run_name = observation.run_name or run_name
            logger.info(
                "Started training run lorajob=%s/%s run=%s",
                lorajob.metadata.namespace,
                lorajob.metadata.name,
                observation.run_name,
            )
    else:
        wanted = ("Running", "Succeeded", "Failed")
        credentials = credentials_of(lorajob, cluster, config) if observation.state in wanted else {}
        observation = executor.observe(lorajob, credentials, read_progress=read_progress)
    status, events = derive_status(lorajob, old, observation, config, check)
    if _same(old, status):
        return None, events
    return status, events


def credentials_of(lorajob: LoRAJob, cluster: Cluster, config: OperatorConfig) -> dict[str, str]:
    """S3 settings for this job, from its own namespace's Secret (kept in memory only)."""
    spec = lorajob.spec
    ref = spec.output.secret_ref or spec.base_model.secret_ref or spec.dataset.secret_ref
    secret = cluster.read_secret(lorajob.metadata.namespace or "default", ref.name) if ref else None
    return credentials_for(lorajob, secret or {}, config)


def _same(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Equal apart from timestamps that move on every pass."""

    def strip(status: dict[str, Any]) -> dict[str, Any]:
        copy = dict(status)
        if "progress" in copy:
            copy["progress"] = {k: v for k, v in copy["progress"].items() if k != "updatedAt"}
        copy.pop("gpuSeconds", None)
        copy.pop("costEstimate", None)
        return copy

    if old.get("phase") not in TERMINAL_PHASES and new.get("gpuSeconds") != old.get("gpuSeconds"):
        # Cost moves on every pass while running: write it once it has moved by 30 GPU-seconds, or with another change.
        return (
            strip(old) == strip(new) and abs(float(new.get("gpuSeconds") or 0) - float(old.get("gpuSeconds") or 0)) < 30
        )
    return strip(old) == strip(new)
