"""GPU-seconds and cost: the trainer container's running time over every attempt; queue time is free."""

from __future__ import annotations

import datetime
import json
from typing import Any

from kubelora.operator.config import OperatorConfig
from kubelora.operator.executors import JobExecutor, observe_job
from kubelora.operator.lorajobs import derive_status
from kubelora.operator.observe import Observation, RunLedger, TrainerReport, container_runs, running_seconds
from tests.operator.test_jobspec import lorajob

NOW = datetime.datetime(2026, 1, 1, 0, 35, tzinfo=datetime.UTC)


def pod(uid: str, created: str, phase: str, *statuses: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "containerStatuses": list(statuses)}
    if reason:
        status["reason"] = reason
    return {"metadata": {"name": f"pod-{uid}", "uid": uid, "creationTimestamp": created}, "status": status}


def trainer(state: dict[str, Any], last: dict[str, Any] | None = None, restarts: int = 0) -> dict[str, Any]:
    return {"name": "trainer", "state": state, "lastState": last or {}, "restartCount": restarts}


def ran(started: str, finished: str, **extra: Any) -> dict[str, Any]:
    return {"terminated": {"startedAt": started, "finishedAt": finished, "exitCode": 1, **extra}}


# The Job was created at midnight; its first pod queued ten minutes for a GPU and ran ten; the second waited for
# the retry, ran 100 s, was restarted in place and has run three minutes since; a third (a surge) is still pending.
FIRST = pod("a", "2026-01-01T00:00:00Z", "Failed", trainer(ran("2026-01-01T00:12:00Z", "2026-01-01T00:22:00Z")))
SECOND = pod(
    "b",
    "2026-01-01T00:22:10Z",
    "Running",
    trainer(
        {"running": {"startedAt": "2026-01-01T00:32:00Z"}},
        last=ran("2026-01-01T00:30:00Z", "2026-01-01T00:31:40Z"),
        restarts=1,
    ),
    {"name": "sidecar", "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}},
)
PENDING = pod("c", "2026-01-01T00:34:00Z", "Pending", trainer({"waiting": {"reason": "ContainerCreating"}}))


def test_running_time_is_summed_over_attempts_and_restarts_and_waiting_is_free():
    assert running_seconds([FIRST, SECOND, PENDING], now=NOW) == 600 + 100 + 180
    # Not the 35 minutes since the Job was created, and not the other container's time.
    assert running_seconds([PENDING], now=NOW) == 0
    assert running_seconds([pod("d", "2026-01-01T00:00:00Z", "Pending")], now=NOW) == 0  # no status yet
    assert running_seconds([FIRST, FIRST], now=NOW) == 600  # one pod seen twice is one attempt


def test_a_run_keeps_its_key_from_running_to_terminated_to_last_state():
    started = "2026-01-01T00:30:00Z"
    running = pod("b", "2026-01-01T00:29:00Z", "Running", trainer({"running": {"startedAt": started}}))
    ended = pod("b", "2026-01-01T00:29:00Z", "Running", trainer(ran(started, "2026-01-01T00:31:00Z")))
    restarted = pod(
        "b",
        "2026-01-01T00:29:00Z",
        "Running",
        trainer({"waiting": {"reason": "CrashLoopBackOff"}}, last=ran(started, "2026-01-01T00:31:00Z"), restarts=1),
    )
    keys = {tuple(container_runs([p], now=NOW)) for p in (running, ended, restarted)}
    assert keys == {("b/" + started,)}
    ledger = RunLedger()
    for snapshot in (running, ended, restarted):
        total = ledger.record("job", container_runs([snapshot], now=NOW))
    assert total == 300  # the running value seen at NOW (00:35) is the longest; counted once, not three times


def test_the_ledger_keeps_the_time_of_a_deleted_pod_and_of_a_run_reported_shorter():
    ledger = RunLedger()
    assert ledger.record("job-1", container_runs([FIRST, SECOND], now=NOW)) == 880
    # The first attempt's pod is deleted; a minute later only the second is left to see.
    later = NOW + datetime.timedelta(minutes=1)
    assert ledger.record("job-1", container_runs([SECOND], now=later)) == 880 + 60
    # A stand-in kubelet reports a finished run as starting when it stopped: what was seen running stays.
    seen = pod("e", "2026-01-01T00:00:00Z", "Running", trainer({"running": {"startedAt": "2026-01-01T00:34:00Z"}}))
    zeroed = pod("e", "2026-01-01T00:00:00Z", "Failed", trainer(ran("2026-01-01T00:35:00Z", "2026-01-01T00:35:00Z")))
    assert ledger.record("job-2", container_runs([seen], now=NOW)) == 60
    assert ledger.record("job-2", container_runs([zeroed], now=later)) == 60
    ledger.retain({"job-2"})
    assert len(ledger) == 1 and ledger.record("job-1", {}) == 0


def test_the_executor_counts_a_failed_attempt_whose_pod_is_gone():
    executor = JobExecutor.__new__(JobExecutor)
    executor.config, executor.ledger, executor.ledger_pruned_at = OperatorConfig(), RunLedger(), 0.0
    executor.quota_checked, executor.quota_refused = {}, {}
    executor.LEDGER_PRUNE_INTERVAL = float("inf")
    job = {
        "metadata": {"name": "support-train-1234abcd", "uid": "job-1", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"active": 1, "failed": 1, "startTime": "2026-01-01T00:00:00Z"},
    }
    finished = pod("a", "2026-01-01T00:00:00Z", "Failed", trainer(ran("2026-01-01T00:12:00Z", "2026-01-01T00:22:00Z")))
    executor.bind({"u-1": [job]}, {"job-1": [finished]})
    first = executor.observe(lorajob(), {}, read_progress=False)
    executor.bind({"u-1": [job]}, {"job-1": []})  # deleted: gone from the pod index
    second = executor.observe(lorajob(), {}, read_progress=False)
    assert first.running_seconds == second.running_seconds == 600
    executor.ledger_pruned_at = float("-inf")
    executor.bind({}, {})  # the Job is gone too: its runs are forgotten on the next pass that prunes
    executor.observe(lorajob(), {}, read_progress=False)
    assert len(executor.ledger) == 0


def test_gpu_seconds_never_go_down_while_the_run_goes_on_or_when_it_ends():
    job = lorajob()  # 2 GPUs
    old = {"phase": "Training", "gpuSeconds": 1300.0, "costEstimate": "1.3000 USD"}
    running = Observation(state="Running", started_at="2026-01-01T00:00:00Z", running_seconds=100)
    status, _ = derive_status(job, old, running, OperatorConfig())
    assert status["gpuSeconds"] == 1300.0
    status, _ = derive_status(job, old, Observation(state="Running", running_seconds=700), OperatorConfig())
    assert status["gpuSeconds"] == 1400.0
    failed = Observation(state="Failed", reason="BackoffLimitExceeded", running_seconds=10)
    status, _ = derive_status(job, old, failed, OperatorConfig())
    assert status["phase"] == "Failed" and status["gpuSeconds"] == 1300.0
    # Nothing known of the run's time (its Job is gone): the recorded figures stay as they were.
    unknown, _ = derive_status(job, old, Observation(state="Failed", reason="JobDeleted"), OperatorConfig())
    assert (unknown["gpuSeconds"], unknown["costEstimate"]) == (1300.0, "1.3000 USD")


def test_an_attempt_stopped_at_its_deadline_says_so():
    job = {
        "metadata": {"name": "support-train"},
        "status": {
            "failed": 2,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                }
            ],
        },
    }
    summary = json.dumps({"reason": "Interrupted", "message": "stopped by signal 15 at step 120, checkpoint saved"})
    stopped = pod(
        "b",
        "2026-01-01T01:00:00Z",
        "Failed",
        trainer(ran("2026-01-01T01:00:05Z", "2026-01-01T02:00:00Z", exitCode=143, message=summary)),
        reason="DeadlineExceeded",
    )
    observed = observe_job(job, [FIRST, stopped], deadline_seconds=3600)
    assert observed.state == "Failed" and observed.reason == "DeadlineExceeded"
    assert observed.message.startswith("Attempt 2 exceeded its deadline of 3600s (spec.activeDeadlineSeconds")
    assert "checkpoint saved" in observed.message and "backoff limit" in observed.message
    # The trainer's own error (mirrored to S3) only knows it got a SIGTERM; the deadline is the reason.
    observed.report = TrainerReport(error={"reason": "Interrupted", "message": "stopped by signal 15"})
    status, events = derive_status(lorajob(), {"phase": "Training"}, observed, OperatorConfig())
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (status["phase"], ready["reason"]) == ("Failed", "DeadlineExceeded")
    assert "exceeded its deadline" in ready["message"] and events[0].type == "Warning"
    # An earlier attempt that hit the deadline does not explain a last attempt that failed otherwise.
    crashed = pod("c", "2026-01-01T02:01:00Z", "Failed", trainer(ran("2026-01-01T02:01:05Z", "2026-01-01T02:02:00Z")))
    other = observe_job(job, [stopped, crashed], deadline_seconds=3600)
    assert other.reason != "DeadlineExceeded" and "deadline" not in other.message
