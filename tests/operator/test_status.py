"""The LoRAJob state machine without a cluster: observations in, status and events out."""

from __future__ import annotations

from kubelora.operator.config import OperatorConfig
from kubelora.operator.lorajobs import Preflight, derive_status
from kubelora.operator.observe import Observation, TrainerReport
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
    obs = Observation(state="Running", started_at="2026-01-01T00:00:00Z", report=report)
    status, _ = derive_status(lorajob(), {"phase": "Training"}, obs, OperatorConfig())
    assert status["phase"] == "Evaluating"
    assert status["progress"]["step"] == 40
    assert status["gpuSeconds"] > 0 and status["costEstimate"].endswith(" USD")


def test_success_needs_a_published_adapter():
    obs = Observation(state="Succeeded", started_at="2026-01-01T00:00:00Z", finished_at="2026-01-01T01:00:00Z")
    status, events = derive_status(lorajob(), {"phase": "Training"}, obs, OperatorConfig())
    assert status["phase"] == "Failed" and events[0].reason == "NoResult"


def test_cost_uses_the_configured_price_for_the_gpu_type():
    report = TrainerReport(result={"adapter": ADAPTER, "eval": {"passed": True, "gates": []}})
    obs = Observation(
        state="Succeeded", started_at="2026-01-01T00:00:00Z", finished_at="2026-01-01T01:00:00Z", report=report
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
    check = Preflight(blocking=[("SecretNotFound", "spec.output.secretRef: Secret team-a/minio-creds does not exist")])
    status, events = derive_status(lorajob(), {}, Observation(state="NotStarted"), OperatorConfig(), check)
    assert status["phase"] == "Pending"
    assert events[0].type == "Warning" and "spec.output.secretRef" in events[0].message


def test_memory_that_cannot_fit_fails_before_spending_gpu_hours():
    check = Preflight(
        fatal=[("InsufficientGPUMemory", "spec.resources: estimated 300.0 GiB per GPU exceeds the 80.0 GiB")]
    )
    status, _ = derive_status(lorajob(), {}, Observation(state="NotStarted"), OperatorConfig(), check)
    assert status["phase"] == "Failed" and status["conditions"][-1]["reason"] == "InsufficientGPUMemory"
