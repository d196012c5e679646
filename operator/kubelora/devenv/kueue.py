"""A real Kueue (``sigs.k8s.io/kueue``, built by :mod:`kubelora.devenv.tools`) next to the local control plane.

Additive: it is its own process, started by whoever needs it (``tests/queueing``) and stopped after; the
control plane is not restarted. Its CRDs come from the same module's source (``config/components/crd/bases``),
applied server-side; they stay installed (harmless, and the next start finds them).

**Webhooks are left out.** Kueue's webhooks do two things for a batch/v1 Job: the mutating one suspends a Job
that names a queue, and the validating ones check Kueue's own objects. The operator creates its Jobs suspended
itself (``spec.queueName``), and the objects here are written by tests, so nothing depends on them. Registering
webhooks that point at a loopback URL would put a process that tests start and stop into the admission path of
every Job and Kueue object of the shared cluster, with a certificate the API server would have to trust; a
stopped Kueue would then make Job creation fail for everyone. So Kueue serves its webhook endpoints on loopback
(its manager wants a serving certificate either way) and nothing calls them.

Kueue without its internal certificate management reads a metrics certificate from the fixed path
``/etc/kueue/metrics/certs``. Rather than write under /etc, the process runs in its own user and mount
namespace (``unshare``) with an overlay on /etc that holds a throw-away self-signed certificate.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kubelora.devenv import cluster, tools

API_GROUP = "kueue.x-k8s.io"
API_VERSION = "v1beta2"
CONFIG_API_VERSION = "config.kueue.x-k8s.io/v1beta2"
METRICS_CERT_DIR = "/etc/kueue/metrics/certs"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def module_dir() -> Path:
    """The source of ``sigs.k8s.io/kueue`` at the pinned version, from Go's module cache (downloaded if needed)."""
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run(
            ["go", "mod", "download", "-json", f"sigs.k8s.io/kueue@{tools.KUEUE_VERSION}"],
            capture_output=True,
            text=True,
            env=env,
            cwd=scratch,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"go mod download sigs.k8s.io/kueue failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    return Path(json.loads(result.stdout)["Dir"])


def crd_dir() -> Path:
    """Kueue's CRDs, copied next to its binary the first time (cached like the binary)."""
    target = tools.KUEUE.directory / "crds"
    if target.is_dir() and any(target.glob("*.yaml")):
        return target
    source = module_dir() / "config" / "components" / "crd" / "bases"
    staged = tools.KUEUE.directory / ".crds-staged"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(source, staged)
    for path in staged.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)  # the module cache is read-only
    staged.rename(target)
    return target


def install_crds(env: cluster.DevEnv, timeout: float = 120.0) -> None:
    """Apply Kueue's CRDs (server-side: the Workload CRD is too large for a last-applied annotation)."""
    cluster.kubectl(env, "apply", "--server-side", "--force-conflicts", "-f", str(crd_dir()))
    path = '{.status.conditions[?(@.type=="Established")].status}'
    for name in ("workloads", "clusterqueues", "localqueues", "resourceflavors"):
        # Polled rather than `kubectl wait`, which gives up at once on a CRD the API server is still installing.
        deadline = time.monotonic() + timeout
        while True:
            result = cluster.kubectl(env, "get", f"crd/{name}.{API_GROUP}", "-o", f"jsonpath={path}", check=False)
            if result.stdout.strip() == "True":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRD {name}.{API_GROUP} not Established after {timeout:.0f}s: {result.stderr}")
            time.sleep(0.5)


def configuration(
    webhook_port: int, health_port: int, cert_dir: Path, wait_for_pods_ready: bool = False
) -> dict[str, Any]:
    """Kueue's Configuration: batch/v1 Jobs only, no leader election, no metrics server, loopback endpoints."""
    config: dict[str, Any] = {
        "apiVersion": CONFIG_API_VERSION,
        "kind": "Configuration",
        "namespace": "kueue-system",
        "manageJobsWithoutQueueName": False,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "clientConnection": {"qps": 50, "burst": 100},
        "integrations": {"frameworks": ["batch/job"]},
    }
    if wait_for_pods_ready:
        config["waitForPodsReady"] = {"timeout": "5m", "blockAdmission": False}
    return config


def _self_signed(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.crt"),
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        capture_output=True,
        check=True,
    )  # fmt: skip


class KueueProcess:
    """Kueue's manager as a child process against the dev cluster; ``stop()`` ends it (and only it)."""

    def __init__(self, env: cluster.DevEnv, workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.log_path = workdir / "kueue.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.health_port = 0

    def start(self, timeout: float = 120.0) -> KueueProcess:
        binary = tools.build(tools.KUEUE) / "kueue"
        if shutil.which("unshare") is None:
            raise RuntimeError("Running Kueue here needs util-linux's unshare (a private /etc/kueue)")
        certs = self.workdir / "certs"
        _self_signed(certs)
        self.health_port = _free_port()
        config_path = self.workdir / "kueue-config.yaml"
        config_path.write_text(yaml.safe_dump(configuration(_free_port(), self.health_port, certs)))
        upper, work = self.workdir / "etc-upper", self.workdir / "etc-work"
        upper.mkdir(exist_ok=True)
        work.mkdir(exist_ok=True)
        script = (
            f'mount -t overlay overlay -o "lowerdir=/etc,upperdir={upper},workdir={work}" /etc'
            f" && mkdir -p {METRICS_CERT_DIR} && cp {certs}/tls.crt {certs}/tls.key {METRICS_CERT_DIR}/"
            f" && exec {binary} --config {config_path} --feature-gates=VisibilityOnDemand=false --zap-log-level=2"
        )
        command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]
        child_env = {**os.environ, "KUBECONFIG": str(self.env.kubeconfig)}
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Kueue was not ready after {timeout:.0f}s; log:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        return self

    def ready(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"Kueue exited; log:\n{self.log()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=1) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> KueueProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def gpu_queue(
    name: str, flavor_labels: dict[str, str], gpus: int, namespace: str, tolerations: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """A ResourceFlavor (the GPU nodes' labels), a ClusterQueue with `gpus` nvidia.com/gpu of it for one
    namespace, and that namespace's LocalQueue, all named `name` (docs/gpu-cluster.md has the platform form).
    """
    flavor: dict[str, Any] = {"nodeLabels": flavor_labels}
    if tolerations:
        flavor["tolerations"] = tolerations
    big = "100000"
    return [
        {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "ResourceFlavor",
            "metadata": {"name": name},
            "spec": flavor,
        },
        {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "ClusterQueue",
            "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "queueingStrategy": "BestEffortFIFO",
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": name,
                                "resources": [
                                    {"name": "cpu", "nominalQuota": big},
                                    {"name": "memory", "nominalQuota": f"{big}Gi"},
                                    {"name": "nvidia.com/gpu", "nominalQuota": str(gpus)},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "LocalQueue",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterQueue": name},
        },
    ]
