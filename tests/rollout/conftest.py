"""Fixtures for the AdapterDeployment tests: real vLLM behind kwok pods, the controller, published adapters.

One session-wide environment, shared by every test here to keep the machine's two cores free:

- a namespace with the Secret ``minio-creds``, and the serving node pool (podCIDR 127.1.x.0/24);
- a 3-replica "existing vLLM Deployment" (``vllm-tiny``) whose pods podrunner runs from their images:
  real vLLM (its CPU build, ``localhost/kubelora/vllm-cpu``) serving the tiny Llama, and the adapter
  agent, both bound to the pods' 127.1.x.y addresses (about 3 GB of memory per vLLM pod);
- the AdapterDeployment controller alone (``python -m kubelora.operator.adapter_handlers``), so no
  LoRAJob controller touches the LoRAJobs the tests write by hand;
- adapters trained-and-published like the trainer does (see adapters.py) in one bucket.

Each test makes its own LoRAJobs and AdapterDeployments with names of its own; the ``track`` fixture
deletes its AdapterDeployments (and waits for the unload) afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubelora.devenv import cluster, podrunner
from kubelora.operator.managed_server import MANAGED_LABEL
from kubelora.serving import vllm
from tests.conftest import REPO, kubectl_runner, wait_for
from tests.operator.harness import OperatorProcess, create_s3_secret, free_port, install_crds
from tests.rollout.adapters import BASE_MODEL, MAX_NEW_TOKENS, Published, make_adapters

GROUP, VERSION = "kubelora.dev", "v1alpha1"
DEPLOYMENT = "vllm-tiny"
REPLICAS = 3
SERVER_PORT = 8000
RESYNC_SECONDS = "300"  # the safety net only: every test here is driven by watch events
# vLLM runs with --api-key (VLLM_API_KEY from this Secret), as a platform team's servers would; every
# AdapterDeployment here names it in spec.target.apiKeySecretRef, and the tests' own calls send it too.
API_KEY_SECRET = "vllm-api-key"
API_KEY = f"kubelora-test-{uuid.uuid4().hex}"
# The 'existing' Deployment's agents read their token from this Secret, named by spec.target.agentTokenSecretRef;
# managed servers get one the operator generates.
AGENT_TOKEN_SECRET = "kubelora-agent-token"
AGENT_TOKEN = f"agent-{uuid.uuid4().hex}"
OPERATOR_NAMESPACE = "kubelora-system"
OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "kubelora", "app.kubernetes.io/instance": "kubelora"}


class AdapterOperator(OperatorProcess):
    """The AdapterDeployment controller alone, reusing the harness's config, health check, kill and log."""

    extra_env: dict[str, str]
    more_namespaces: tuple[str, ...] = ()  # watched too, as one operator watches every tenant

    def start(self) -> None:
        self.health_port = free_port()
        env = {**os.environ, **{k: v for k, v in self.devenv.env().items() if k != "PATH"}, **self.extra_env}
        command = [sys.executable, "-m", "kubelora.operator.adapter_handlers", "--namespace", self.namespace]
        for namespace in self.more_namespaces:
            command += ["--namespace", namespace]
        command += ["--config", str(self.config_path), "--health-port", str(self.health_port)]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        wait_for("the operator's /healthz", self.healthy, timeout=60)


