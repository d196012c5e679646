"""A container's state and status, its exit code from buildah's, and its termination message."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path
from typing import Any

# The kubelet's limits (pkg/kubelet/container): message file bytes, log fallback lines and bytes.
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LINES = 80
FALLBACK_BYTES = 2048
# Go's names of signals, as buildah prints them ("subprocess exited on killed").
_SIGNALS = {
    "hangup": 1,
    "interrupt": 2,
    "quit": 3,
    "illegal instruction": 4,
    "trace/breakpoint trap": 5,
    "aborted": 6,
    "bus error": 7,
    "floating point exception": 8,
    "killed": 9,
    "user defined signal 1": 10,
    "segmentation fault": 11,
    "user defined signal 2": 12,
    "broken pipe": 13,
    "alarm clock": 14,
    "terminated": 15,
}
# What buildah appends to the container's output when the command fails (it shares the output).
_TRAILER = re.compile(
    rb"(?:process failed to start with error: (?P<start>[^\n]*?)(?:process exited with error: [^\n]*?)?)?"
    rb"subprocess exited (?:with status (?P<status>\d+)|on (?P<signal>[a-z0-9 /]+))\n"
    rb"(?:subprocess exited with status \d+\n)*(?:Error: [^\n]*\n)?\Z"
)


# ------------------------------------------------------------------------------------------------------------
# Containers


@dataclasses.dataclass
class Probe:
    spec: dict[str, Any]
    kind: str  # readiness | liveness | startup
    result: bool
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0


@dataclasses.dataclass
class Container:
    spec: dict[str, Any]
    init: bool
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    restart_count: int = 0
    last_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    exit_code: int | None = None
    started_at: str = ""
    finished_at: str = ""
    image_id: str = ""
    container_id: str = ""
    process: subprocess.Popen[bytes] | None = None
    working: str = ""  # buildah working container name
    log_path: Path | None = None
    runtime_log: Path | None = None  # buildah's own output, when the container's goes to log_path directly
    termination_file: Path | None = None
    started_mono: float = 0.0
    next_try: float = 0.0
    failures: int = 0  # consecutive start/config failures, for the retry backoff
    kill_reason: str = ""
    first_output: float | None = None
    probes: dict[str, Probe] = dataclasses.field(default_factory=dict)
    events: set[tuple[str, str]] = dataclasses.field(default_factory=set)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def ready(self) -> bool:
        if self.init and self.state == "terminated":
            return self.exit_code == 0  # a completed init container is ready, as the kubelet reports it
        if self.state != "running":
            return False
        started = self.probes["startup"].result if "startup" in self.probes else True
        readiness = self.probes["readiness"].result if "readiness" in self.probes else True
        return started and readiness

    @property
    def started(self) -> bool:
        if self.state != "running":
            return False
        return self.probes["startup"].result if "startup" in self.probes else True

    def terminated_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "exitCode": self.exit_code if self.exit_code is not None else 0,
            "reason": self.reason,
            "startedAt": self.started_at or None,
            "finishedAt": self.finished_at or None,
        }
        if self.message:
            state["message"] = self.message
        if self.container_id:
            state["containerID"] = self.container_id
        return state

    def status(self) -> dict[str, Any]:
        if self.state == "running":
            state: dict[str, Any] = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated_state()}
        else:
            waiting: dict[str, Any] = {"reason": self.reason}
            if self.message:
                waiting["message"] = self.message
            state = {"waiting": waiting}
        entry: dict[str, Any] = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": self.image_id,
            "ready": self.ready,
            "restartCount": self.restart_count,
            "started": self.started,
            "state": state,
            "lastState": self.last_state,
        }
        if self.container_id and self.state != "waiting":
            entry["containerID"] = self.container_id
        return entry


def parse_exit(returncode: int, log_path: Path | None) -> tuple[int, str | None]:
    """The container's exit code from buildah's, and a StartError message when it never started.

    buildah exits with the container's code, but says how the container ended on the shared output
    (``subprocess exited with status N`` / ``on killed``); that trailer is removed from the log.
    """
    if returncode == 0:
        return 0, None
    if returncode < 0:
        return 128 - returncode, None
    if log_path is not None and log_path.is_file():
        with log_path.open("rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = max(0, size - 16384)
            handle.seek(start)
            tail = handle.read()
            match = _TRAILER.search(tail)
            if match:
                handle.truncate(start + match.start())
                if match.group("start") is not None:
                    return 128, match.group("start").decode(errors="replace")
                if match.group("status") is not None:
                    return int(match.group("status")), None
                return 128 + _SIGNALS.get(match.group("signal").decode(), 0), None
    if returncode == 125:
        return 128, _tail_text(log_path, 1, 1024) or "buildah run failed"
    return returncode, None


def _tail_text(path: Path | None, lines: int, limit: int) -> str:
    if path is None or not path.is_file():
        return ""
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - 65536))
        data = handle.read()
    text = b"".join(data.splitlines(keepends=True)[-lines:])
    return text[-limit:].decode(errors="replace").strip("\n") if lines == 1 else text[-limit:].decode(errors="replace")


def termination_message(container: Container, exit_code: int) -> str:
    """The termination message file (up to 4096 bytes), else with FallbackToLogsOnError and a failure, the
    last 80 lines / 2048 bytes of the log."""
    message = ""
    if container.termination_file is not None and container.termination_file.is_file():
        with container.termination_file.open("rb") as handle:
            message = handle.read(MAX_TERMINATION_MESSAGE).decode(errors="replace")
    if not message and exit_code != 0 and container.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        message = _tail_text(container.log_path, FALLBACK_LINES, FALLBACK_BYTES)
    return message
