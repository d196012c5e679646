"""Run the real operator as a subprocess against the dev cluster, and talk to LoRAJobs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kubelora.devenv import cluster
from tests.conftest import REPO, wait_for

GROUP, VERSION = "kubelora.dev", "v1alpha1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def install_crds(devenv: cluster.DevEnv) -> None:
    cluster.kubectl(devenv, "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    for crd in ("lorajobs.kubelora.dev", "adapterdeployments.kubelora.dev"):
        cluster.kubectl(devenv, "wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")


class OperatorProcess:
    """`kubelora operator` in a child process, killable at any moment."""

    def __init__(self, devenv: cluster.DevEnv, namespace: str, workdir: Path, **config: Any) -> None:
        self.devenv = devenv
        self.namespace = namespace
        self.workdir = workdir
        self.config_path = workdir / "operator-config.yaml"
        settings = {
            "trainerImage": "kubelora/trainer:test",
            "defaultS3Endpoint": devenv.minio_endpoint,
            "progressIntervalSeconds": 1,
        }
        settings.update(config)
        self.config_path.write_text(yaml.safe_dump(settings))
        self.log_path = workdir / "operator.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.health_port = 0
        self.metrics_port = 0

    def start(self) -> None:
        self.health_port, self.metrics_port = free_port(), free_port()
        env = {**os.environ, **{k: v for k, v in self.devenv.env().items() if k != "PATH"}}
        env["KUBELORA_RECONCILE_INTERVAL"] = env.get("KUBELORA_RECONCILE_INTERVAL", "1")
        command = [sys.executable, "-m", "kubelora.cli", "operator", "--namespace", self.namespace]
        command += [
            "--config",
            str(self.config_path),
            "--health-port",
            str(self.health_port),
            "--metrics-port",
            str(self.metrics_port),
        ]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        wait_for("the operator's /healthz", self.healthy, timeout=60)

    def healthy(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"Operator exited; log:\n{self.log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def lorajob_manifest(name: str, bucket: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "baseModel": {"uri": f"s3://{bucket}/base/", "secretRef": {"name": "minio-creds"}},
        "dataset": {"train": f"s3://{bucket}/data/train.jsonl", "secretRef": {"name": "minio-creds"}},
        "method": "lora",
        "training": {"maxSteps": 10},
        "resources": {"gpus": 1},
        "output": {"uri": f"s3://{bucket}/adapters/{name}/", "secretRef": {"name": "minio-creds"}},
        "retries": 1,
    }
    body.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRAJob", "metadata": {"name": name}, "spec": body}


#: A small model's config.json: enough for preflight to find the model and size it (kwok pods train nothing).
TINY_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 512,
}


def seed_inputs(minio_client: Any, bucket: str) -> None:
    """The base model's config.json and the training file that `lorajob_manifest` names, for preflight."""
    import io

    for key, data in (
        ("base/config.json", json.dumps(TINY_CONFIG).encode()),
        (
            "data/train.jsonl",
            b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n',
        ),
    ):
        minio_client.put_object(bucket, key, io.BytesIO(data), len(data))


def create_s3_secret(kubectl: Any, namespace: str, devenv: cluster.DevEnv, name: str = "minio-creds") -> None:
    kubectl(
        "create", "secret", "generic", name, "-n", namespace,
        f"--from-literal=accessKey={devenv.minio_access_key}",
        f"--from-literal=secretKey={devenv.minio_secret_key}",
        f"--from-literal=endpoint={devenv.minio_endpoint}",
    )  # fmt: skip


def get(kubectl: Any, namespace: str, kind: str, name: str) -> dict[str, Any]:
    return dict(json.loads(kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout))


def phase(kubectl: Any, namespace: str, name: str) -> str | None:
    return get(kubectl, namespace, "lorajob", name).get("status", {}).get("phase")


def wait_phase(kubectl: Any, namespace: str, name: str, *phases: str, timeout: float = 90) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        obj = get(kubectl, namespace, "lorajob", name)
        return obj if obj.get("status", {}).get("phase") in phases else None

    return dict(wait_for(f"LoRAJob {name} to reach {phases}", reached, timeout=timeout))


def job_of(kubectl: Any, namespace: str, lorajob: str) -> dict[str, Any]:
    """The Job the LoRAJob's status names, once it names one."""
    name = wait_for(
        f"LoRAJob {lorajob} to name its Job",
        lambda: get(kubectl, namespace, "lorajob", lorajob).get("status", {}).get("jobName"),
    )
    return dict(wait_for(f"Job {name}", lambda: get(kubectl, namespace, "job", name)))


def pods_of(kubectl: Any, namespace: str, lorajob: str) -> list[dict[str, Any]]:
    from kubelora.operator.names import label_value

    selector = f"kubelora.dev/lorajob={label_value(lorajob)}"
    out = kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    return list(json.loads(out)["items"])