def server_deployment(
    name: str,
    replicas: int,
    labels: dict[str, str],
    images: dict[str, str],
    max_lora_rank: int = 16,
    api_key_secret: str | None = None,
    agent_token_secret: str = AGENT_TOKEN_SECRET,
) -> dict[str, Any]:
    """An 'existing' vLLM Deployment as a platform team would run it, with kubelora's agent sidecar."""
    secret_env = [
        {"name": "KUBELORA_AGENT_TOKEN", "valueFrom": {"secretKeyRef": {"name": agent_token_secret, "key": "token"}}}
    ] + [
        {"name": env, "valueFrom": {"secretKeyRef": {"name": "minio-creds", "key": key}}}
        for env, key in (
            ("AWS_ACCESS_KEY_ID", "accessKey"),
            ("AWS_SECRET_ACCESS_KEY", "secretKey"),
            ("S3_ENDPOINT", "endpoint"),
        )
    ]
    vllm_args = ["--model", BASE_MODEL, "--served-model-name", BASE_MODEL, "--port", str(SERVER_PORT)]
    vllm_args += ["--enable-lora", "--max-loras", "4", "--max-lora-rank", str(max_lora_rank), "--max-cpu-loras", "8"]
    vllm_args += list(vllm.CPU_ARGS)
    vllm_env: list[dict[str, Any]] = [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"}]
    if api_key_secret:
        vllm_env.append(
            {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": api_key_secret, "key": "apiKey"}}}
        )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": {**labels, podrunner.POD_LABEL: "vllm"}},
                "spec": {
                    "nodeSelector": podrunner.NODE_SELECTOR,
                    "tolerations": podrunner.TOLERATIONS,
                    "containers": [
                        {
                            "name": "vllm",
                            "image": images["vllm-cpu"],
                            "args": vllm_args,
                            "env": vllm_env,
                            "ports": [{"containerPort": SERVER_PORT}],
                        },
                        {
                            "name": "kubelora-agent",
                            "image": images["agent"],
                            "args": ["--host", "0.0.0.0", "--port", "8001", "--dir", "/adapters"],
                            "env": secret_env,
                        },
                    ],
                },
            },
        },
    }


