"""`make demo`: the whole kubelora story on one machine.

1. The local control plane (kwok GPU nodes) and MinIO come up, and the operator runs.
2. A tiny base model and a synthetic support-ticket dataset are uploaded.
3. Two LoRAJobs train for real on the CPU through the production path: the operator creates a Job
   per LoRAJob, its pod lands on a kwok GPU node, and the podrunner (playing the kubelet) runs the
   trainer container from the trainer image built from images/Dockerfile.trainer. One trains on the
   true labels, one on shuffled labels.
4. Evaluation against the base model is printed; the shuffled job fails its gate.
5. Real vLLM pods (its CPU build, with the adapter agent) serve the base model; an AdapterDeployment goes
   canary → Ready, and the one for the shuffled job is refused.
6. A completion from the adapter, through the OpenAI client.
7. A summary of times and metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kubelora.devenv import cluster
from kubelora.serving import vllm

NAMESPACE = "kubelora-demo"
BUCKET = "kubelora-demo"
SERVED_NAME = "support-tickets"
REPO = Path(__file__).resolve().parents[2]
# Wide enough for the tables when the output is a log, not a terminal.
console = Console(width=None if sys.stdout.isatty() else 120)


class Demo:
    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []
        self.workdir = cluster.state_dir() / "demo"
        self.env: cluster.DevEnv | None = None
        self.operator: subprocess.Popen[bytes] | None = None
        self.runner: Any = None
        self.kubelet: Any = None
        self.images: dict[str, str] = {}

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        console.rule(f"[bold]{title}")
        started = time.monotonic()
        yield
        self.timings.append((title, time.monotonic() - started))

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.env is not None
        result = cluster.kubectl(self.env, *args, input=input, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return dict(json.loads(self.kubectl("get", kind, name, "-n", NAMESPACE, "-o", "json").stdout))

    def wait(self, description: str, check: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"Timed out after {timeout:.0f}s waiting for {description}")

    # 1. Environment and operator
    def bring_up(self) -> None:
        from kubelora.devenv import images, podrunner

        with self.step("1. Local control plane with fake GPU nodes, MinIO, the images, and the operator"):
            self.images = images.ensure_images()
            for name, ref in self.images.items():
                console.print(f"Image {name}: {ref}")
            self.env = cluster.up()
            console.print(cluster.describe(self.env))
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
            for crd in ("lorajobs.kubelora.dev", "adapterdeployments.kubelora.dev"):
                self.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
            if self.kubectl("get", "namespace", NAMESPACE, check=False).returncode == 0:
                self.remove_earlier_run()
            self.kubectl("create", "namespace", NAMESPACE)
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir.mkdir(parents=True)
            self.kubectl(
                "create", "secret", "generic", "minio-creds", "-n", NAMESPACE,
                f"--from-literal=accessKey={self.env.minio_access_key}",
                f"--from-literal=secretKey={self.env.minio_secret_key}",
                f"--from-literal=endpoint={self.env.minio_endpoint}",
            )  # fmt: skip
            self.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(agent_token_secret()))
            self.start_operator()
            # The kubelet for this namespace's pods: each container runs from its image.
            self.kubelet = podrunner.image_runner(self.env, self.workdir / "kubelet", namespace=NAMESPACE).start()

    def remove_earlier_run(self) -> None:
        """An earlier demo's objects hold finalizers that only a running operator removes; the servers
        they would unload from are gone with that demo, so drop the finalizers and the namespace."""
        for kind in ("adapterdeployments", "lorajobs"):
            names = self.kubectl("get", kind, "-n", NAMESPACE, "-o", "name", check=False).stdout.split()
            for name in names:
                patch = '{"metadata":{"finalizers":null}}'
                self.kubectl("patch", name, "-n", NAMESPACE, "--type=merge", "-p", patch, check=False)
        self.kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=120s")

    def start_operator(self) -> None:
        assert self.env is not None
        config = self.workdir / "operator.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "executor": "job",
                    "trainerImage": self.images["trainer"],
                    "agentImage": self.images["agent"],
                    "defaultS3Endpoint": self.env.minio_endpoint,
                    "progressIntervalSeconds": 1,
                }
            )
        )
        env = {**os.environ, **{k: v for k, v in self.env.env().items() if k != "PATH"}}
        env.setdefault("KUBELORA_RECONCILE_INTERVAL", "1")
        env.setdefault("KUBELORA_ADAPTER_RESYNC_SECONDS", "300")
        log = (self.workdir / "operator.log").open("ab")
        command = [sys.executable, "-m", "kubelora.cli", "operator", "--namespace", NAMESPACE, "--config", str(config)]
        self.operator = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        console.print(f"Operator running pid={self.operator.pid} log={self.workdir / 'operator.log'}")

    # 2. Model and data
    def upload(self) -> dict[str, str]:
        from kubelora import storage
        from kubelora.trainer import tiny

        assert self.env is not None
        with self.step("2. A tiny base model and a synthetic support-ticket dataset go into MinIO"):
            client = storage.make_client(self.env.minio_endpoint, self.env.minio_access_key, self.env.minio_secret_key)
            # A fresh story each run: an earlier run's checkpoints would otherwise be resumed from.
            if client.bucket_exists(BUCKET):
                storage.delete_prefix(client, storage.parse_s3(f"s3://{BUCKET}/"))
            model = tiny.build_tiny_model(self.workdir / "model")
            good = tiny.write_task(self.workdir / "data", n_train=320, n_test=32)
            shuffled = tiny.write_task(self.workdir / "data-shuffled", n_train=320, n_test=32, shuffled_labels=True)
            uris = {
                "base": tiny.upload_dir(client, BUCKET, "models/tiny-llama", model).rstrip("/"),
                "train": tiny.upload_file(client, BUCKET, "data/tickets/train.jsonl", good["train"]),
                "test": tiny.upload_file(client, BUCKET, "data/tickets/test.jsonl", good["test"]),
                "train_shuffled": tiny.upload_file(
                    client, BUCKET, "data/tickets-shuffled/train.jsonl", shuffled["train"]
                ),
            }
            example = json.loads(good["train"].read_text().splitlines()[0])["messages"]
            console.print(f"Base model: {uris['base']} (random tiny Llama, {model})")
            console.print(f"Example: [cyan]{example[-2]['content']}[/] -> [green]{example[-1]['content']}[/]")
            return uris

    # 3. Training
    def lorajob(self, name: str, train: str, uris: dict[str, str]) -> dict[str, Any]:
        secret = {"name": "minio-creds"}
        return {
            "apiVersion": "kubelora.dev/v1alpha1",
            "kind": "LoRAJob",
            "metadata": {"name": name},
            "spec": {
                "baseModel": {"uri": uris["base"], "secretRef": secret},
                "dataset": {"train": train, "format": "chat", "secretRef": secret},
                "method": "lora",
                "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
                "training": {
                    "maxSteps": 160,
                    "learningRate": 0.005,
                    "batchSize": 16,
                    "maxSeqLength": 64,
                    "checkpointEverySteps": 40,
                    "gradientCheckpointing": False,
                    "seed": 7,
                },
                # The pod lands on a kwok L4 node and trains on the CPU; GPU-seconds are accounted as on the L4.
                "resources": {"gpus": 1, "gpuType": "NVIDIA-L4"},
                "output": {"uri": f"s3://{BUCKET}/adapters/{name}/", "secretRef": secret},
                "eval": {
                    "testSet": uris["test"],
                    "metrics": ["exact_match", "accuracy"],
                    "labels": ["billing", "technical", "account", "shipping"],
                    "maxNewTokens": 4,
                    "samplePredictions": 10,
                    "gates": [
                        {"metric": "exact_match", "min": 0.8},
                        {"metric": "exact_match", "minImprovementOverBase": 0.4},
                    ],
                },
            },
        }

    def train(self, uris: dict[str, str]) -> dict[str, dict[str, Any]]:
        jobs = {"support-tickets": uris["train"], "support-tickets-shuffled": uris["train_shuffled"]}
        with self.step("3. Two LoRAJobs train for real in trainer-image pods of Jobs (true labels, shuffled labels)"):
            for name, train in jobs.items():
                self.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(self.lorajob(name, train, uris)))
                console.print(f"Applied LoRAJob {name}")
            results: dict[str, dict[str, Any]] = {}
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=console) as progress:
                tasks = {name: progress.add_task(name, total=None, detail="Pending") for name in jobs}
                deadline = time.monotonic() + 1800
                while len(results) < len(jobs) and time.monotonic() < deadline:
                    for name in jobs:
                        if name in results:
                            continue
                        status = self.get("lorajob", name).get("status", {})
                        prog = status.get("progress") or {}
                        loss = prog.get("loss")
                        detail = f"{status.get('phase', 'Pending')} step {prog.get('step', 0)}/{prog.get('totalSteps') or '?'}"
                        if loss is not None:
                            detail += f" loss {loss:.3f}"
                        progress.update(
                            tasks[name], total=prog.get("totalSteps"), completed=prog.get("step", 0), detail=detail
                        )
                        if status.get("phase") in ("Succeeded", "Failed"):
                            results[name] = status
                    time.sleep(1)
            if len(results) < len(jobs):
                raise TimeoutError("The LoRAJobs did not finish within 30 minutes")
            console.print(self.kubectl("get", "lorajobs", "-n", NAMESPACE).stdout)
            return results

    # 4. Evaluation
    def show_eval(self, results: dict[str, dict[str, Any]]) -> None:
        with self.step("4. Evaluation against the base model, with the gates fixed before training"):
            for name, status in results.items():
                evaluation = status.get("eval") or {}
                table = Table(title=f"{name}: {status.get('phase')}")
                table.add_column("Metric")
                table.add_column("Base", justify="right")
                table.add_column("Adapter", justify="right")
                for metric in sorted(evaluation.get("adapter", {})):
                    base = evaluation.get("base", {}).get(metric)
                    table.add_row(
                        metric, f"{base:.3f}" if base is not None else "-", f"{evaluation['adapter'][metric]:.3f}"
                    )
                console.print(table)
                for gate in evaluation.get("gates", []):
                    mark = "[green]PASS[/]" if gate.get("passed") else "[red]FAIL[/]"
                    console.print(f"  {mark} {gate.get('message') or gate.get('metric')}")
                if status.get("adapter"):
                    console.print(f"  Adapter {status['adapter']['uri']} digest {status['adapter']['digest']}")
                console.print(f"  {status.get('message', '')}")

    # 5. Serving
    def serve(self, uris: dict[str, str]) -> dict[str, Any]:
        from kubelora.devenv import podrunner

        assert self.env is not None
        with self.step("5. vLLM pods, and an AdapterDeployment: canary, then all replicas"):
            podrunner.ensure_serving_nodes(self.env)
            self.kubectl(
                "apply",
                "-n",
                NAMESPACE,
                "-f",
                "-",
                input=yaml.safe_dump(
                    vllm_deployment(uris["base"], agent_image=self.images["agent"], vllm_image=self.images["vllm-cpu"])
                ),
            )
            config = podrunner.RunnerConfig(workdir=self.workdir / "pods", model_dir=self.workdir / "model")
            self.runner = podrunner.PodRunner(self.env.kubeconfig, config, namespace=NAMESPACE).start()
            started = time.monotonic()
            self.runner.wait_healthy(3, timeout=600)
            # Healthy processes are not yet Ready pods: the rollout counts the pods the API says are Ready, so
            # wait for the Deployment as a user would (else the rollout may complete on 2 of 3 pods).
            self.kubectl("rollout", "status", "deployment/vllm", "-n", NAMESPACE, "--timeout=300s")
            console.print(
                f"Three vLLM pods are up in {time.monotonic() - started:.0f}s: real vLLM (its CPU build) and the "
                "adapter agent, each from its image, in kwok pods"
            )
            self.kubectl(
                "apply",
                "-n",
                NAMESPACE,
                "-f",
                "-",
                input=yaml.safe_dump(adapter_deployment("support-tickets", uris["base"])),
            )
            seen: list[str] = []

            def ready() -> dict[str, Any] | None:
                status = self.get("adapterdeployment", "support-tickets").get("status", {})
                phase = status.get("phase")
                if phase and (not seen or seen[-1] != phase):
                    seen.append(phase)
                    console.print(
                        f"  AdapterDeployment support-tickets: {phase} {status.get('loaded', '')} {status.get('message', '')}"
                    )
                if phase in ("Failed", "RolledBack", "Refused"):
                    raise RuntimeError(f"Rollout did not succeed: {status}")
                return status if phase == "Ready" else None

            status: dict[str, Any] = self.wait("the AdapterDeployment to be Ready", ready, timeout=600)
            events = json.loads(
                self.kubectl(
                    "get", "events", "-n", NAMESPACE, "--field-selector", "involvedObject.name=support-tickets",
                    "-o", "json",
                ).stdout
            )["items"]  # fmt: skip
            for event in events:
                if event.get("reason") == "CanaryPassed":
                    console.print(f"  Smoke check against real vLLM: {event['message']}")
            refused_manifest = adapter_deployment("support-tickets-shuffled", uris["base"])
            self.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(refused_manifest))

            def refused() -> dict[str, Any] | None:
                status = self.get("adapterdeployment", "support-tickets-shuffled").get("status", {})
                ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), None)
                return status if ready and ready.get("status") == "False" and status.get("phase") == "Refused" else None

            refusal = self.wait("the shuffled adapter to be refused", refused, timeout=120)
            console.print(
                f"  AdapterDeployment support-tickets-shuffled: [red]{refusal['phase']}[/] {refusal.get('message', '')}"
            )
            console.print(self.kubectl("get", "adapterdeployments", "-n", NAMESPACE).stdout)
            return status

    # 6. A completion
    def complete(self) -> tuple[str, str, str]:
        from openai import OpenAI

        with self.step("6. A completion from the adapter through the OpenAI API"):
            pods = json.loads(self.kubectl("get", "pods", "-n", NAMESPACE, "-l", "app=vllm", "-o", "json").stdout)[
                "items"
            ]
            ip = pods[0]["status"]["podIP"]
            client = OpenAI(base_url=f"http://{ip}:8000/v1", api_key="not-needed")
            from kubelora.trainer import tiny

            test_row = json.loads((self.workdir / "data" / "test.jsonl").read_text().splitlines()[0])["messages"]
            prompt, expected = test_row[-2]["content"], test_row[-1]["content"]
            messages: Any = [{"role": "user", "content": prompt}]
            adapter = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=4, temperature=0)
            base_name = client.models.list().data[0].id
            base = client.chat.completions.create(model=base_name, messages=messages, max_tokens=4, temperature=0)
            answer = (adapter.choices[0].message.content or "").strip()
            console.print(f"Pod {pods[0]['metadata']['name']} at {ip}:8000, model={SERVED_NAME}")
            console.print(f"Prompt:   [cyan]{prompt}[/]")
            console.print(f"Adapter:  [green]{answer}[/]   (expected {expected}; labels {', '.join(tiny.LABELS)})")
            console.print(f"Base:     [yellow]{(base.choices[0].message.content or '').strip()}[/]")
            # vLLM names itself and its version in every completion.
            console.print(f"Served by:   {adapter.system_fingerprint}")
            return prompt, answer, expected

    def summary(self, results: dict[str, dict[str, Any]], completion: tuple[str, str, str]) -> None:
        console.rule("[bold]7. Summary")
        table = Table(title="Steps")
        table.add_column("Step")
        table.add_column("Seconds", justify="right")
        for title, seconds in self.timings:
            table.add_row(title, f"{seconds:.1f}")
        console.print(table)
        jobs = Table(title="LoRAJobs")
        for column in ("LoRAJob", "Phase", "Base exact_match", "Adapter exact_match", "GPU-seconds", "Cost"):
            jobs.add_column(column)
        for name, status in results.items():
            evaluation = status.get("eval") or {}
            jobs.add_row(
                name,
                str(status.get("phase")),
                f"{evaluation.get('base', {}).get('exact_match', float('nan')):.3f}",
                f"{evaluation.get('adapter', {}).get('exact_match', float('nan')):.3f}",
                str(status.get("gpuSeconds", 0)),
                str(status.get("costEstimate", "-")),
            )
        console.print(jobs)
        console.print(f"Served completion: {completion[1]!r} (expected {completion[2]!r})")
        console.print(f"Explore: source {cluster.state_dir() / 'env.sh'} && kubectl get kubelora -n {NAMESPACE}")
        console.print("Stop the environment with: make dev-down")

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
        if self.kubelet is not None:
            self.kubelet.stop()
        if self.operator is not None and self.operator.poll() is None:
            self.operator.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.operator.wait(timeout=30)


AGENT_TOKEN_SECRET = "kubelora-agent-token"  # noqa: S105 - a Secret name


def agent_token_secret() -> dict[str, Any]:
    """The vLLM pods' agents answer only callers with this token (spec.target.agentTokenSecretRef)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": AGENT_TOKEN_SECRET},
        "stringData": {"token": secrets.token_urlsafe(32)},
    }


