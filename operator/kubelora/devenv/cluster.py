"""Start and stop the local environment: a real control plane (kwokctl, binary runtime) and MinIO.

The control plane is the upstream etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, wired together by ``kwokctl --runtime binary``; kwok plays the kubelets of
fake GPU nodes. MinIO runs as a local process. Everything a client needs to connect is
written to ``state_dir()/env.json`` and ``state_dir()/kubeconfig``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from kubelora.devenv import tools

CLUSTER_NAME = "kubelora"
STAGES_FILE = Path(__file__).with_name("stages.yaml")
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


@dataclasses.dataclass(frozen=True)
class GPUPool:
    """Fake GPU nodes that look like those NVIDIA's GPU feature discovery labels."""

    name: str
    count: int
    gpus_per_node: int
    product: str
    memory_mib: int
    family: str = "ampere"
    pod_cidr_base: str | None = None


DEFAULT_POOLS = (
    GPUPool("a100", 2, 8, "NVIDIA-A100-SXM4-80GB", 81920, "ampere"),
    GPUPool("l4", 1, 1, "NVIDIA-L4", 23034, "ada-lovelace"),
)


def state_dir() -> Path:
    override = os.environ.get("KUBELORA_DEVENV_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kubelora" / "devenv"


@dataclasses.dataclass(frozen=True)
class DevEnv:
    """How to reach a running environment."""

    kubeconfig: Path
    minio_endpoint: str
    minio_access_key: str
    minio_secret_key: str
    minio_pid: int
    bin_dir: Path

    @property
    def kubectl(self) -> Path:
        return tools.KUBERNETES.path("kubectl")

    def env(self) -> dict[str, str]:
        """Environment for child processes (kubectl, the operator): the cluster, never S3 credentials.

        Everything that reads S3 gets its credentials from a Secret named in a spec, as in a real
        cluster; a process that inherited MinIO's root keys would hide a broken secretRef.
        """
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def s3_env(self) -> dict[str, str]:
        """MinIO's endpoint and root keys, for a person at a shell (env.sh), never for tests' children."""
        return {
            "S3_ENDPOINT": self.minio_endpoint,
            "AWS_ACCESS_KEY_ID": self.minio_access_key,
            "AWS_SECRET_ACCESS_KEY": self.minio_secret_key,
        }

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DevEnv:
        return cls(
            kubeconfig=Path(data["kubeconfig"]),
            minio_endpoint=data["minio_endpoint"],
            minio_access_key=data["minio_access_key"],
            minio_secret_key=data["minio_secret_key"],
            minio_pid=int(data["minio_pid"]),
            bin_dir=Path(data["bin_dir"]),
        )


def _log(message: str, **fields: object) -> None:
    pairs = " ".join(f"{k}={v}" for k, v in fields.items())
    print(f"{message} {pairs}".rstrip(), file=sys.stderr, flush=True)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_for(description: str, check: Any, timeout: float = 60.0, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"Timed out after {timeout:.0f}s waiting for {description}: {last_error}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback only
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _kwok_env() -> dict[str, str]:
    env = dict(os.environ)
    env["KWOK_WORKDIR"] = str(state_dir() / "kwok")
    env["PATH"] = f"{tools.KUBERNETES.directory}{os.pathsep}{env.get('PATH', '')}"
    return env


def kubectl(env: DevEnv, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(env.kubectl), "--kubeconfig", str(env.kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
        check=check,
    )


def _cluster_healthy(env: DevEnv) -> bool:
    if not env.kubeconfig.is_file():
        return False
    result = kubectl(env, "get", "--raw", "/readyz", check=False)
    return result.returncode == 0 and result.stdout.strip() == "ok"


def _minio_healthy(env: DevEnv) -> bool:
    return _pid_alive(env.minio_pid) and _http_ok(f"http://{env.minio_endpoint}/minio/health/live")


def load() -> DevEnv | None:
    """The running environment, or None when none is up and healthy."""
    path = state_dir() / "env.json"
    if not path.is_file():
        return None
    env = DevEnv.from_json(json.loads(path.read_text()))
    if _cluster_healthy(env) and _minio_healthy(env):
        return env
    return None


def gpu_node(pool: GPUPool, index: int) -> dict[str, Any]:
    name = f"gpu-{pool.name}-{index}"
    resources = {"cpu": "96", "memory": "1100Gi", "pods": "110", "nvidia.com/gpu": str(pool.gpus_per_node)}
    node: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "kubelora.dev/pool": pool.name,
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": pool.product,
                "nvidia.com/gpu.memory": str(pool.memory_mib),
                "nvidia.com/gpu.count": str(pool.gpus_per_node),
                "nvidia.com/gpu.family": pool.family,
                "nvidia.com/gpu.machine": "kwok-fake",
                "nvidia.com/cuda.driver.major": "570",
                "nvidia.com/cuda.runtime.major": "12",
            },
        },
        "spec": {"taints": [GPU_TAINT]},
        "status": {
            "allocatable": resources,
            "capacity": resources,
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": f"fake-{tools.KUBERNETES_VERSION}",
                "containerRuntimeVersion": "kwok",
            },
        },
    }
    if pool.pod_cidr_base:
        node["spec"]["podCIDR"] = pool.pod_cidr_base.format(index=index)
    return node