@dataclasses.dataclass
class RolloutEnv:
    devenv: cluster.DevEnv
    namespace: str
    bucket: str
    runner: podrunner.PodRunner
    operator: AdapterOperator
    kubectl: Callable[..., subprocess.CompletedProcess[str]]
    images: dict[str, str]
    tenant_b: str = ""  # a second tenant's namespace, watched by the same operator (test_e2e_tenancy.py)

    def apply(self, manifest: dict[str, Any]) -> None:
        self.kubectl("apply", "-n", self.namespace, "-f", "-", input=json.dumps(manifest))

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        result = self.kubectl("get", kind, name, "-n", self.namespace, "-o", "json", check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        return dict(json.loads(result.stdout))

    def ad(self, name: str) -> dict[str, Any]:
        obj = self.get("adapterdeployment", name)
        assert obj is not None, f"AdapterDeployment {name} is gone"
        return obj

    def wait_ad(
        self, name: str, check: Callable[[dict[str, Any]], Any], what: str, timeout: float = 90
    ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            obj = self.ad(name)
            return obj if check(obj) else None

        try:
            return dict(wait_for(f"AdapterDeployment {name}: {what}", reached, timeout=timeout))
        except AssertionError as exc:
            status = (self.get("adapterdeployment", name) or {}).get("status")
            raise AssertionError(
                f"{exc}\nstatus={json.dumps(status, indent=1)}\noperator log tail:\n{self.operator.log()[-5000:]}"
            ) from None

    def wait_phase(self, name: str, phase: str, timeout: float = 90, loaded: int | None = None) -> dict[str, Any]:
        def check(obj: dict[str, Any]) -> bool:
            status = obj.get("status") or {}
            if status.get("phase") != phase:
                return False
            return loaded is None or (status.get("loadedReplicas") == loaded == status.get("desiredReplicas"))

        return self.wait_ad(
            name, check, f"phase {phase}" + (f" with {loaded}/{loaded} loaded" if loaded else ""), timeout
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        out = self.kubectl(
            "get", "events", "-n", self.namespace, "--field-selector", f"involvedObject.name={name}", "-o", "json"
        ).stdout
        return list(json.loads(out)["items"])

    def wait_event(self, name: str, reason: str, timeout: float = 30) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((e for e in self.events(name) if e.get("reason") == reason), None)

        return dict(wait_for(f"event {reason} on {name}", found, timeout=timeout))

    def pods(self) -> dict[str, podrunner.RunningPod]:
        return {name: pod for name, pod in self.runner.running().items() if name.startswith(DEPLOYMENT)}

    def lorajob(
        self,
        name: str,
        adapter: Published,
        *,
        phase: str = "Succeeded",
        passed: bool = True,
        gates: list[dict[str, Any]] | None = None,
    ) -> None:
        """A LoRAJob whose status says it trained and published ``adapter`` (no LoRAJob controller runs)."""
        spec = {
            "baseModel": {"uri": f"hf://{BASE_MODEL}", "secretRef": {"name": "minio-creds"}},
            "dataset": {"train": f"s3://{self.bucket}/data/train.jsonl"},
            "training": {"maxSteps": 10},
            "resources": {"gpus": 1},
            # The output root; the trainer published the adapter under its sha256/<hex>/.
            "output": {"uri": adapter.uri.split("sha256/")[0], "secretRef": {"name": "minio-creds"}},
            "eval": {
                "testSet": f"s3://{self.bucket}/data/test.jsonl",
                "metrics": ["exact_match"],
                "gates": [{"metric": "exact_match", "min": 0.5}],
                "maxNewTokens": MAX_NEW_TOKENS,
            },
        }
        self.apply({"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRAJob", "metadata": {"name": name}, "spec": spec})
        self.set_lorajob_status(name, adapter, phase=phase, passed=passed, gates=gates)

    def set_lorajob_status(
        self,
        name: str,
        adapter: Published,
        *,
        phase: str = "Succeeded",
        passed: bool = True,
        gates: list[dict[str, Any]] | None = None,
    ) -> None:
        generation = self.ad_generation("lorajob", name)
        status: dict[str, Any] = {"phase": phase, "observedGeneration": generation, "attempts": 1}
        if phase in ("Succeeded", "Failed"):
            value = 0.9 if passed else 0.2
            status["eval"] = {
                "passed": passed,
                "base": {"exact_match": 0.25},
                "adapter": {"exact_match": value},
                "gates": gates
                or [
                    {
                        "metric": "exact_match",
                        "rule": "min",
                        "threshold": 0.5 if passed else 0.9,
                        "value": value,
                        "baseValue": 0.25,
                        "passed": passed,
                    }
                ],
                "samplesUri": adapter.uri + "eval/samples.jsonl",
            }
            status["adapter"] = adapter.status_adapter()
        self.kubectl(
            "patch",
            "lorajob",
            name,
            "-n",
            self.namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": status}),
        )

    def ad_generation(self, kind: str, name: str) -> int:
        obj = self.get(kind, name)
        assert obj is not None
        return int(obj["metadata"]["generation"])


def ad_manifest(
    name: str,
    served_name: str,
    *,
    lora_job: str | None = None,
    adapter: Published | None = None,
    strategy: str = "Canary",
    canary: int = 1,
    smoke: int = 3,
    min_match: float = 0.8,
    max_rank: int = 16,
    base_model: str = BASE_MODEL,
    require_eval: bool = True,
    target: dict[str, Any] | None = None,
    api_key: bool = True,
) -> dict[str, Any]:
    if lora_job:
        source: dict[str, Any] = {"loraJob": lora_job}
    else:
        assert adapter is not None
        source = {"uri": adapter.uri, "digest": adapter.digest, "secretRef": {"name": "minio-creds"}}
    target = target or {
        "deploymentName": DEPLOYMENT,
        "baseModel": base_model,
        "port": SERVER_PORT,
        "maxLoras": 4,
        "maxLoraRank": max_rank,
    }
    if api_key:
        target = {**target, "apiKeySecretRef": {"name": API_KEY_SECRET}}
    if "managed" not in target and "agentTokenSecretRef" not in target:
        target = {**target, "agentTokenSecretRef": {"name": AGENT_TOKEN_SECRET}}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AdapterDeployment",
        "metadata": {"name": name},
        "spec": {
            "adapter": source,
            "servedName": served_name,
            "target": target,
            "gatePolicy": {"requireEvalPassed": require_eval},
            "rollout": {
                "strategy": strategy,
                "canaryReplicas": canary,
                "smokePrompts": smoke,
                "smokeMinMatch": min_match,
                "autoRollback": True,
            },
        },
    }


def managed_target(replicas: int = 1, max_loras: int = 2) -> dict[str, Any]:
    """spec.target for a managed vLLM server of the tiny model (vLLM's CPU build here), with the API key."""
    return {
        "baseModel": BASE_MODEL,
        "port": SERVER_PORT,
        "maxLoras": max_loras,
        "maxLoraRank": 16,
        "apiKeySecretRef": {"name": API_KEY_SECRET},
        "managed": {
            "baseModel": {"uri": f"hf://{BASE_MODEL}", "revision": "main"},
            "args": list(vllm.CPU_ARGS),
            "replicas": replicas,
            "gpus": 1,
            "gpuType": podrunner.SERVING_POOL.product,
        },
    }


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    found = next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), None)
    assert found is not None, f"no {type_} condition in {obj.get('status')}"
    return dict(found)


