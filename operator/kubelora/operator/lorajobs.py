"""The LoRAJob state machine: preflight checks, start the run, and turn what is observed into status.

Plain code with no kopf in it; the kopf handlers in `handlers.py` are thin wrappers.
Phases: Pending → Queued → Training → Evaluating → Succeeded | Failed.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from kubelora.api.v1alpha1 import LoRAJob
from kubelora.operator.conditions import get_condition, now, set_condition
from kubelora.operator.config import OperatorConfig
from kubelora.operator.executors import (
    CONTAINER_ERRORS,
    DEADLINE_EXCEEDED,
    QUOTA_EXCEEDED,
    Executor,
    StartRefusedError,
)
from kubelora.operator.observe import Observation
from kubelora.operator.preflight import Cluster, ObjectStore, Preflight, preflight, role_credentials, role_env

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
#: Reasons that need the user, shown as Warning events even when the phase stays the same.
_WARNING_SUFFIXES = ("NotFound", "Invalid", "Conflict", "AccessDenied", "Rejected", "Unavailable")
logger = logging.getLogger("kubelora.lorajob")


@dataclasses.dataclass
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def is_warning(reason: str) -> bool:
    return reason.endswith(_WARNING_SUFFIXES) or reason in CONTAINER_ERRORS or reason == QUOTA_EXCEEDED


def _cost(lorajob: LoRAJob, running_seconds: float, recorded: Any, config: OperatorConfig) -> tuple[float, str]:
    """GPU-seconds (the GPUs times the trainer's running time over every attempt) and their price.

    Never below `recorded`, the status's gpuSeconds so far: a failed attempt's pod, and with it the record of
    its running time, may be gone, and what was paid for stays paid for.
    """
    gpus = max(lorajob.spec.resources.gpus, 0)
    try:
        floor = float(recorded or 0)
    except (TypeError, ValueError):
        floor = 0.0
    gpu_seconds = max(round(gpus * running_seconds, 1), floor)
    price = config.price_per_hour(lorajob.spec.resources.gpu_type)
    cost = gpu_seconds / 3600 * price
    # Cents hide a short run's cost entirely; show four decimals below one dollar.
    return gpu_seconds, f"{cost:.2f} USD" if cost >= 1 else f"{cost:.4f} USD"


#: What the trainer reports of how it ran (``training`` in its progress and result events): status.training.
TRAINING_LAYOUT_KEYS = ("strategy", "nodes", "processesPerNode", "worldSize", "globalBatchSize")


def training_layout(event: dict[str, Any] | None) -> dict[str, Any] | None:
    """The strategy, world size and global batch the trainer reported in an event, in status.training's form."""
    layout = (event or {}).get("training")
    if not isinstance(layout, dict):
        return None
    kept = {k: layout[k] for k in TRAINING_LAYOUT_KEYS if layout.get(k) is not None}
    return kept or None


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

    old_ready = get_condition(conditions, "Ready") or {}
    if preflight_result is not None:
        conditions = _apply_checks(conditions, preflight_result, generation, events)
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
            _phase_events(old_phase, phase, old_ready.get("reason"), reason, message, events)
            return status, events
        conditions = set_condition(
            conditions, "Preflight", True, "ChecksPassed", _verdict(preflight_result), generation
        )

    state = observation.state
    report = observation.report
    if observation.run_name:
        status["jobName"] = observation.run_name
    status["attempts"] = observation.attempts
    if observation.started_at:
        status["startTime"] = observation.started_at
    if report.progress:
        progress = {k: v for k, v in report.progress.items() if v is not None and k != "training"}
        progress["updatedAt"] = now()
        status["progress"] = progress
    layout = training_layout(report.result) or training_layout(report.progress)
    if layout:
        status["training"] = layout

    reason, message = observation.reason, observation.message
    if state in ("NotStarted", "Pending"):
        phase = "Pending"
        reason = reason or "Starting"
        message = message or "Waiting for the trainer to start"
        if reason == QUOTA_EXCEEDED:
            # Not a failure: the Job controller (or the next pass) creates the pods once the quota allows.
            conditions = set_condition(conditions, "Scheduled", False, reason, message, generation)
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
        # An attempt stopped at its deadline: the trainer's own error only says it was interrupted.
        if report.error and reason != DEADLINE_EXCEEDED:
            reason = str(report.error.get("reason") or reason)
            message = str(report.error.get("message") or message)
        message = message or "The trainer failed"
        conditions = set_condition(conditions, "Ready", False, reason, message, generation)
        status["completionTime"] = observation.finished_at or now()

    if observation.running_seconds is not None:
        gpu_seconds, cost = _cost(lorajob, observation.running_seconds, old_status.get("gpuSeconds"), config)
        status["gpuSeconds"], status["costEstimate"] = gpu_seconds, cost
    status["phase"], status["message"], status["conditions"] = phase, message, conditions
    _phase_events(old_phase, phase, old_ready.get("reason"), reason, message, events)
    return status, events


def _apply_checks(
    conditions: list[dict[str, Any]], result: Preflight, generation: int | None, events: list[Event]
) -> list[dict[str, Any]]:
    """Each check writes its own condition, and only that one; a check that newly fails is an event."""
    for check in result.checks:
        before = get_condition(conditions, check.type) or {}
        conditions = set_condition(conditions, check.type, check.status, check.reason, check.message, generation)
        changed = (before.get("status"), before.get("reason")) != (check.status, check.reason)
        if changed and check.severity in ("warning", "blocking", "fatal"):
            events.append(Event("Warning", check.reason, check.message))
    return conditions


def _verdict(result: Preflight) -> str:
    """The Preflight message when nothing blocks: what passed, and what did not, by name; never just "fine"."""
    passed = [c.type for c in result.checks if c.status == "True"]
    warnings = [f"{c.type} {c.reason}" for c in result.checks if c.severity == "warning"]
    unknown = [f"{c.type} {c.reason}" for c in result.checks if c.status != "True" and c.severity == "info"]
    parts = [f"Nothing blocks the run; passed: {', '.join(passed) or 'none'}"]
    if warnings:
        parts.append(f"warnings: {', '.join(warnings)}")
    if unknown:
        parts.append(f"not checked: {', '.join(unknown)}")
    return "; ".join(parts)


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
    old: str | None, new: str, old_reason: str | None, reason: str, message: str, events: list[Event]
) -> None:
    """An event for every phase change, and for a new reason that needs the user while the phase stays."""
    if any(e.reason == reason for e in events):
        return  # the check that failed has said it already
    if old != new:
        kind = "Warning" if new == "Failed" or is_warning(reason) else "Normal"
        events.append(Event(kind, reason or new, f"Phase {old or 'None'} -> {new}: {message}"))
    elif reason != old_reason and is_warning(reason):
        events.append(Event("Warning", reason, message))


