"""Step 8, report: machine-readable events plus human-readable console output.

Events are JSON objects, one a line, appended to ``--report-file``; the latest state is mirrored to
``<output>/_kubelora/<run>/progress.json`` at most every ``KUBELORA_PROGRESS_INTERVAL`` seconds (default 5),
and the terminal event (``result`` or ``error``) to ``<output>/_kubelora/<run>/result.json`` and, when
writable, to the termination log (``/dev/termination-log``, ``KUBELORA_TERMINATION_LOG`` overrides)
as a compact summary. ``<run>/`` is the LoRAJob's UID (``KUBELORA_LORAJOB_UID``, set by the operator), so a
LoRAJob re-created with the same output never reads its predecessor's report; without a UID there is none.
See docs/trainer.md for the schema.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kubelora.api.v1alpha1 import AdapterArtifact, EvalResults, TrainingProgress, dump
from kubelora.storage import Location, Store

log = logging.getLogger("kubelora.trainer")

TERMINATION_LOG_LIMIT = 4096
SCHEMA_VERSION = 1
REPORT_DIR = "_kubelora"


def report_dir(run: str | None = None) -> tuple[str, ...]:
    """Where under the output the report goes: ``_kubelora/<run>`` for a LoRAJob's run, else ``_kubelora``."""
    run = os.environ.get("KUBELORA_LORAJOB_UID", "") if run is None else run
    if run and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}", run):
        run = hashlib.sha256(run.encode()).hexdigest()[:32]  # never a path of its own
    return (REPORT_DIR, run) if run else (REPORT_DIR,)


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        s = f"{v:.4g}"
    elif isinstance(v, (dict, list)):
        s = json.dumps(v, separators=(",", ":"))
    else:
        s = str(v)
    if s == "" or any(c in s for c in ' "='):
        s = json.dumps(s)
    return s