def served(pod: podrunner.RunningPod) -> dict[str, str]:
    """What a pod's vLLM serves: model id -> root (the adapter path for adapters)."""
    import httpx

    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.get(f"http://{pod.ip}:{pod.server_port}/v1/models", headers=headers, timeout=10)
    response.raise_for_status()
    return {card["id"]: card["root"] for card in response.json()["data"]}


def agent_files(pod: podrunner.RunningPod, token: str = AGENT_TOKEN) -> set[str]:
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    response = httpx.get(f"http://{pod.ip}:{pod.agent_port}/v1/adapters", headers=headers, timeout=10)
    response.raise_for_status()
    return {entry["digest"] for entry in response.json()["adapters"]}


SNAPSHOT_FIELDS = (
    "phase",
    "loadedReplicas",
    "desiredReplicas",
    "activeDigest",
    "previousDigest",
    "currentStep",
    "message",
)


class StatusRecorder:
    """Every status an AdapterDeployment goes through, from a watch (no polling gaps)."""

    def __init__(self, api_client: Any, namespace: str, name: str) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.namespace, self.name = namespace, name
        self.seen: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> StatusRecorder:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from kubernetes import watch

        version = None
        while not self._stop.is_set():
            stream = watch.Watch()
            kwargs: dict[str, Any] = {"field_selector": f"metadata.name={self.name}", "timeout_seconds": 5}
            if version:
                kwargs["resource_version"] = version
            self._ready.set()
            try:
                for event in stream.stream(
                    self.custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    "adapterdeployments",
                    **kwargs,
                ):
                    obj = event["object"]
                    version = obj["metadata"]["resourceVersion"]
                    status = obj.get("status") or {}
                    snapshot = {k: status.get(k) for k in SNAPSHOT_FIELDS}
                    if not self.seen or self.seen[-1] != snapshot:
                        self.seen.append(snapshot)
                    if self._stop.is_set():
                        break
            except Exception:
                version = None

    def phases(self) -> list[str]:
        out: list[str] = []
        for snapshot in self.seen:
            if snapshot["phase"] and (not out or out[-1] != snapshot["phase"]):
                out.append(snapshot["phase"])
        return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubelora.trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("rollout-model") / "model")


@pytest.fixture(scope="session")
def adapter_bucket(minio_client: Any) -> Iterator[str]:
    name = f"t-rollout-{uuid.uuid4().hex[:8]}"
    minio_client.make_bucket(name)
    yield name
    for obj in minio_client.list_objects(name, recursive=True):
        minio_client.remove_object(name, obj.object_name)
    minio_client.remove_bucket(name)


@pytest.fixture(scope="session")
def adapters(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, adapter_bucket: str, devenv: Any, s3_env: dict[str, str]
) -> dict[str, Published]:
    # The trainer's own publish step writes them, with the keys handed over for the OUTPUT role only.
    from unittest import mock

    from kubelora import storage

    with mock.patch.dict(os.environ, {f"OUTPUT_{k}": v for k, v in s3_env.items()}):
        storage._clients.clear()
        try:
            return make_adapters(tmp_path_factory.mktemp("rollout-adapters"), tiny_model, adapter_bucket)
        finally:
            storage._clients.clear()


