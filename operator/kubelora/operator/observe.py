"""What a training run looks like from outside: one Observation, whichever executor runs it."""

from __future__ import annotations

import dataclasses
import datetime
import json
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

RunState = Literal["NotStarted", "Pending", "Queued", "Running", "Succeeded", "Failed"]


@dataclasses.dataclass
class TrainerReport:
    """The latest of each kind of event the trainer reported (see docs/trainer.md)."""

    phase: str | None = None
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    estimate: dict[str, Any] | None = None

    def absorb(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        payload = {k: v for k, v in event.items() if k not in ("type", "time")}
        if kind == "phase":
            self.phase = str(event.get("phase"))
        elif kind == "progress":
            self.progress = payload
        elif kind == "result":
            self.result = payload
        elif kind == "error":
            self.error = payload
        elif kind == "estimate":
            self.estimate = payload

    @classmethod
    def from_events(cls, events: list[dict[str, Any]]) -> TrainerReport:
        report = cls()
        for event in events:
            report.absorb(event)
        return report

    @classmethod
    def from_jsonl(cls, path: Path) -> TrainerReport:
        events = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line being written right now
        return cls.from_events(events)

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any] | None) -> TrainerReport:
        """The S3 snapshot: either one event or a mapping of event type to its latest event."""
        report = cls()
        if not snapshot:
            return report
        if "type" in snapshot:
            report.absorb(snapshot)
            return report
        for key in ("phase", "progress", "result", "error", "estimate"):
            value = snapshot.get(key)
            if isinstance(value, dict):
                report.absorb({"type": key, **value})
            elif key == "phase" and isinstance(value, str):
                report.absorb({"type": "phase", "phase": value})
        return report


@dataclasses.dataclass
class Observation:
    state: RunState
    reason: str = ""
    message: str = ""
    attempts: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    run_name: str | None = None
    report: TrainerReport = dataclasses.field(default_factory=TrainerReport)
    #: Seconds the trainer container ran, summed over every attempt (None: not known, e.g. the Job is gone).
    running_seconds: float | None = None


def _time(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def seconds_between(start: str | None, end: str | None, now: datetime.datetime | None = None) -> float:
    """Seconds from `start` to `end` (RFC 3339), or to `now` when there is no end yet; 0 without a start."""
    if not start:
        return 0.0
    finish = _time(end) if end else (now or datetime.datetime.now(datetime.UTC))
    return max(0.0, (finish - _time(start)).total_seconds())


def container_runs(
    pods: Iterable[dict[str, Any]], container: str = "trainer", now: datetime.datetime | None = None
) -> dict[str, float]:
    """How long each run of `container` has run so far, keyed by its pod and start time (pure).

    A run lasts from the container's start (``state.running.startedAt``, ``state.terminated.startedAt``) to
    its end (``terminated.finishedAt``) or `now`; ``lastState.terminated`` is the run before a restart in
    place. Time before the container starts (queued for a GPU, pulling the image) is not a run. A run keeps
    its key from running to terminated to lastState, so it is counted once.
    """
    runs: dict[str, float] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        pod_key = meta.get("uid") or meta.get("name") or ""
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            if status.get("name") != container:
                continue
            state = status.get("state") or {}
            running = state.get("running") or {}
            ended = [state.get("terminated") or {}, (status.get("lastState") or {}).get("terminated") or {}]
            if running.get("startedAt"):
                runs[f"{pod_key}/{running['startedAt']}"] = seconds_between(running["startedAt"], None, now)
            for terminated in ended:
                started = terminated.get("startedAt")
                if started:
                    # No finishedAt (never seen from a kubelet): only what was seen running is known.
                    finished = terminated.get("finishedAt") or started
                    runs.setdefault(f"{pod_key}/{started}", seconds_between(started, finished, now))
    return runs


def running_seconds(
    pods: Iterable[dict[str, Any]], container: str = "trainer", now: datetime.datetime | None = None
) -> float:
    """Seconds `container` ran, summed over every pod (attempt) and every restart in place (pure)."""
    return sum(container_runs(pods, container, now).values())


class RunLedger:
    """The longest each container run of a Job was seen to last, so that its time stays counted.

    A failed attempt's pod may be deleted (by hand, by pod garbage collection, with its node), and a stand-in
    kubelet may report a finished run shorter than it was seen running. In memory only: across operator
    restarts the LoRAJob's recorded ``status.gpuSeconds`` is the floor.
    """

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def record(self, job_uid: str, runs: dict[str, float]) -> float:
        """Remember `runs` of this Job; the seconds of every run of it seen so far."""
        with self._lock:
            seen = self._runs.setdefault(job_uid, {})
            for key, seconds in runs.items():
                if seconds > seen.get(key, -1.0):
                    seen[key] = seconds
            return sum(seen.values())

    def retain(self, job_uids: set[str]) -> None:
        """Forget the Jobs that are gone."""
        with self._lock:
            for uid in [uid for uid in self._runs if uid not in job_uids]:
                del self._runs[uid]

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)