def vllm_deployment(
    base_uri: str,
    replicas: int = 3,
    agent_image: str = "ghcr.io/kubelora/agent:0.1.0",
    vllm_image: str = vllm.VLLM_CPU_IMAGE,
) -> dict[str, Any]:
    from kubelora.devenv import podrunner

    labels = {"app": "vllm", podrunner.POD_LABEL: "vllm"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "vllm", "labels": {"app": "vllm"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "vllm"}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "tolerations": podrunner.TOLERATIONS,
                    "nodeSelector": podrunner.NODE_SELECTOR,
                    "containers": [
                        {
                            "name": "vllm",
                            "image": vllm_image,
                            "args": [
                                "--model",
                                base_uri,
                                "--served-model-name",
                                base_uri,
                                "--port",
                                "8000",
                                "--enable-lora",
                                "--max-loras",
                                "4",
                                "--max-lora-rank",
                                "16",
                                *vllm.CPU_ARGS,
                            ],
                            "env": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"}],
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        },
                        {
                            "name": podrunner.AGENT_CONTAINER,
                            "image": agent_image,
                            "args": ["--port", str(podrunner.DEFAULT_AGENT_PORT), "--dir", "/adapters"],
                            "env": [
                                {
                                    "name": "KUBELORA_AGENT_TOKEN",
                                    "valueFrom": {"secretKeyRef": {"name": AGENT_TOKEN_SECRET, "key": "token"}},
                                },
                                {
                                    "name": "S3_ENDPOINT",
                                    "valueFrom": {"secretKeyRef": {"name": "minio-creds", "key": "endpoint"}},
                                },
                                {
                                    "name": "AWS_ACCESS_KEY_ID",
                                    "valueFrom": {"secretKeyRef": {"name": "minio-creds", "key": "accessKey"}},
                                },
                                {
                                    "name": "AWS_SECRET_ACCESS_KEY",
                                    "valueFrom": {"secretKeyRef": {"name": "minio-creds", "key": "secretKey"}},
                                },
                            ],
                        },
                    ],
                },
            },
        },
    }


def adapter_deployment(lorajob: str, base_uri: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubelora.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": lorajob},
        "spec": {
            "adapter": {"loraJob": lorajob, "secretRef": {"name": "minio-creds"}},
            "servedName": SERVED_NAME if lorajob == "support-tickets" else f"{lorajob}",
            "target": {
                "deploymentName": "vllm",
                "baseModel": base_uri,
                "port": 8000,
                "maxLoras": 4,
                "maxLoraRank": 16,
                "agentTokenSecretRef": {"name": AGENT_TOKEN_SECRET},
            },
            "rollout": {"strategy": "Canary", "canaryReplicas": 1, "smokePrompts": 5, "smokeMinMatch": 0.6},
        },
    }


def main() -> int:
    demo = Demo()
    try:
        demo.bring_up()
        uris = demo.upload()
        results = demo.train(uris)
        demo.show_eval(results)
        demo.serve(uris)
        completion = demo.complete()
        demo.summary(results, completion)
    except Exception as exc:
        console.print(f"[red]Demo failed: {exc}[/]")
        console.print(f"Operator log: {demo.workdir / 'operator.log'}")
        return 1
    finally:
        demo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
