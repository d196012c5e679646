"""A real Kueue against the dev control plane, and GPU nodes of its own, for the queueing tests.

Kueue runs as its own process for this package's tests (kubelora.devenv.kueue: built from its Go module, CRDs
from the module source, webhooks left out because the operator creates its Jobs suspended itself) and stops
after them. The fake GPU nodes get a pool name, a product and a taint no other test uses, so the queue's
flavour covers exactly them and other tests' pods never take their GPUs.
"""

from __future__ import annotations

import secrets
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from kubelora.devenv import cluster
from kubelora.devenv import kueue as kueue_env
from tests.conftest import wait_for
from tests.operator.harness import OperatorProcess, create_s3_secret, install_crds, seed_inputs

GPUS_PER_NODE = 8


@pytest.fixture(scope="session")
def kueue(devenv: cluster.DevEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[kueue_env.KueueProcess]:
    kueue_env.install_crds(devenv)
    process = kueue_env.KueueProcess(devenv, tmp_path_factory.mktemp("kueue"))
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def lorajob_crds(devenv: cluster.DevEnv) -> None:
    install_crds(devenv)


class GPUPoolNodes:
    """Two kwok GPU nodes that only pods tolerating their own taint land on."""

    def __init__(self, devenv: cluster.DevEnv, count: int = 2) -> None:
        suffix = secrets.token_hex(3)
        self.devenv = devenv
        self.pool = cluster.GPUPool(f"queue-{suffix}", count, GPUS_PER_NODE, f"KWOK-Queue-{suffix}", 81920)
        self.taint = {"key": "kubelora.dev/queueing", "value": suffix, "effect": "NoSchedule"}
        self.nodes = []
        for index in range(count):
            node = cluster.gpu_node(self.pool, index)
            node["spec"]["taints"].append(self.taint)
            self.nodes.append(node)

    @property
    def product(self) -> str:
        return self.pool.product

    @property
    def toleration(self) -> dict[str, Any]:
        return {"key": self.taint["key"], "operator": "Equal", "value": self.taint["value"], "effect": "NoSchedule"}

    def create(self) -> None:
        cluster.apply_nodes(self.devenv, self.nodes)

    def delete(self) -> None:
        names = [n["metadata"]["name"] for n in self.nodes]
        cluster.kubectl(self.devenv, "delete", "node", *names, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture
def gpu_nodes(devenv: cluster.DevEnv) -> Iterator[GPUPoolNodes]:
    nodes = GPUPoolNodes(devenv)
    nodes.create()
    yield nodes
    nodes.delete()


@pytest.fixture
def operator(devenv, lorajob_crds, namespace, tmp_path, kubectl, minio_client, bucket) -> Iterator[OperatorProcess]:
    create_s3_secret(kubectl, namespace, devenv)
    seed_inputs(minio_client, bucket)
    proc = OperatorProcess(devenv, namespace, tmp_path)
    proc.start()
    yield proc
    proc.kill(signal.SIGTERM)


@pytest.fixture
def gpu_queue(devenv, kueue, gpu_nodes, namespace, kubectl) -> Iterator[str]:
    """A ClusterQueue of 16 GPUs on the pool's flavour, for this namespace only, and its LocalQueue."""
    name = f"kl-{namespace}"[:63]
    objects = kueue_env.gpu_queue(
        name,
        {"kubelora.dev/pool": gpu_nodes.pool.name},
        gpus=2 * GPUS_PER_NODE,
        namespace=namespace,
        tolerations=[gpu_nodes.toleration],
    )
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))
    yield name
    # While Kueue still runs: its Workloads carry its finalizer, which only it removes, and a namespace left
    # Terminating would stay in the shared cluster.
    kubectl("delete", "jobs.batch", "--all", "-n", namespace, "--wait=false", check=False)
    workloads = f"workloads.{kueue_env.API_VERSION}.{kueue_env.API_GROUP}"
    wait_for(
        "the namespace's Workloads gone",
        lambda: not kubectl("get", workloads, "-n", namespace, "-o", "name").stdout.strip(),
        timeout=60,
    )
    kubectl("delete", "localqueue", name, "-n", namespace, "--ignore-not-found", "--wait=false", check=False)
    kubectl("delete", "clusterqueue", name, "--ignore-not-found", "--wait=false", check=False)
    kubectl("delete", "resourceflavor", name, "--ignore-not-found", "--wait=false", check=False)
