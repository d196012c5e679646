"""Fake pods backed by real processes: kwok pods whose vLLM server and adapter agent run locally.

kwok plays the kubelet, so a pod on a kwok node runs nothing. kwok gives each pod an IP from its
node's ``spec.podCIDR``; the serving pool made here (:func:`ensure_serving_nodes`) has podCIDRs in
127.1.0.0/16, and every 127.x address can be bound on Linux. :class:`PodRunner` watches pods that
match a label selector and, for each Running pod with an IP, starts local processes bound to that
IP, playing its containers:

- the container named ``vllm`` (else the first): with ``server="vllm"`` (the default), real vLLM from
  the container's image in buildah's local store (the CPU build, ``localhost/kubelora/vllm-cpu``, built
  by ``make images``), run with the container's own entrypoint, args and env, except ``--host`` (the pod
  IP) and ``--model`` (a copy of the runner's ``model_dir``, or of the pod annotation
  ``podrunner.kubelora.dev/model``, mounted read-only at /mnt/podrunner-model); or, with
  ``server="fake"``, a light fake vLLM (only ``/health``, ``/v1/models``, ``/v1/load_lora_adapter``,
  ``/v1/unload_lora_adapter``) for benchmarks with more pods than real vLLM fits in memory (about 3 GB
  each);
- the container named ``kubelora-agent``: the adapter agent from its image (:class:`ImageProc`), with its
  env (``secretKeyRef`` values are read from the API), bound to the pod IP, and a directory per pod that
  lives as long as the pod, like an emptyDir, mounted at its host path in both containers so vLLM loads
  the paths the agent reports. In fake mode the agent runs in the fake's process unless
  ``RunnerConfig.agent_from_image`` asks for its image.

Processes that exit are restarted with a backoff, as a kubelet restarts containers; processes of a
deleted pod are killed. :meth:`PodRunner.restart` kills and restarts a pod's server (a container
restart) without telling the API anything. Use it from tests, or for the demo::

    python -m kubelora.devenv.podrunner run --model DIR --namespace demo

**Image mode** (``RunnerConfig(images=True)``, ``run --images``): instead of the serving modes above, the
runner plays a kubelet that runs every container of the pods it claims from its image in buildah's
local store (:mod:`kubelora.devenv.kubelet`), and writes their status back as a kubelet does. Pods are
claimed by label selector, or by the node they are scheduled to (``nodes``: names; ``node_selectors``:
node label selectors), e.g. training Job pods on the kwok GPU nodes and the Helm chart's operator pod::

    python -m kubelora.devenv.podrunner run --images --namespace demo \
        --node-selector kubelora.dev/pool=a100 --selector app.kubernetes.io/component=operator

Training pods that talk to each other (torchrun across the pods of an Indexed Job, or several processes in
one pod) need pod IPs they can bind: :func:`ensure_loopback_gpu_nodes` makes kwok GPU nodes whose pods get
127.2.x addresses (product :data:`LOOPBACK_GPU_POOL`), and the kubelet writes each pod's /etc/hosts with the
names a headless Service gives its pods (:mod:`kubelora.devenv.kubelet.hosts`).

From Python, :func:`image_runner` makes one (by default it claims every pod of its namespace but those
labelled :data:`POD_LABEL`); :meth:`PodRunner.logs` returns what the containers printed.

This is a development tool: it runs arbitrary local processes for pods, so use it only against the
local dev cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kubelora.devenv import cluster, kubelet

log = logging.getLogger("kubelora.devenv.podrunner")

POD_LABEL = "kubelora.dev/podrunner"
MODEL_ANNOTATION = "podrunner.kubelora.dev/model"
SERVER_CONTAINER = "vllm"
AGENT_CONTAINER = "kubelora-agent"  # kubelora.serving.agent.AGENT_CONTAINER, without importing aiohttp here
DEFAULT_AGENT_PORT = 8001
#: The serving pool: fake GPU nodes whose pods get 127.1.<node>.x addresses.
SERVING_POOL = cluster.GPUPool("serving", 1, 8, "KWOK-Serving-CPU", 24576, "cpu", pod_cidr_base="127.1.{index}.0/24")
#: What a pod needs to land on the serving pool.
NODE_SELECTOR = {"kubelora.dev/pool": SERVING_POOL.name}
TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
_SOURCE_ROOTS = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[3] / "trainer")]


#: Where containers from images (uid 65532) share files with each other: world-traversable.
SHARED_ROOT = Path(tempfile.gettempdir()) / "kubelora-podrunner"


def shared_adapters_dir(pod_uid: str, create: bool = True) -> Path:
    """A pod's adapter directory for an agent that runs from its image: under the temp dir, world-traversable."""
    root = SHARED_ROOT
    path = root / pod_uid / "adapters"
    if create:
        path.mkdir(parents=True, exist_ok=True)
        for parent in (root, path.parent):
            parent.chmod(0o755)
    return path


#: GPU nodes whose pods get 127.2.<node>.x addresses, for training pods that talk to each other (torchrun's
#: rendezvous and gloo between the pods of a multi-node LoRAJob, or the processes of a multi-GPU pod, which reach
#: each other at the pod's IP): kwok gives pods of the default GPU pools addresses in 10.0.0.0/24, which no
#: process here can bind. A LoRAJob lands here with ``resources.gpuType`` set to this pool's product.
LOOPBACK_GPU_POOL = cluster.GPUPool(
    "loopback", 2, 8, "KWOK-Loopback-GPU-80GB", 81920, "ampere", pod_cidr_base="127.2.{index}.0/24"
)


