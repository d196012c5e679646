"""Helpers for the trainer tests: tiny-task specs and running ``python -m kubelora.trainer``."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class TinyKit:
    root: Path
    model: Path
    train: Path
    test: Path
    regression: Path
    shuffled_train: Path


def make_spec(
    *,
    base: str,
    train: str,
    output: str,
    test: str | None = None,
    regression: str | None = None,
    method: str = "lora",
    max_steps: int = 160,
    checkpoint_every: int = 40,
    gates: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A LoRAJob manifest sized for the tiny task (learns it in ~150 steps)."""
    spec: dict[str, Any] = {
        "baseModel": {"uri": base},
        "dataset": {"train": train, "format": "chat"},
        "method": method,
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "maxSteps": max_steps,
            "learningRate": 0.005,
            "batchSize": 16,
            "maxSeqLength": 64,
            "checkpointEverySteps": checkpoint_every,
            "gradientCheckpointing": False,
            "warmupRatio": 0.05,
            "seed": 7,
        },
        "output": {"uri": output},
    }
    if test is not None:
        spec["eval"] = {
            "testSet": test,
            "metrics": ["exact_match", "accuracy", "f1"],
            "labels": ["billing", "technical", "account", "shipping"],
            "maxNewTokens": 4,
            "samplePredictions": 10,
            "gates": gates
            if gates is not None
            else [{"metric": "exact_match", "min": 0.8}, {"metric": "exact_match", "minImprovementOverBase": 0.5}],
        }
        if regression is not None:
            spec["eval"]["regression"] = {"dataset": regression, "maxLossIncrease": 10.0}
    for path, value in overrides.items():
        node = spec
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRAJob", "metadata": {"name": "t"}, "spec": spec}


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    report: Path

    @property
    def events(self) -> list[dict[str, Any]]:
        return read_events(self.report)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    @property
    def result(self) -> dict[str, Any]:
        found = self.of("result")
        assert found, f"no result event; rc={self.returncode}\n{self.stderr[-3000:]}"
        return found[-1]

    @property
    def error(self) -> dict[str, Any]:
        found = self.of("error")
        assert found, f"no error event; rc={self.returncode}\n{self.stderr[-3000:]}"
        return found[-1]


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # being written
    return out


def trainer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "KUBELORA_PROGRESS_INTERVAL": "0.5"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer")])
    env.update(extra or {})
    return env


def write_spec(directory: Path, manifest: dict[str, Any], name: str = "spec.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(yaml.safe_dump(manifest) if name.endswith((".yaml", ".yml")) else json.dumps(manifest))
    return path


def start_trainer(
    spec: Path, workdir: Path, report: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubelora.trainer",
            "--spec",
            str(spec),
            "--report-file",
            str(report),
            "--workdir",
            str(workdir),
            *args,
        ],
        env=trainer_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_trainer(
    tmp: Path,
    manifest: dict[str, Any],
    env: dict[str, str] | None = None,
    timeout: float = 300,
    name: str = "run",
    args: tuple[str, ...] = (),
) -> Run:
    d = tmp / name
    spec = write_spec(d, manifest)
    report = d / "report.jsonl"
    proc = start_trainer(spec, d / "work", report, env, args)
    out, err = proc.communicate(timeout=timeout)
    return Run(proc.returncode, out, err, report)


def s3_bytes(client: Any, bucket: str, key: str) -> bytes:
    resp = client.get_object(bucket, key)
    try:
        return bytes(resp.read())
    finally:
        resp.close()
        resp.release_conn()


def s3_json(client: Any, bucket: str, key: str) -> Any:
    return json.loads(s3_bytes(client, bucket, key))


def wait_for(description: str, check: Any, timeout: float = 120.0, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy."""
    import time

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {description}; last={last!r}")
