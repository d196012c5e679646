"""The LoRAJob state machine without a cluster: observations in, status and events out."""

from __future__ import annotations

from kubelora.operator.config import OperatorConfig
from kubelora.operator.lorajobs import derive_status
from kubelora.operator.observe import Observation, TrainerReport
from kubelora.operator.preflight import Check, Preflight
from tests.operator.test_jobspec import lorajob

ADAPTER = {
    "uri": "s3://adapters/x/",
    "digest": "sha256:" + "ab" * 32,
    "sizeBytes": 10,
    "trainableParameters": 5,
    "rank": 16,
    "baseModel": "llama",
}


def test_queued_carries_the_scheduler_message():
    obs = Observation(
        state="Queued", reason="Unschedulable", message="0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    )
    status, events = derive_status(lorajob(), {"phase": "Pending"}, obs, OperatorConfig())
    assert status["phase"] == "Queued"
    scheduled = next(c for c in status["conditions"] if c["type"] == "Scheduled")
    assert scheduled["status"] == "False" and "Insufficient nvidia.com/gpu" in scheduled["message"]
    assert [e.reason for e in events] == ["Unschedulable"]


def test_trainer_phase_and_progress_reach_status():
    report = TrainerReport(phase="Evaluating", progress={"step": 40, "totalSteps": 40, "loss": 0.1})
    obs = Observation(state="Running", started_at="2026-01-01T00:00:00Z", report=report, running_seconds=90)
    status, _ = derive_status(lorajob(), {"phase": "Training"}, obs, OperatorConfig())
    assert status["phase"] == "Evaluating"
    assert status["progress"]["step"] == 40
    assert status["gpuSeconds"] == 180.0 and status["costEstimate"].endswith(" USD")


def test_success_needs_a_published_adapter():
    obs = Observation(state="Succeeded", started_at="2026-01-01T00:00:00Z", finished_at="2026-01-01T01:00:00Z")
    status, events = derive_status(lorajob(), {"phase": "Training"}, obs, OperatorConfig())
    assert status["phase"] == "Failed" and events[0].reason == "NoResult"


def test_cost_uses_the_configured_price_for_the_gpu_type():
    report = TrainerReport(result={"adapter": ADAPTER, "eval": {"passed": True, "gates": []}})
    # The Job started at midnight but its pods queued for an hour: only the hour the trainer ran is paid for.
    obs = Observation(
        state="Succeeded",
        started_at="2026-01-01T00:00:00Z",
        finished_at="2026-01-01T02:00:00Z",
        report=report,
        running_seconds=3600,
    )
    config = OperatorConfig(gpu_prices_per_hour={"NVIDIA-A100-SXM4-80GB": 2.5})
    status, _ = derive_status(lorajob(), {"phase": "Evaluating"}, obs, config)
    assert status["phase"] == "Succeeded"
    assert status["gpuSeconds"] == 7200.0 and status["costEstimate"] == "5.00 USD"
    assert status["adapter"]["shortDigest"] == "ab" * 6
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


def test_failed_gate_fails_the_job_and_names_the_gate():
    gates = [
        {
            "metric": "exact_match",
            "rule": "min",
            "threshold": 0.9,
            "value": 0.3,
            "passed": False,
            "message": "exact_match 0.300 < min 0.900",
        }
    ]
    report = TrainerReport(result={"adapter": ADAPTER, "eval": {"passed": False, "gates": gates}})
    obs = Observation(
        state="Succeeded", started_at="2026-01-01T00:00:00Z", finished_at="2026-01-01T00:10:00Z", report=report
    )
    status, events = derive_status(lorajob(), {"phase": "Evaluating"}, obs, OperatorConfig())
    assert status["phase"] == "Failed" and "exact_match 0.300 < min 0.900" in status["message"]
    assert events[0].type == "Warning" and events[0].reason == "GatesFailed"
    assert status["adapter"]["digest"] == ADAPTER["digest"]


def test_missing_secret_blocks_without_failing():
    message = "spec.output.secretRef: Secret team-a/minio-creds does not exist"
    check = Preflight([Check("SecretsFound", "False", "SecretNotFound", message, "blocking")])
    status, events = derive_status(lorajob(), {}, Observation(state="NotStarted"), OperatorConfig(), check)
    assert status["phase"] == "Pending"
    assert [(e.type, e.reason, e.message) for e in events] == [("Warning", "SecretNotFound", message)]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["SecretsFound"]["status"] == "False" and conditions["Ready"]["reason"] == "SecretNotFound"
    # Checked again while still missing: no second event.
    _, again = derive_status(lorajob(), status, Observation(state="NotStarted"), OperatorConfig(), check)
    assert again == []


def test_memory_that_cannot_fit_fails_before_spending_gpu_hours():
    message = "spec.resources: estimated 300.0 GiB per GPU exceeds the 80.0 GiB"
    check = Preflight([Check("MemoryFits", "False", "InsufficientGPUMemory", message, "fatal")])
    status, _ = derive_status(lorajob(), {}, Observation(state="NotStarted"), OperatorConfig(), check)
    assert status["phase"] == "Failed" and status["conditions"][-1]["reason"] == "InsufficientGPUMemory"


def test_a_warning_is_not_overwritten_by_a_passing_verdict():
    """Each check owns its condition type; Preflight is the verdict and never calls a warning fine."""
    warning = Check("MemoryFits", "Unknown", "EstimateUnavailable", "cannot estimate: KeyError", "warning")
    check = Preflight(
        [Check("SecretsFound", "True", "SecretsFound", "ok"), warning, Check("InputsFound", "True", "InputsFound", "")]
    )
    status, events = derive_status(lorajob(), {}, Observation(state="NotStarted"), OperatorConfig(), check)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["MemoryFits"]["reason"] == "EstimateUnavailable"
    assert conditions["Preflight"]["status"] == "True"
    assert (
        "EstimateUnavailable" in conditions["Preflight"]["message"] and "fine" not in conditions["Preflight"]["message"]
    )
    assert ("Warning", "EstimateUnavailable") in [(e.type, e.reason) for e in events]
    # The next pass (the run has started) leaves every check's condition as its check wrote it.
    running = Observation(state="Running", started_at="2026-01-01T00:00:00Z")
    later, _ = derive_status(lorajob(), status, running, OperatorConfig())
    assert {c["type"]: c for c in later["conditions"]}["MemoryFits"] == conditions["MemoryFits"]


def test_a_new_reason_that_needs_the_user_is_an_event_while_the_phase_stays():
    pending = {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False", "reason": "Starting"}]}
    conflict = Observation(state="NotStarted", reason="JobNameConflict", message="Job team-a/x exists")
    status, events = derive_status(lorajob(), pending, conflict, OperatorConfig())
    assert status["phase"] == "Pending" and "jobName" not in status
    assert [(e.type, e.reason) for e in events] == [("Warning", "JobNameConflict")]
    _, again = derive_status(lorajob(), status, conflict, OperatorConfig())
    assert again == []