def ensure_serving_nodes(env: cluster.DevEnv, count: int = 1, timeout: float = 60.0) -> list[str]:
    """Create (or keep) ``count`` serving-pool nodes and wait until they are Ready; returns their names."""
    return ensure_pool_nodes(env, SERVING_POOL, count, timeout)


def ensure_loopback_gpu_nodes(env: cluster.DevEnv, count: int = 2, timeout: float = 60.0) -> list[str]:
    """Create (or keep) ``count`` nodes of :data:`LOOPBACK_GPU_POOL` and wait until they are Ready."""
    return ensure_pool_nodes(env, LOOPBACK_GPU_POOL, count, timeout)


def ensure_pool_nodes(env: cluster.DevEnv, pool: cluster.GPUPool, count: int, timeout: float = 60.0) -> list[str]:
    """Create (or keep) ``count`` nodes of ``pool`` and wait until they are Ready; returns their names."""
    pool = dataclasses.replace(pool, count=count)
    nodes = [cluster.gpu_node(pool, i) for i in range(count)]
    cluster.apply_nodes(env, nodes)
    names = [n["metadata"]["name"] for n in nodes]
    deadline = time.monotonic() + timeout
    while True:
        result = cluster.kubectl(env, "get", "nodes", "-l", f"kubelora.dev/pool={pool.name}", "-o", "json", check=False)
        if result.returncode == 0:
            items = [n for n in json.loads(result.stdout)["items"] if n["metadata"]["name"] in names]
            ready = [
                n
                for n in items
                if any(
                    c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", [])
                )
            ]
            if len(ready) == len(names):
                return names
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serving nodes not Ready after {timeout:.0f}s: {names}")
        time.sleep(0.2)


Requirement = tuple[str, str, str | None]  # (key, op, value); op: "=", "!=", "exists", "!exists"


def parse_selector(text: str) -> list[Requirement]:
    """A label selector: ``a=b,c,!d,e!=f`` (equality and existence; empty matches everything)."""
    out: list[Requirement] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part.startswith("!"):
            out.append((part[1:].strip(), "!exists", None))
        elif "!=" in part:
            key, value = part.split("!=", 1)
            out.append((key.strip(), "!=", value.strip()))
        elif "=" in part:
            key, value = part.split("=", 1)
            out.append((key.strip(), "=", value.strip().lstrip("=")))
        else:
            out.append((part, "exists", None))
    return out


def _matches(labels: dict[str, str], selector: list[Requirement]) -> bool:
    def one(key: str, op: str, value: str | None) -> bool:
        if op == "exists":
            return key in labels
        if op == "!exists":
            return key not in labels
        if op == "=":
            return labels.get(key) == value
        return labels.get(key) != value

    return all(one(*r) for r in selector)


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


#: Image mode's default claim: every pod of the namespace but those a serving-mode PodRunner plays.
NOT_SERVING = f"!{POD_LABEL}"


def image_runner(
    env: cluster.DevEnv,
    workdir: Path,
    namespace: str | Sequence[str] | None = None,
    selectors: Iterable[str] | None = (NOT_SERVING,),
    nodes: Iterable[str] = (),
    node_selectors: Iterable[str] = (),
    max_runtime: float | None = 1800.0,
    grace_cap: float = 10.0,
) -> PodRunner:
    """A PodRunner in image mode (not started): it plays the kubelet for the pods it claims, running their
    containers from local images. By default it claims every pod of ``namespace`` that is not labelled
    :data:`POD_LABEL` (those belong to serving-mode runners); ``selectors=None`` claims every pod there;
    ``nodes``/``node_selectors`` also claim the pods scheduled to those nodes."""
    config = RunnerConfig(workdir=workdir, images=True, max_runtime=max_runtime, grace_cap=grace_cap)
    claim = [""] if selectors is None else list(selectors)
    return PodRunner(env.kubeconfig, config, namespace, claim, nodes=nodes, node_selectors=node_selectors)