@pytest.fixture(scope="session")
def rollout_env(
    devenv: cluster.DevEnv,
    tiny_model: Path,
    adapter_bucket: str,
    tmp_path_factory: pytest.TempPathFactory,
    images: dict[str, str],
) -> Iterator[RolloutEnv]:
    kubectl = kubectl_runner(devenv)
    install_crds(devenv)
    namespace = f"t-rollout-{uuid.uuid4().hex[:8]}"
    tenant_b = f"{namespace}-b"
    kubectl("create", "namespace", namespace)
    kubectl("create", "namespace", tenant_b)
    runner: podrunner.PodRunner | None = None
    operator: AdapterOperator | None = None
    try:
        create_s3_secret(kubectl, namespace, devenv)
        kubectl("create", "secret", "generic", API_KEY_SECRET, "-n", namespace, "--from-literal", f"apiKey={API_KEY}")
        kubectl(
            "create", "secret", "generic", AGENT_TOKEN_SECRET, "-n", namespace, "--from-literal", f"token={AGENT_TOKEN}"
        )
        podrunner.ensure_serving_nodes(devenv, 1)
        config = podrunner.RunnerConfig(
            workdir=tmp_path_factory.mktemp("podrunner"),
            model_dir=tiny_model,
            env={k: v for k, v in devenv.env().items() if k != "PATH"},
        )
        selectors = [podrunner.POD_LABEL, MANAGED_LABEL]  # our 'existing' Deployment, and managed servers
        runner = podrunner.PodRunner(devenv.kubeconfig, config, namespace, selectors).start()
        # Managed servers run vLLM's CPU build here (a GPU cluster keeps the chart's vllm/vllm-openai default).
        operator = AdapterOperator(
            devenv,
            namespace,
            tmp_path_factory.mktemp("adapter-operator"),
            vllmImage=images["vllm-cpu"],
            agentImage=images["agent"],
            # As the chart sets them: managed servers get a NetworkPolicy admitting the agent port from these pods.
            operatorNamespace=OPERATOR_NAMESPACE,
            operatorPodLabels=OPERATOR_POD_LABELS,
        )
        operator.more_namespaces = (tenant_b,)
        operator.extra_env = {
            "KUBELORA_ADAPTER_RESYNC_SECONDS": RESYNC_SECONDS,
            "KUBELORA_POD_CIDRS": "127.0.0.0/8",  # never send traffic to a pod outside loopback
        }
        env = RolloutEnv(devenv, namespace, adapter_bucket, runner, operator, kubectl, images, tenant_b)
        env.apply(server_deployment(DEPLOYMENT, REPLICAS, {"app": DEPLOYMENT}, images, api_key_secret=API_KEY_SECRET))
        runner.wait_healthy(REPLICAS, timeout=240)
        # the pods Ready in the API, not just healthy processes: rollouts count those
        kubectl("rollout", "status", f"deployment/{DEPLOYMENT}", "-n", namespace, "--timeout=120s")
        for pod in env.pods().values():
            assert pod.ip.startswith("127."), f"pod {pod.name} got {pod.ip}, not a loopback address"
        operator.start()
        yield env
    finally:
        if operator is not None and operator.process is not None:
            _delete_adapterdeployments(kubectl, namespace)
            _delete_adapterdeployments(kubectl, tenant_b)
            operator.kill(signal.SIGTERM)
        if runner is not None:
            runner.stop()
        kubectl("delete", "namespace", namespace, tenant_b, "--wait=false", check=False)


def _delete_adapterdeployments(kubectl: Callable[..., subprocess.CompletedProcess[str]], namespace: str) -> None:
    kubectl("delete", "adapterdeployments", "--all", "-n", namespace, "--timeout=60s", check=False)
    leftover = kubectl("get", "adapterdeployments", "-n", namespace, "-o", "name", check=False).stdout.split()
    for name in leftover:  # the operator could not finish: drop the finalizer so the namespace can go
        kubectl("patch", name, "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)


@pytest.fixture
def track(rollout_env: RolloutEnv) -> Iterator[Callable[[dict[str, Any]], str]]:
    """Apply an AdapterDeployment; delete it (and wait for the unload) after the test."""
    names: list[str] = []

    def apply(manifest: dict[str, Any]) -> str:
        rollout_env.apply(manifest)
        names.append(manifest["metadata"]["name"])
        return str(manifest["metadata"]["name"])

    yield apply
    for name in names:
        rollout_env.kubectl(
            "delete", "adapterdeployment", name, "-n", rollout_env.namespace, "--timeout=60s", check=False
        )


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False)