def needs_reconcile(status: dict[str, Any] | None, generation: int | None) -> bool:
    status = status or {}
    return status.get("phase") not in TERMINAL_PHASES or status.get("observedGeneration") != generation


def reconcile(
    lorajob: LoRAJob,
    old: dict[str, Any],
    executor: Executor,
    cluster: Cluster,
    config: OperatorConfig,
    objects: ObjectStore | None = None,
    read_progress: bool = True,
    started_runs: set[str] | None = None,
) -> tuple[dict[str, Any] | None, list[Event]]:
    """One level-based pass over `lorajob` with status `old`. Returns the status to write (None: unchanged)."""
    generation = lorajob.metadata.generation
    if not needs_reconcile(old, generation):
        return None, []
    if old.get("phase") in TERMINAL_PHASES:
        # A finished run stays finished: a spec change (only deleteOnJobDeletion may change) never starts
        # another run, whether or not its Job still exists.
        logger.info(
            "Kept finished LoRAJob lorajob=%s/%s phase=%s generation=%s",
            lorajob.metadata.namespace,
            lorajob.metadata.name,
            old.get("phase"),
            generation,
        )
        return {**{k: v for k, v in old.items() if k != "kopf"}, "observedGeneration": generation}, []
    check: Preflight | None = None
    observation = executor.observe(lorajob, {}, read_progress=False)
    run_key = lorajob.metadata.uid or lorajob.metadata.name
    if observation.state == "NotStarted" and started_runs is not None and run_key in started_runs:
        # Started moments ago; the watch has not shown the Job yet. Creating it again would only get a 409.
        return None, []
    if observation.state != "NotStarted" and started_runs is not None:
        started_runs.discard(run_key)
    if observation.state == "NotStarted" and old.get("jobName"):
        observation = lost_run(lorajob, old, executor, role_credentials(lorajob, "OUTPUT", cluster, config))
    elif observation.state == "NotStarted":
        check = preflight(lorajob, cluster, config, objects)
        if not (check.blocking or check.fatal):
            observation = _start(lorajob, executor, check, started_runs, run_key)
    else:
        # The Secret is read only when the report will be: a finished run, or a running one's progress poll.
        wanted = observation.state in ("Succeeded", "Failed") or (observation.state == "Running" and read_progress)
        credentials = role_credentials(lorajob, "OUTPUT", cluster, config) if wanted else {}
        observation = executor.observe(lorajob, credentials, read_progress=read_progress)
    status, events = derive_status(lorajob, old, observation, config, check)
    if _same(old, status):
        return None, events
    return status, events


def _start(
    lorajob: LoRAJob, executor: Executor, check: Preflight, started_runs: set[str] | None, run_key: str
) -> Observation:
    meta = lorajob.metadata
    try:
        run_name = executor.start(lorajob, role_env(check.credentials), check.estimate)
    except StartRefusedError as exc:
        logger.warning(
            "Cannot start training run lorajob=%s/%s reason=%s message=%r",
            meta.namespace,
            meta.name,
            exc.reason,
            exc.message,
        )
        return Observation(state="NotStarted", reason=exc.reason, message=exc.message)
    if started_runs is not None:
        started_runs.add(run_key)
    observation = executor.observe(lorajob, {}, read_progress=False)
    observation.run_name = observation.run_name or run_name
    logger.info("Started training run lorajob=%s/%s run=%s", meta.namespace, meta.name, observation.run_name)
    return observation


def lost_run(lorajob: LoRAJob, old: dict[str, Any], executor: Executor, credentials: dict[str, str]) -> Observation:
    """The outcome of a run whose Job vanished before the operator saw it finish (deleted, or a TTL).

    Its own report (keyed by this LoRAJob's UID) says how it ended; without one the LoRAJob fails. It never
    starts another run: that would spend the GPU hours again and overwrite a published adapter.
    """
    report = executor.read_outcome(lorajob, credentials)
    observation = Observation(
        state="Failed",
        attempts=int(old.get("attempts") or 0),
        started_at=old.get("startTime"),
        run_name=old.get("jobName"),
        report=report,
    )
    if report.result is not None:
        observation.state = "Succeeded"
    elif report.error is None:
        observation.reason = "JobDeleted"
        observation.message = (
            f"Job {old.get('jobName')} was deleted before the run finished and the run published no result; "
            "a LoRAJob does not start a second run: re-create it to train again"
        )
    logger.warning(
        "Training run gone lorajob=%s/%s run=%s outcome=%s",
        lorajob.metadata.namespace,
        lorajob.metadata.name,
        old.get("jobName"),
        observation.state,
    )
    return observation


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