def kv(message: str, /, **fields: Any) -> str:
    """``Message key=value ...``: the Kubernetes log style."""
    parts = [message] + [f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


class _KVFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        return f"{ts}Z {record.levelname} {record.getMessage()}"


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KVFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("kubelora").setLevel(level)


class Console:
    """A rich progress bar on a TTY, plain key=value lines (at most every few seconds) otherwise."""

    def __init__(self, tty: bool | None = None, line_interval: float = 5.0) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.line_interval = line_interval
        self._last_line = 0.0
        self._bar: Any = None
        self._task: Any = None

    def progress(self, p: TrainingProgress, final: bool = False) -> None:
        if self.tty:
            self._rich(p)
            return
        now = time.monotonic()
        if final or now - self._last_line >= self.line_interval or p.step == 1:
            self._last_line = now
            log.info(
                kv(
                    "Training progress",
                    step=p.step,
                    totalSteps=p.total_steps,
                    epoch=round(p.epoch, 3) if p.epoch is not None else None,
                    loss=p.loss,
                    evalLoss=p.eval_loss,
                    tokensPerSecond=round(p.tokens_per_second, 1) if p.tokens_per_second else None,
                    etaSeconds=round(p.eta_seconds) if p.eta_seconds is not None else None,
                    percent=round(p.percent, 1) if p.percent is not None else None,
                )
            )

    def _rich(self, p: TrainingProgress) -> None:
        from rich.console import Console as RichConsole
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self._bar is None:
            self._bar = Progress(
                TextColumn("[bold]Training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss={task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeRemainingColumn(),
                console=RichConsole(stderr=True),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=p.total_steps, loss="-", tps="-")
        self._bar.update(
            self._task,
            completed=p.step,
            total=p.total_steps,
            loss=f"{p.loss:.4f}" if p.loss is not None else "-",
            tps=f"{p.tokens_per_second:.0f}" if p.tokens_per_second else "-",
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class Reporter:
    """Writes events; never lets a reporting failure break training (it logs a warning instead)."""

    def __init__(
        self,
        report_file: Path | None = None,
        mirror: tuple[Store, Location] | None = None,
        *,
        interval: float | None = None,
        termination_log: Path | None = None,
        console: Console | None = None,
        enabled: bool = True,
    ) -> None:
        #: False on every process but rank 0 of a distributed run: events stay in memory, nothing is written
        #: (report file, mirror, termination log) and no progress is logged.
        self.enabled = enabled
        #: The run's layout (strategy, nodes, processesPerNode, worldSize, globalBatchSize), added to progress
        #: events as ``training`` once known.
        self.training: dict[str, Any] | None = None
        self.report_file = report_file if enabled else None
        self.mirror = mirror
        self.report_dir = report_dir()
        self.interval = float(os.environ.get("KUBELORA_PROGRESS_INTERVAL", "5")) if interval is None else interval
        self.termination_log = termination_log or Path(
            os.environ.get("KUBELORA_TERMINATION_LOG", "/dev/termination-log")
        )
        self.console = console or Console()
        #: progress events go to the report file at most this often (the snapshot is always current)
        self.event_interval = float(os.environ.get("KUBELORA_PROGRESS_EVENT_INTERVAL", "1"))
        self._last_progress_event = 0.0
        self.phase_name: str | None = None
        self.last_progress: TrainingProgress | None = None
        self.latest: dict[str, dict[str, Any]] = {}  # event type -> latest event (the snapshot)
        self._last_mirror = 0.0
        self._dirty = False
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        if report_file is not None:
            report_file.parent.mkdir(parents=True, exist_ok=True)

    # -- low level -------------------------------------------------------------------------------
    def emit(self, event: dict[str, Any]) -> dict[str, Any]:
        event = {"type": event["type"], "time": now_iso(), **{k: v for k, v in event.items() if k != "type"}}
        with self._lock:
            self.events.append(event)
            self.latest[event["type"]] = event
            if self.report_file is not None:
                try:
                    with self.report_file.open("a") as f:
                        f.write(json.dumps(event, separators=(",", ":")) + "\n")
                        f.flush()
                except OSError as e:
                    log.warning(kv("Cannot write report file", path=str(self.report_file), error=str(e)))
        return event

    def _put(self, name: str, body: dict[str, Any]) -> None:
        if self.mirror is None or not self.enabled:
            return
        store, out = self.mirror
        try:
            store.put_bytes(out.child(*self.report_dir, name), json.dumps(body, indent=1).encode())
        except Exception as e:  # reporting must not fail the run
            log.warning(kv("Cannot mirror report", file=name, error=str(e)))

    def _snapshot(self) -> dict[str, Any]:
        """``progress.json``: the latest event of each type, keyed by type (without ``type``)."""
        snap: dict[str, Any] = {"schemaVersion": SCHEMA_VERSION, "updatedAt": now_iso()}
        for kind, event in self.latest.items():
            snap[kind] = {k: v for k, v in event.items() if k != "type"}
        return snap

    def forget_previous_result(self) -> None:
        """Remove ``result.json`` of an earlier attempt at the same output."""
        if self.mirror is None or not self.enabled:
            return
        store, out = self.mirror
        try:
            store.delete(out.child(*self.report_dir, "result.json"))
        except Exception as e:
            log.warning(kv("Cannot remove the previous result", error=str(e)))

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._dirty and (force or now - self._last_mirror >= self.interval):
            self._dirty = False
            self._last_mirror = now
            self._put("progress.json", self._snapshot())

    # -- events ----------------------------------------------------------------------------------
    def phase(self, phase: str, step: str | None = None) -> None:
        changed = phase != self.phase_name
        self.phase_name = phase
        self.emit({"type": "phase", "phase": phase, **({"step": step} if step else {})})
        log.info(kv("Phase", phase=phase, step=step))
        if changed:
            self._dirty = True
            self.flush(force=True)

    def progress(self, p: TrainingProgress, final: bool = False) -> None:
        p = p.model_copy(update={"updated_at": now_iso()})
        self.last_progress = p
        event = {"type": "progress", **dump(p)}
        if self.training is not None:
            event["training"] = dict(self.training)
        now = time.monotonic()
        if final or now - self._last_progress_event >= self.event_interval:
            self._last_progress_event = now
            self.emit(event)
        else:
            self.latest["progress"] = event
        if self.enabled:
            self.console.progress(p, final=final)
        self._dirty = True
        self.flush(force=final)

    def info(self, type_: str, message: str | None = None, *, mirror: bool = False, **fields: Any) -> None:
        """Other events (estimate, checkpoint, resumed, ...): recorded, logged, and mirrored if asked."""
        self.emit({"type": type_, **fields})
        if message:
            flat = {k: v for k, v in fields.items() if not isinstance(v, (dict, list))}
            log.info(kv(message, **flat))
        if mirror:
            self._dirty = True
            self.flush(force=True)

    def result(self, eval_results: EvalResults | None, adapter: AdapterArtifact, **extra: Any) -> dict[str, Any]:
        self.console.close()
        body: dict[str, Any] = {"type": "result"}
        if eval_results is not None:
            body["eval"] = dump(eval_results)
        body["adapter"] = dump(adapter)
        body.update(extra)
        event = self.emit(body)
        self.flush(force=True)
        self._put("result.json", event)
        passed = eval_results is None or eval_results.passed
        summary: dict[str, Any] = {
            "reason": "Succeeded" if passed else "GatesFailed",
            "digest": adapter.digest,
            "uri": adapter.uri,
            "passed": passed,
        }
        if eval_results is not None:
            summary["failedGates"] = [f"{g.metric}:{g.rule}" for g in eval_results.gates if not g.passed]
            summary["adapter"] = eval_results.adapter
        self._terminate(summary)
        log.info(kv("Finished", reason=summary["reason"], uri=adapter.uri, digest=adapter.digest))
        return event

    def error(self, reason: str, message: str) -> dict[str, Any]:
        self.console.close()
        event = self.emit({"type": "error", "reason": reason, "message": message})
        self.flush(force=True)
        self._put("result.json", event)
        self._terminate({"reason": reason, "message": message})
        log.error(kv("Failed", reason=reason, message=message))
        return event

    def _terminate(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        path = self.termination_log
        overridden = "KUBELORA_TERMINATION_LOG" in os.environ
        if not (path.exists() and os.access(path, os.W_OK)) and not (overridden and os.access(path.parent, os.W_OK)):
            return
        text = json.dumps(summary, separators=(",", ":"))
        if len(text) > TERMINATION_LOG_LIMIT:
            small: dict[str, Any] = {k: summary[k] for k in ("reason", "digest", "uri", "passed") if k in summary}
            if "message" in summary:
                small["message"] = str(summary["message"])[:2000]
            text = json.dumps(small, separators=(",", ":"))[:TERMINATION_LOG_LIMIT]
        with contextlib.suppress(OSError):
            path.write_text(text)

    def close(self) -> None:
        self.console.close()
        self.flush(force=True)
