"""What a training run looks like from outside: one Observation, whichever executor runs it."""

from __future__ import annotations

import dataclasses
import json
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