def cpu_node(name: str = "cpu-0") -> dict[str, Any]:
    resources = {"cpu": "256", "memory": "1Ti", "pods": "2000"}  # room for the 1,000-job benchmark
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok"},
        },
        "status": {"allocatable": resources, "capacity": resources},
    }


def apply_nodes(env: DevEnv, nodes: Iterable[dict[str, Any]]) -> None:
    kubectl(env, "apply", "-f", "-", input=yaml.safe_dump_all(list(nodes)))


def parse_pools(text: str) -> tuple[GPUPool, ...]:
    """Pools from YAML: a list of {name, count, gpusPerNode, product, memoryMiB, family}."""
    items = yaml.safe_load(text) or []
    pools = []
    for position, item in enumerate(items):
        try:
            pools.append(
                GPUPool(
                    name=str(item["name"]),
                    count=int(item["count"]),
                    gpus_per_node=int(item["gpusPerNode"]),
                    product=str(item["product"]),
                    memory_mib=int(item["memoryMiB"]),
                    family=str(item.get("family", "unknown")),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"GPU pool {position}: {exc!r}; expected name, count, gpusPerNode, product, memoryMiB"
            ) from exc
    return tuple(pools)


def _configured_pools() -> tuple[GPUPool, ...]:
    path = os.environ.get("KUBELORA_DEVENV_GPU_POOLS")
    return parse_pools(Path(path).read_text()) if path else DEFAULT_POOLS


def _start_minio(directory: Path) -> tuple[str, int, str, str]:
    data = directory / "minio-data"
    data.mkdir(parents=True, exist_ok=True)
    credentials_file = directory / "minio-credentials.json"
    if credentials_file.is_file():
        credentials = json.loads(credentials_file.read_text())
    else:
        credentials = {"accessKey": "kubelora", "secretKey": secrets.token_hex(16)}
        credentials_file.write_text(json.dumps(credentials))
        credentials_file.chmod(0o600)
    port, console_port = _free_port(), _free_port()
    endpoint = f"127.0.0.1:{port}"
    log = (directory / "minio.log").open("ab")
    env = dict(os.environ, MINIO_ROOT_USER=credentials["accessKey"], MINIO_ROOT_PASSWORD=credentials["secretKey"])
    env["MINIO_BROWSER"] = "off"
    process = subprocess.Popen(
        [
            str(tools.MINIO.path()),
            "server",
            str(data),
            "--address",
            endpoint,
            "--console-address",
            f"127.0.0.1:{console_port}",
            "--quiet",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    _wait_for("MinIO", lambda: _http_ok(f"http://{endpoint}/minio/health/live") or process.poll() is not None, 60)
    if process.poll() is not None:
        raise RuntimeError(f"MinIO exited with code {process.returncode}; see {directory / 'minio.log'}")
    return endpoint, process.pid, credentials["accessKey"], credentials["secretKey"]


def _kwokctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(tools.KWOK.path("kwokctl")), "--name", CLUSTER_NAME, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_kwok_env(), check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"kwokctl {' '.join(args)} failed with code {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def _create_cluster(kubeconfig: Path) -> None:
    _kwokctl("delete", "cluster", check=False)
    _kwokctl(
        "create",
        "cluster",
        "--runtime",
        "binary",
        "--etcd-binary",
        str(tools.ETCD.path()),
        "--kube-apiserver-binary",
        str(tools.KUBERNETES.path("kube-apiserver")),
        "--kube-controller-manager-binary",
        str(tools.KUBERNETES.path("kube-controller-manager")),
        "--kube-scheduler-binary",
        str(tools.KUBERNETES.path("kube-scheduler")),
        "--kwok-controller-binary",
        str(tools.KWOK.path("kwok")),
        "--kube-authorization",
        "--config",
        str(STAGES_FILE),
        "--kubeconfig",
        str(kubeconfig),
        "--wait",
        "120s",
    )


def up(pools: tuple[GPUPool, ...] | None = None) -> DevEnv:
    """Bring the environment up, or return the one already running."""
    existing = load()
    if existing is not None:
        _log("Reusing running environment", kubeconfig=existing.kubeconfig, minio=existing.minio_endpoint)
        return existing
    tools.build_all((tools.ETCD, tools.KUBERNETES, tools.KWOK, tools.MINIO))
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    _stop_minio(directory)
    started = time.monotonic()
    endpoint, pid, access_key, secret_key = _start_minio(directory)
    _log("Started MinIO", endpoint=endpoint, pid=pid)
    kubeconfig = directory / "kubeconfig"
    _create_cluster(kubeconfig)
    env = DevEnv(kubeconfig, endpoint, access_key, secret_key, pid, tools.KUBERNETES.directory)
    _wait_for("the API server", lambda: _cluster_healthy(env), 120)
    _wait_for(
        "the default ServiceAccount",
        lambda: kubectl(env, "get", "serviceaccount", "default", check=False).returncode == 0,
        60,
    )
    nodes = [cpu_node()] + [gpu_node(p, i) for p in (pools or _configured_pools()) for i in range(p.count)]
    apply_nodes(env, nodes)
    _wait_for("the fake nodes to be Ready", lambda: _nodes_ready(env, len(nodes)), 60)
    (directory / "env.json").write_text(json.dumps(env.to_json(), indent=2))
    _write_env_file(directory, env)
    _log("Environment is up", seconds=f"{time.monotonic() - started:.1f}")
    return env


def _nodes_ready(env: DevEnv, expected: int) -> bool:
    result = kubectl(env, "get", "nodes", "-o", "json", check=False)
    if result.returncode != 0:
        return False
    ready = 0
    for node in json.loads(result.stdout)["items"]:
        conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        ready += conditions.get("Ready") == "True"
    return ready >= expected


def _write_env_file(directory: Path, env: DevEnv) -> None:
    lines = [f"export {key}={value}" for key, value in {**env.env(), **env.s3_env()}.items() if key != "PATH"]
    lines.append(f"export PATH={env.bin_dir}:$PATH")
    (directory / "env.sh").write_text("\n".join(lines) + "\n")


def _stop_minio(directory: Path) -> None:
    path = directory / "env.json"
    if not path.is_file():
        return
    pid = int(json.loads(path.read_text()).get("minio_pid", 0))
    if pid and _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            _wait_for("MinIO to stop", lambda: not _pid_alive(pid), 15)


def down() -> None:
    """Stop the control plane and MinIO. Data in MinIO and the build cache are kept."""
    directory = state_dir()
    if tools.KWOK.is_built():
        _kwokctl("delete", "cluster", check=False)
    _stop_minio(directory)
    (directory / "env.json").unlink(missing_ok=True)
    _log("Environment is down", state=directory)


def describe(env: DevEnv) -> str:
    nodes = kubectl(
        env,
        "get",
        "nodes",
        "-L",
        "nvidia.com/gpu.product,nvidia.com/gpu.count",
        "-o",
        'custom-columns=NAME:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,'
        "GPUS:.status.allocatable.nvidia\\.com/gpu,PRODUCT:.metadata.labels.nvidia\\.com/gpu\\.product",
    ).stdout
    return (
        f"kubeconfig:     {env.kubeconfig}\n"
        f"MinIO endpoint: http://{env.minio_endpoint}\n"
        f"MinIO access:   {env.minio_access_key} (secret key in {state_dir() / 'minio-credentials.json'})\n"
        f"Shell setup:    source {state_dir() / 'env.sh'}\n\n{nodes}"
    )