def _container(pod: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((c for c in pod["spec"].get("containers", []) if c.get("name") == name), None)


def _args(container: dict[str, Any]) -> list[str]:
    return [str(a) for a in (container.get("command") or [])[1:] + (container.get("args") or [])]


def _port(container: dict[str, Any], args: Sequence[str], default: int) -> int:
    value = _flag_value(args, "--port")
    if value is not None:
        return int(value)
    ports = container.get("ports") or []
    return int(ports[0]["containerPort"]) if ports else default


@dataclasses.dataclass
class Proc:
    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    health_url: str
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            out.write(f"--- podrunner: starting {' '.join(self.command)}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self.started_at = time.monotonic()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def healthy(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(self.health_url, timeout=2) as response:  # noqa: S310 - a 127.x pod IP
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False


@dataclasses.dataclass
class RunnerConfig:
    workdir: Path
    model_dir: Path | None = None
    server: str = "vllm"  # vllm (real vLLM from the container's image) | fake (benchmarks with many pods)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    python: str = sys.executable
    #: Image mode: play a kubelet for every container of the claimed pods (kubelora.devenv.kubelet).
    images: bool = False
    #: Image mode: the longest a container may run when its pod has no activeDeadlineSeconds (None: no bound).
    max_runtime: float | None = 1800.0
    #: Image mode: cap on terminationGracePeriodSeconds when containers are killed.
    grace_cap: float = 10.0
    #: Stand-in mode: run the kubelora-agent sidecar from its image (with buildah) instead of a local process.
    #: None: when its image is in buildah's local store.
    agent_from_image: bool | None = None


@dataclasses.dataclass
class RunningPod:
    namespace: str
    name: str
    uid: str
    ip: str
    directory: Path
    procs: dict[str, Proc]
    server_port: int
    agent_port: int | None
    #: ConfigMap volumes podrunner writes (and refreshes, as a kubelet does): (volume source, host directory).
    configmaps: list[tuple[dict[str, Any], Path]] = dataclasses.field(default_factory=list)
    #: Serving mode: the Ready condition last written to the pod (None: not yet), and per container its readiness.
    ready: bool | None = None
    probes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    refreshed: float = 0.0


class PodRunner:
    """Runs the containers of matching kwok pods as local processes bound to the pods' IPs (or, in image
    mode, from their images).

    A pod is claimed when its labels match one of ``selectors``, or (image mode) when it is scheduled to
    a node named in ``nodes`` or whose labels match one of ``node_selectors``; only in ``namespace``
    (a name, several names, or None for all).
    """

    def __init__(
        self,
        kubeconfig: Path,
        config: RunnerConfig,
        namespace: str | Sequence[str] | None = None,
        selectors: Iterable[str] = (f"{POD_LABEL}",),
        nodes: Iterable[str] = (),
        node_selectors: Iterable[str] = (),
    ) -> None:
        from kubernetes import client
        from kubernetes import config as kube_config

        self.config = config
        namespaces = [namespace] if isinstance(namespace, str) else list(namespace or [])
        self.namespaces = set(namespaces)
        self.namespace = namespaces[0] if len(namespaces) == 1 else None  # the watch's scope
        self.selectors = [parse_selector(s) for s in selectors]
        self.nodes = set(nodes)
        self.node_selectors = [parse_selector(s) for s in node_selectors]
        if (self.nodes or self.node_selectors) and not config.images:
            raise ValueError("claiming pods by node needs image mode (RunnerConfig.images)")
        self.api_client = kube_config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api_client)
        self.pods: dict[tuple[str, str], RunningPod] = {}
        self.lock = threading.RLock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._node_labels: dict[str, tuple[float, dict[str, str]]] = {}
        config.workdir.mkdir(parents=True, exist_ok=True)
        self._image_store: kubelet.ImageStore | None = None  # serving mode's containers from their images
        self._token = ""
        self.kubelet: kubelet.ImageKubelet | None = None
        if config.images:
            self.kubelet = kubelet.ImageKubelet(
                self.api_client,
                kubelet.KubeletConfig(
                    workdir=config.workdir, max_runtime=config.max_runtime, grace_cap=config.grace_cap
                ),
            )

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> PodRunner:
        if self.kubelet is not None:
            self.kubelet.start()
        loops = [(self._watch_loop, "podrunner-watch"), (self._supervise_loop, "podrunner-supervise")]
        if self.config.server == "vllm" and not self.config.images:
            loops.append((self._kubelet_loop, "podrunner-kubelet"))
        for target, name in loops:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self.lock:
            pods = list(self.pods.values())
            self.pods.clear()
        for pod in pods:
            self._kill(pod)
        if self.kubelet is not None:
            self.kubelet.stop()
        if self._image_store is not None:
            kubelet.release_runner_token(self._image_store, self._token)
        for thread in self._threads:
            thread.join(timeout=5)
        self.api_client.close()

    def __enter__(self) -> PodRunner:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- queries and actions for tests -------------------------------------------------------------------

    def running(self) -> dict[str, RunningPod]:
        with self.lock:
            return {pod.name: pod for pod in self.pods.values()}

    def healthy(self, name: str) -> bool:
        pod = self.running().get(name)
        return pod is not None and all(p.healthy() for p in pod.procs.values())

    def wait_healthy(self, count: int, timeout: float = 180.0) -> dict[str, RunningPod]:
        """Wait until ``count`` pods run with every process answering /health."""
        deadline = time.monotonic() + timeout
        while True:
            pods = self.running()
            healthy = {name: pod for name, pod in pods.items() if self.healthy(name)}
            if len(healthy) >= count:
                return healthy
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(healthy)}/{count} pods healthy after {timeout:.0f}s; running={sorted(pods)}; "
                    f"logs in {self.config.workdir}"
                )
            time.sleep(0.25)

    def logs(self, namespace: str | None = None, pod: str | None = None, container: str | None = None) -> str:
        """Image mode: the logs of the containers the runner ran (every run), with a header per file."""
        root = self.config.workdir / "logs"
        parts = []
        for directory in sorted(root.glob("*")) if root.is_dir() else []:
            ns, _, rest = directory.name.partition("_")
            name = rest.rsplit("_", 1)[0]
            if namespace not in (None, ns) or pod not in (None, name):
                continue
            for path in sorted(directory.glob("*/*.log"), key=lambda p: (p.parent.name, int(p.stem))):
                if container in (None, path.parent.name):
                    text = path.read_text(errors="replace")
                    parts.append(f"==> {ns}/{name} container={path.parent.name} run={path.stem} <==\n{text}")
        return "\n".join(parts)

    def restart(self, name: str, namespace: str | None = None, agent: bool = False) -> None:
        """Kill a pod's server process (and the agent, if asked) and start it again: a container restart."""
        with self.lock:
            pod = next((p for p in self.pods.values() if p.name == name and namespace in (None, p.namespace)), None)
            if pod is None:
                raise KeyError(f"podrunner runs no pod named {name}")
            for key in ("server", "agent") if agent else ("server",):
                proc = pod.procs.get(key)
                if proc is None:
                    continue
                proc.stop(signal.SIGKILL)
                proc.restarts += 1
                proc.start()
                log.info("Restarted container pod=%s/%s container=%s", pod.namespace, pod.name, key)

    # -- the watch -----------------------------------------------------------------------------------------

    def _selected(self, pod: dict[str, Any]) -> bool:
        meta = pod["metadata"]
        if self.namespaces and meta.get("namespace") not in self.namespaces:
            return False
        labels = meta.get("labels") or {}
        if any(_matches(labels, s) for s in self.selectors):
            return True
        node = (pod.get("spec") or {}).get("nodeName")
        if not node:
            return False
        if node in self.nodes:
            return True
        return bool(self.node_selectors) and any(_matches(self._labels_of_node(node), s) for s in self.node_selectors)

    def _labels_of_node(self, name: str) -> dict[str, str]:
        cached = self._node_labels.get(name)
        if cached is not None and time.monotonic() - cached[0] < 60:
            return cached[1]
        try:
            node = self.api_client.sanitize_for_serialization(self.core.read_node(name))
            labels = dict((node.get("metadata") or {}).get("labels") or {})
        except Exception as exc:
            log.warning("Cannot read node node=%s error=%s", name, exc)
            labels = {}
        self._node_labels[name] = (time.monotonic(), labels)
        return labels

    def _list(self) -> tuple[list[dict[str, Any]], str]:
        if self.namespace:
            result: Any = self.core.list_namespaced_pod(self.namespace, _preload_content=False)
        else:
            result = self.core.list_pod_for_all_namespaces(_preload_content=False)
        data = json.loads(result.data)
        return data["items"], data["metadata"]["resourceVersion"]

    def _watch_loop(self) -> None:
        from kubernetes import watch

        while not self._stopping.is_set():
            try:
                items, version = self._list()
                seen = set()
                for pod in items:
                    seen.add((pod["metadata"]["namespace"], pod["metadata"]["name"]))
                    self._sync(pod)
                with self.lock:
                    gone = [key for key in self.pods if key not in seen]
                for key in gone:
                    self._remove(key)
                if self.kubelet is not None:
                    uids = {pod["metadata"]["uid"] for pod in items}
                    for worker in list(self.kubelet.pods().values()):
                        if worker.uid not in uids:
                            self.kubelet.deleted(worker.uid)
                stream = watch.Watch()
                func = self.core.list_namespaced_pod if self.namespace else self.core.list_pod_for_all_namespaces
                kwargs: dict[str, Any] = {"resource_version": version, "timeout_seconds": 30}
                if self.namespace:
                    kwargs["namespace"] = self.namespace
                for event in stream.stream(func, **kwargs):
                    if self._stopping.is_set():
                        stream.stop()
                        break
                    obj = event["object"]
                    pod = self.api_client.sanitize_for_serialization(obj)
                    if event["type"] == "DELETED":
                        self._remove((pod["metadata"]["namespace"], pod["metadata"]["name"]))
                        if self.kubelet is not None:
                            self.kubelet.deleted(pod["metadata"]["uid"])
                    else:
                        self._sync(pod)
            except Exception as exc:
                if not self._stopping.is_set():
                    log.warning("Pod watch failed, relisting error=%s", exc)
                    self._stopping.wait(1.0)

    def _sync(self, pod: dict[str, Any]) -> None:
        if self.kubelet is not None:
            if self.kubelet.owns(pod["metadata"]["uid"]) or self._selected(pod):
                self.kubelet.sync(pod)
            return
        meta, status = pod["metadata"], pod.get("status") or {}
        key = (meta["namespace"], meta["name"])
        wanted = (
            self._selected(pod)
            and not meta.get("deletionTimestamp")
            and status.get("phase") == "Running"
            and bool(status.get("podIP"))
        )
        with self.lock:
            current = self.pods.get(key)
            if current is not None and (not wanted or current.uid != meta["uid"] or current.ip != status.get("podIP")):
                self._remove(key)
                current = None
            if wanted and current is None:
                try:
                    running = self._launch(pod)
                except Exception as exc:
                    log.warning("Cannot run pod pod=%s/%s error=%s", key[0], key[1], exc)
                    return
                self.pods[key] = running

    def _remove(self, key: tuple[str, str]) -> None:
        with self.lock:
            pod = self.pods.pop(key, None)
        if pod is not None:
            self._kill(pod)
            shutil.rmtree(pod.directory / "adapters", ignore_errors=True)
            shutil.rmtree(shared_adapters_dir(pod.uid, create=False).parent, ignore_errors=True)
            log.info("Stopped pod pod=%s/%s ip=%s", pod.namespace, pod.name, pod.ip)

    def _kill(self, pod: RunningPod) -> None:
        for proc in pod.procs.values():
            proc.stop()

    # -- processes -----------------------------------------------------------------------------------------

    def _container_env(self, namespace: str, container: dict[str, Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in container.get("env") or []:
            if "value" in item and item["value"] is not None:
                out[item["name"]] = str(item["value"])
                continue
            ref = ((item.get("valueFrom") or {}).get("secretKeyRef")) or None
            if ref:
                try:
                    secret = self.core.read_namespaced_secret(ref["name"], namespace)
                    value = (secret.data or {}).get(ref["key"])
                except Exception:
                    value = None
                if value is not None:
                    out[item["name"]] = base64.b64decode(value).decode()
        return out

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.config.env)
        env["PYTHONPATH"] = os.pathsep.join([*_SOURCE_ROOTS, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)  # only what the pod's container says
        return env

    def _launch(self, pod: dict[str, Any]) -> RunningPod:
        meta, spec = pod["metadata"], pod["spec"]
        namespace, name, ip = meta["namespace"], meta["name"], pod["status"]["podIP"]
        server = _container(pod, SERVER_CONTAINER) or spec["containers"][0]
        agent = _container(pod, AGENT_CONTAINER)
        directory = self.config.workdir / f"{namespace}.{name}"
        adapters = directory / "adapters"
        adapters.mkdir(parents=True, exist_ok=True)
        server_args = _args(server)
        server_port = _port(server, server_args, 8000)
        agent_port = _port(agent, _args(agent), DEFAULT_AGENT_PORT) if agent is not None else None
        python = self.config.python
        procs: dict[str, Proc] = {}
        configmaps: list[tuple[dict[str, Any], Path, str]] = []
        env = self._base_env()
        server_env = {**env, **self._container_env(namespace, server)}
        annotations = meta.get("annotations") or {}
        if self.config.server == "fake":
            command = [python, "-m", "kubelora.devenv.podrunner", "fake-vllm", "--host", ip, "--port", str(server_port)]
            rank = _flag_value(server_args, "--max-lora-rank")
            if rank:
                command += ["--max-lora-rank", rank]
            # fake mode runs the agent from its image only when asked (agent_from_image=True): 50 fake pods stay light
            image = self._agent_image(agent) if agent is not None and self.config.agent_from_image else None
            if agent is not None and image is None:
                # one process plays both containers
                command += ["--agent-port", str(agent_port), "--agent-dir", str(adapters)]
                agent_env = self._container_env(namespace, agent)
                server_env.update(agent_env)
            procs["server"] = Proc(
                "server", command, server_env, directory / "server.log", f"http://{ip}:{server_port}/health"
            )
            if agent is not None and image is not None:
                procs["agent"] = self._agent_from_image(pod, agent, image, adapters, agent_port or 0)
            elif agent is not None:
                procs["agent-health"] = _HealthOnly(
                    "agent",
                    [],
                    {},
                    directory / "server.log",
                    f"http://{ip}:{agent_port}/health",
                    parent=procs["server"],
                )
        elif self.config.server == "vllm":
            if agent is None:
                raise ValueError(f"pod {namespace}/{name} has no {AGENT_CONTAINER} container")
            model = annotations.get(MODEL_ANNOTATION) or (str(self.config.model_dir) if self.config.model_dir else None)
            if not model:
                raise ValueError(f"no model directory: set RunnerConfig.model_dir or the {MODEL_ANNOTATION} annotation")
            procs["server"] = self._vllm_from_image(pod, server, Path(model), server_port)
            agent_image = self._agent_image(agent)
            if agent_image is None:
                raise ValueError(f"agent image {agent.get('image')} is not in buildah's local store: make images")
            configmaps = self._configmap_volumes(pod, agent)
            config_mounts = [(host, mount, True) for _, host, mount in configmaps]
            procs["agent"] = self._agent_from_image(pod, agent, agent_image, adapters, agent_port or 0, config_mounts)
        else:
            raise ValueError(f"unknown server mode {self.config.server!r}: vllm or fake")
        for proc in procs.values():
            proc.start()
        log.info("Started pod pod=%s/%s ip=%s server=%s agent=%s", namespace, name, ip, self.config.server, agent_port)
        running = RunningPod(namespace, name, meta["uid"], ip, directory, procs, server_port, agent_port)
        if self.config.server == "vllm" and agent is not None:
            running.configmaps = [(source, host) for source, host, _ in configmaps]
            running.refreshed = time.monotonic()
            for key, container in (("server", server), ("agent", agent)):
                http = (container.get("readinessProbe") or {}).get("httpGet") or {"path": "/health"}
                port = server_port if key == "server" else agent_port
                url = f"http://{ip}:{port}{http.get('path') or '/'}"
                threshold = int((container.get("readinessProbe") or {}).get("failureThreshold") or 3)
                running.probes[key] = {"url": url, "threshold": threshold, "ready": False, "failures": 0, "since": 0.0}
        return running

    def _agent_image(self, agent: dict[str, Any]) -> kubelet.Image | None:
        if self.config.agent_from_image is False:
            return None
        image = self._store().resolve(str(agent.get("image", "")))
        if image is None and self.config.agent_from_image:
            raise ValueError(f"agent image {agent.get('image')} is not in buildah's local store")
        return image

    def _store(self) -> kubelet.ImageStore:
        if self._image_store is None:
            self._image_store = kubelet.ImageStore()
            self._token = kubelet.new_runner_token()
        return self._image_store

    def _agent_from_image(
        self,
        pod: dict[str, Any],
        agent: dict[str, Any],
        image: kubelet.Image,
        adapters: Path,
        port: int,
        extra_mounts: Sequence[tuple[Path, str, bool]] = (),
    ) -> ImageProc:
        """The agent container from its image, as a kubelet runs it (env, user, command), except that it binds
        the pod IP and keeps adapters in the pod's host directory, mounted at the same path, so the server
        (a host process, or vLLM from its image with the same mount) can load the paths the agent reports."""
        # The container runs as the image's user (65532), which cannot traverse a workdir under /root; the
        # adapters live where every uid can reach them, at the same path on the host and in the container.
        adapters = shared_adapters_dir(pod["metadata"]["uid"])
        adapters.chmod(0o777)
        flags = {"--host": pod["status"]["podIP"], "--port": str(port), "--dir": str(adapters)}
        if "--base-model" in _args(agent):
            flags["--base-model"] = PODRUNNER_MODEL  # what vLLM's --model is here (its resolver compares them)
        if "--names-dir" in _args(agent):
            flags["--names-dir"] = str(adapters)
        mounts = [(adapters, str(adapters), False), *extra_mounts]
        return self._from_image(pod, agent, image, "agent", flags, mounts, port)

    def _configmap_volumes(
        self, pod: dict[str, Any], container: dict[str, Any]
    ) -> list[tuple[dict[str, Any], Path, str]]:
        """The container's configMap volumes, written from the API beside the pod's adapters (kubelet's files)."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        root = shared_adapters_dir(pod["metadata"]["uid"]).parent / "volumes"
        out = []
        for mount in container.get("volumeMounts") or []:
            source = (volumes.get(mount["name"]) or {}).get("configMap")
            if source is None:
                continue
            host = root / mount["name"]
            self._write_configmap(pod["metadata"]["namespace"], source, host)
            out.append((source, host, str(mount["mountPath"])))
        return out

    def _write_configmap(self, namespace: str, source: dict[str, Any], host: Path) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj = self.core.read_namespaced_config_map(source["name"], namespace)
            data: dict[str, bytes] | None = {k: v.encode() for k, v in (obj.data or {}).items()}
        except ApiException as exc:
            if exc.status != 404:
                raise
            if not source.get("optional"):
                raise ValueError(f'configmap "{source["name"]}" not found') from exc
            data = None
        mode = int(source.get("defaultMode") or 0o644)
        files = {} if data is None else {k: (v, mode) for k, v in data.items()}
        for item in source.get("items") or []:
            if data is not None and item["key"] in data:
                files.pop(item["key"], None)
                files[item["path"]] = (data[item["key"]], int(item.get("mode") or mode))
        kubelet.Volumes._write(host, files, None)

    def _vllm_from_image(self, pod: dict[str, Any], server: dict[str, Any], model: Path, port: int) -> ImageProc:
        """vLLM from the server container's image, with its entrypoint, args and env, bound to the pod IP, serving
        ``model`` (mounted read-only at /mnt/podrunner-model) and reading adapters from the agent's directory."""
        image = self._store().resolve(str(server.get("image", "")))
        if image is None:
            raise ValueError(f"vLLM image {server.get('image')} is not in buildah's local store: make images")
        adapters = shared_adapters_dir(pod["metadata"]["uid"])
        adapters.chmod(0o777)
        model_copy = _readable_model(model)
        flags = {"--host": pod["status"]["podIP"], "--port": str(port), "--model": PODRUNNER_MODEL}
        mounts = [(adapters, str(adapters), True), (model_copy, PODRUNNER_MODEL, True)]
        proc = self._from_image(pod, server, image, "server", flags, mounts, port)
        if "VLLM_LORA_RESOLVER_CACHE_DIR" in proc.env:
            proc.env["VLLM_LORA_RESOLVER_CACHE_DIR"] = str(adapters)  # /adapters is at the host path here
        return proc

    def _from_image(
        self,
        pod: dict[str, Any],
        container: dict[str, Any],
        image: kubelet.Image,
        role: str,
        flags: dict[str, str],
        mounts: list[tuple[Path, str, bool]],
        port: int,
    ) -> ImageProc:
        meta = pod["metadata"]
        ip = pod["status"]["podIP"]
        kube = kubelet.Kube(self.api_client)
        lookup = kubelet.Lookup(kube, meta["namespace"], pod["spec"].get("nodeName"))
        env = kubelet.container_env(pod, container, lookup, kubelet.service_env(kube.host, kube.port))
        argv = kubelet.container_command(container, image.config, env)
        for flag, value in flags.items():
            argv = _replace_flag(argv, flag, value)
        name = kubelet.container_name(self._token, meta["namespace"], meta["name"], container["name"], meta["uid"])
        mounts = mounts + _scratch_mounts(pod, container)
        return ImageProc(
            role,
            [],
            env,
            shared_adapters_dir(meta["uid"]).parent / f"{role}.log",
            f"http://{ip}:{port}/health",
            store=self._store(),
            image=image,
            working=name,
            argv=argv,
            user=kubelet.container_user(pod, container, image.config),
            workdir=container.get("workingDir") or image.config.get("WorkingDir") or "/",
            hostname=meta["name"][:63],
            mounts=mounts,
        )

    def _kubelet_loop(self) -> None:
        """Serving mode, as a kubelet: refresh ConfigMap volumes in place, and write the pods' Ready condition
        from their containers' readinessProbes (a restarted or exited container is not ready until it passes)."""
        while not self._stopping.wait(1.0):
            with self.lock:
                pods = list(self.pods.values())
            for pod in pods:
                try:
                    self._kubelet_pass(pod)
                except Exception as exc:
                    log.warning("Pod status update failed pod=%s/%s error=%s", pod.namespace, pod.name, exc)

    def _kubelet_pass(self, pod: RunningPod) -> None:
        now = time.monotonic()
        if pod.configmaps and now - pod.refreshed >= 2.0:
            pod.refreshed = now
            for source, host in pod.configmaps:
                self._write_configmap(pod.namespace, source, host)
        for key, probe in pod.probes.items():
            proc = pod.procs.get(key)
            alive = proc is not None and proc.process is not None and proc.process.poll() is None
            if proc is None or not alive or proc.started_at != probe["since"]:
                # a new (or dead) container starts not ready
                probe.update(ready=False, failures=0, since=proc.started_at if proc is not None else 0.0)
                if not alive:
                    continue
            if _probe(probe["url"]):
                probe.update(ready=True, failures=0)
            else:
                probe["failures"] += 1
                if probe["failures"] >= probe["threshold"]:
                    probe["ready"] = False
        ready = bool(pod.probes) and all(p["ready"] for p in pod.probes.values())
        if ready == pod.ready:
            return
        with self.lock:
            if self.pods.get((pod.namespace, pod.name)) is not pod:
                return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        value = "True" if ready else "False"
        conditions = [
            {"type": kind, "status": value, "lastTransitionTime": stamp}
            | ({} if ready else {"reason": "ContainersNotReady"})
            for kind in ("Ready", "ContainersReady")
        ]
        self.core.patch_namespaced_pod_status(
            pod.name,
            pod.namespace,
            {"status": {"conditions": conditions}},
            _content_type="application/strategic-merge-patch+json",
        )
        pod.ready = ready
        log.info("Pod readiness pod=%s/%s ready=%s", pod.namespace, pod.name, ready)

    def _supervise_loop(self) -> None:
        while not self._stopping.wait(0.5):
            with self.lock:
                pods = list(self.pods.values())
            for pod in pods:
                for proc in pod.procs.values():
                    if isinstance(proc, _HealthOnly) or proc.process is None or proc.process.poll() is None:
                        continue
                    now = time.monotonic()
                    if proc.next_start == 0.0:
                        delay = min(10.0, 0.5 * 2 ** min(proc.restarts, 5))
                        if now - proc.started_at > 60:
                            delay = 0.5
                        proc.next_start = now + delay
                        log.warning(
                            "Container exited pod=%s/%s container=%s code=%s restartIn=%.1fs",
                            pod.namespace,
                            pod.name,
                            proc.name,
                            proc.process.returncode,
                            delay,
                        )
                    elif now >= proc.next_start:
                        with self.lock:
                            if (pod.namespace, pod.name) not in self.pods:
                                continue
                            proc.next_start = 0.0
                            proc.restarts += 1
                            proc.start()


PODRUNNER_MODEL = "/mnt/podrunner-model"


def _probe(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - a 127.x pod IP
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _scratch_mounts(pod: dict[str, Any], container: dict[str, Any]) -> list[tuple[Path, str, bool]]:
    """The container's disk-backed emptyDirs (a writable HOME, caches), as directories beside the pod's adapters.

    The agent's own emptyDirs are the adapter directory, which serving mode shares at a fixed host path instead;
    memory-backed ones (/dev/shm) are left to buildah, which gives every container its own.
    """
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    agent = _container(pod, AGENT_CONTAINER) or {}
    agent_volumes = {m["name"] for m in agent.get("volumeMounts") or []}
    root = shared_adapters_dir(pod["metadata"]["uid"]).parent / "volumes"
    mounts = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"]) or {}
        empty = volume.get("emptyDir")
        if empty is None or empty.get("medium") == "Memory" or mount["name"] in agent_volumes:
            continue
        host = root / mount["name"]
        host.mkdir(parents=True, exist_ok=True)
        host.chmod(0o777)
        mounts.append((host, str(mount["mountPath"]), bool(mount.get("readOnly"))))
    return mounts


@dataclasses.dataclass
class _HealthOnly(Proc):
    """A container played by another process (fake mode): only its /health is checked."""

    parent: Proc | None = None

    def start(self) -> None:
        return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        return None

    def healthy(self) -> bool:
        if self.parent is None or self.parent.process is None or self.parent.process.poll() is not None:
            return False
        self.process = self.parent.process
        return Proc.healthy(self)


@dataclasses.dataclass
class ImageProc(Proc):
    """A container run from its image with buildah (serving mode: vLLM, the agent); restarts recreate it."""

    store: kubelet.ImageStore | None = None
    image: kubelet.Image | None = None
    working: str = ""
    argv: list[str] = dataclasses.field(default_factory=list)
    user: str = "0"
    workdir: str = "/"
    hostname: str = ""
    mounts: list[tuple[Path, str, bool]] = dataclasses.field(default_factory=list)

    def start(self) -> None:
        assert self.store is not None and self.image is not None
        _, rootfs = self.store.create(self.working, self.image.id)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.touch()
        command, runtime_log = kubelet.run_command(
            self.store.buildah,
            self.working,
            rootfs,
            self.argv,
            self.env,
            self.user,
            self.workdir,
            self.hostname,
            self.mounts,
            self.log_path,
        )
        with (runtime_log or self.log_path).open("ab") as out:
            out.write(f"--- podrunner: starting {self.image.ref} {' '.join(self.argv)}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started_at = time.monotonic()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        Proc.stop(self, sig, timeout)
        if self.store is not None:
            self.store.remove(self.working)


def _readable_model(model: Path) -> Path:
    """A copy of ``model`` that any uid can read (the vLLM image runs as 65532; pytest's and the demo's
    temporary directories are root's alone), under the shared directory, keyed by its files' names, sizes and times."""
    files = sorted(p for p in model.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(model)}\0{path.stat().st_size}\0{path.stat().st_mtime_ns}\0".encode())
    target = SHARED_ROOT / "models" / digest.hexdigest()[:16]
    if not target.is_dir():
        staging = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(model, staging)
        for path in [staging, *staging.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        with contextlib.suppress(OSError):
            staging.rename(target)  # another runner may have made the same copy first
        shutil.rmtree(staging, ignore_errors=True)
    target.parent.chmod(0o755)
    return target


def _replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """``--flag X`` / ``--flag=X`` set to ``value`` (appended when absent)."""
    out: list[str] = []
    i, found = 0, False
    while i < len(argv):
        if argv[i] == flag and i + 1 < len(argv):
            out += [flag, value]
            i, found = i + 2, True
            continue
        if argv[i].startswith(flag + "="):
            out.append(f"{flag}={value}")
            i, found = i + 1, True
            continue
        out.append(argv[i])
        i += 1
    return out if found else [*out, flag, value]


# ------------------------------------------------------------------------------------------------------------
# A light fake vLLM for benchmarks with many pods: runtime LoRA endpoints only, no model.


def fake_vllm_app(max_lora_rank: int = 64, model_name: str = "fake-base") -> Any:
    from aiohttp import web

    adapters: dict[str, str] = {}

    def error(message: str, kind: str, status: int) -> web.Response:
        body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
        return web.json_response(body, status=status)

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(_: web.Request) -> web.Response:
        cards = [{"id": model_name, "object": "model", "root": model_name, "parent": None}]
        cards += [{"id": n, "object": "model", "root": p, "parent": model_name} for n, p in adapters.items()]
        return web.json_response({"object": "list", "data": cards})

    async def load(request: web.Request) -> web.Response:
        body = await request.json()
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
        if name in adapters and not body.get("load_inplace"):
            return error(
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                "set 'load_inplace' to True.",
                "InvalidUserInput",
                400,
            )
        config_path = Path(path) / "adapter_config.json"
        if not config_path.is_file():
            return error(f"No adapter found for {path}", "NotFoundError", 404)
        rank = int(json.loads(config_path.read_text()).get("r", 0))
        if rank > max_lora_rank:
            return error(f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}.", "BadRequestError", 400)
        adapters[name] = path
        return web.Response(status=200, text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(request: web.Request) -> web.Response:
        body = await request.json()
        name = body.get("lora_name")
        if name not in adapters:
            return error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        del adapters[name]
        return web.Response(status=200, text=f"Success: LoRA adapter '{name}' removed successfully.")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/load_lora_adapter", load)
    app.router.add_post("/v1/unload_lora_adapter", unload)
    return app


async def _serve_fake(args: argparse.Namespace) -> None:
    from aiohttp import web

    runners = []
    apps = [(fake_vllm_app(args.max_lora_rank), args.port)]
    if args.agent_port:
        from kubelora.serving.agent import TOKEN_ENV, AdapterStore, build_app, preload

        preload()
        # The agent container's env (its token from the pod's Secret) is merged into this process's env.
        apps.append((build_app(AdapterStore(Path(args.agent_dir)), os.environ.get(TOKEN_ENV, "")), args.agent_port))
    for app, port in apps:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, port).start()
        runners.append(runner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for runner in runners:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubelora.devenv.podrunner", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="Run matching pods of the dev cluster until interrupted")
    run.add_argument("--model", type=Path, help="Local model directory vLLM serves (serving mode)")
    run.add_argument(
        "--namespace", action="append", default=None, help="Only this namespace; repeat for more (default: all)"
    )
    run.add_argument(
        "--selector",
        action="append",
        default=None,
        help=f"Pod label selector, a=b,c,!d; repeat for more (default {POD_LABEL}; with --images, every pod but "
        f"those, {NOT_SERVING}, or none with --node/--node-selector)",
    )
    run.add_argument("--server", choices=("vllm", "fake"), default="vllm")
    run.add_argument("--workdir", type=Path, default=cluster.state_dir() / "podrunner")
    run.add_argument("--nodes", type=int, default=1, help="Serving-pool nodes to create")
    image = run.add_argument_group("image mode: run containers from their images with buildah, as a kubelet")
    image.add_argument("--images", action="store_true", help="Run pods' containers from local images")
    image.add_argument("--node", action="append", default=[], help="Also claim pods on this node; repeatable")
    image.add_argument(
        "--node-selector",
        action="append",
        default=[],
        help="Also claim pods on nodes with these labels, e.g. kubelora.dev/pool=a100; repeatable",
    )
    image.add_argument(
        "--max-runtime",
        type=float,
        default=1800.0,
        help="Longest container run when the pod has no activeDeadlineSeconds, seconds (0: unbounded)",
    )
    image.add_argument("--grace-cap", type=float, default=10.0, help="Cap on termination grace periods, seconds")
    image.add_argument(
        "--build-images",
        default="",
        help="Comma-separated image names to build first with kubelora.devenv.images.ensure_images",
    )
    fake = sub.add_parser("fake-vllm", help="Serve the light fake vLLM (and optionally the agent) on one address")
    fake.add_argument("--host", required=True)
    fake.add_argument("--port", type=int, default=8000)
    fake.add_argument("--max-lora-rank", type=int, default=64)
    fake.add_argument("--agent-port", type=int, default=None)
    fake.add_argument("--agent-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.command == "fake-vllm":
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
        asyncio.run(_serve_fake(args))
        return 0
    env = cluster.load()
    if env is None:
        print("The environment is not running; start it with: make dev-up", file=sys.stderr)
        return 1
    if (args.node or args.node_selector) and not args.images:
        parser.error("--node and --node-selector need --images")
    nodes = ensure_serving_nodes(env, args.nodes)
    if args.build_images:
        import importlib

        images = importlib.import_module("kubelora.devenv.images")
        for name, ref in images.ensure_images([n.strip() for n in args.build_images.split(",") if n.strip()]).items():
            print(f"Image {name}: {ref}", file=sys.stderr)
    config = RunnerConfig(
        workdir=args.workdir,
        model_dir=args.model,
        server=args.server,
        env={k: v for k, v in env.env().items() if k != "PATH"},
        images=args.images,
        max_runtime=args.max_runtime or None,
        grace_cap=args.grace_cap,
    )
    by_node = bool(args.node or args.node_selector)
    if args.images and not (args.namespace or args.selector or by_node):
        parser.error("--images needs --namespace, --selector, --node or --node-selector: it takes pods over")
    if args.selector is not None:
        selectors = args.selector
    elif args.images:
        selectors = [] if by_node else [NOT_SERVING]
    else:
        selectors = [POD_LABEL]
    runner = PodRunner(
        env.kubeconfig, config, args.namespace, selectors, nodes=args.node, node_selectors=args.node_selector
    )
    if args.images:
        print(
            f"Running pods labelled {selectors} or on nodes {args.node} / nodes labelled {args.node_selector} "
            f"in namespaces {args.namespace or 'all'} from their images. Ctrl-C stops.",
            file=sys.stderr,
        )
    else:
        print(
            f"Running pods labelled {selectors} on nodes {nodes}; "
            f"schedule them with nodeSelector {NODE_SELECTOR} and tolerations {TOLERATIONS}. Ctrl-C stops.",
            file=sys.stderr,
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with runner, contextlib.suppress(KeyboardInterrupt):
        while not stop.wait(1.0):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
