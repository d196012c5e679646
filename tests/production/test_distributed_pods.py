"""Distributed training in pods that run the trainer image: 2 processes in one pod, and 2 pods of an Indexed Job.

The pods land on the podrunner's loopback GPU pool (``podrunner.LOOPBACK_GPU_POOL``), whose kwok nodes give pods
addresses in 127.2.0.0/16 that real processes bind: each pod has its own IP on loopback. The podrunner writes
each pod's /etc/hosts as the kubelet does, with the names the cluster DNS would give the pods of a headless
Service (``<job>-<index>.<service>`` ...), so torchrun's c10d rendezvous at pod 0's hostname and gloo between the
pods work as in a cluster. torchrun's rendezvous store listens on port 29400 of every address: one multi-node run
at a time on this machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubelora.devenv import cluster, podrunner
from kubelora.trainer import distributed, tiny
from tests.conftest import wait_for
from tests.operator.harness import get, pods_of
from tests.production.test_job_path import apply, lorajob, upload
from tests.trainer.helpers import s3_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.trainer]

GPU_TYPE = podrunner.LOOPBACK_GPU_POOL.product
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

#: Stands in for the trainer: one all_reduce over the world, then what this process saw, as one JSON line.
STANDIN = """
import json, os, socket, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
host = socket.gethostname()
print("STANDIN " + json.dumps({
    "rank": dist.get_rank(), "world": dist.get_world_size(), "sum": value.item(),
    "index": os.environ.get("JOB_COMPLETION_INDEX"), "hostname": host, "fqdn": socket.getfqdn(),
    "hostIP": socket.gethostbyname(host), "podIP": os.environ.get("POD_IP"),
    "masterAddr": os.environ.get("MASTER_ADDR"),
}), flush=True)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    model = tiny.build_tiny_model(root / "model")
    files = tiny.write_task(root / "task", n_train=64, n_test=16)
    return {"model": model, "train": files["train"], "test": files["test"]}


@pytest.fixture(scope="module")
def loopback_nodes(devenv: cluster.DevEnv) -> list[str]:
    return podrunner.ensure_loopback_gpu_nodes(devenv)


def standin_objects(name: str, image: str) -> list[dict[str, Any]]:
    """An Indexed Job of 2 pods and its headless Service, shaped as the operator makes them for ``nodes: 2``
    (kubelora.operator.jobspec), running the stand-in module through the pods' launcher command."""
    service = f"{name}-workers"
    command = distributed.pod_command(
        nodes=2, gpus=1, trainer_args=[], rdzv_host=distributed.rendezvous_host(name, service), rdzv_id=name
    )
    assert command is not None
    split = command.index("--")
    command = [*command[:split], "--module", "standin", *command[split:]]
    labels = {"app.kubernetes.io/name": "standin"}
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "standin"},
            "data": {"standin.py": STANDIN},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service, "labels": labels},
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": {"job-name": name},
                "ports": [{"name": "rendezvous", "port": distributed.RDZV_PORT}],
            },
        },
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "completionMode": "Indexed",
                "completions": 2,
                "parallelism": 2,
                "backoffLimit": 0,
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "restartPolicy": "Never",
                        "subdomain": service,
                        "automountServiceAccountToken": False,
                        "enableServiceLinks": False,
                        "tolerations": [GPU_TOLERATION],
                        "nodeSelector": {"nvidia.com/gpu.product": GPU_TYPE},
                        "containers": [
                            {
                                "name": "trainer",
                                "image": image,
                                "command": command,
                                "env": [
                                    {"name": "PYTHONPATH", "value": "/opt/standin"},
                                    {"name": "OMP_NUM_THREADS", "value": "1"},
                                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                                ],
                                "resources": {"limits": {"nvidia.com/gpu": "1"}},
                                "volumeMounts": [{"name": "standin", "mountPath": "/opt/standin", "readOnly": True}],
                            }
                        ],
                        "volumes": [{"name": "standin", "configMap": {"name": "standin"}}],
                    },
                },
            },
        },
    ]


def test_indexed_job_pods_find_each_other_by_hostname_and_rendezvous(
    loopback_nodes, kubelet, images, kubectl, namespace
):
    """The podrunner part alone, with a stand-in for the trainer: names, pod IPs, JOB_COMPLETION_INDEX, c10d."""
    name = "rdzv"
    for manifest in standin_objects(name, images["trainer"]):
        apply(kubectl, namespace, manifest)

    def finished() -> dict[str, Any] | None:
        job = get(kubectl, namespace, "job", name)
        done = {c["type"] for c in job.get("status", {}).get("conditions", []) if c["status"] == "True"}
        return job if done & {"Complete", "Failed"} else None

    job = wait_for("the stand-in Job to finish", finished, timeout=600, interval=0.5)
    logs = kubelet.logs(namespace)
    assert any(c["type"] == "Complete" for c in job["status"]["conditions"]), logs[-6000:]
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", f"job-name={name}", "-o", "json").stdout)["items"]
    by_index = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p for p in pods}
    assert sorted(by_index) == ["0", "1"]
    ips = {index: pod["status"]["podIP"] for index, pod in by_index.items()}
    assert len(set(ips.values())) == 2 and all(ip.startswith("127.2.") for ip in ips.values()), ips
    results = [json.loads(line.split("STANDIN ", 1)[1]) for line in logs.splitlines() if "STANDIN {" in line]
    assert sorted(r["rank"] for r in results) == [0, 1], logs[-6000:]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in results)  # one collective over both pods
    for r in results:
        index = r["index"]
        # Its own hostname, its own pod IP, its index from the Job controller; the master is pod 0's FQDN.
        assert r["hostname"] == f"{name}-{index}" and r["hostIP"] == r["podIP"] == ips[index], r
        assert r["fqdn"] == f"{name}-{index}.{name}-workers.{namespace}.svc.cluster.local", r
        assert r["masterAddr"] == f"{name}-0.{name}-workers.{namespace}.svc.cluster.local", r


def _finished(kubectl: Any, namespace: str, name: str, steps_seen: set[int]) -> dict[str, Any] | None:
    obj = get(kubectl, namespace, "lorajob", name)
    status = obj.get("status", {})
    if status.get("progress", {}).get("step"):
        steps_seen.add(int(status["progress"]["step"]))
    return obj if status.get("phase") in ("Succeeded", "Failed") else None


def tiny_lorajob(name: str, bucket: str, uris: dict[str, str], **resources: Any) -> dict[str, Any]:
    manifest = lorajob(name, bucket, uris["base"], uris["train"], uris["test"])
    spec = manifest["spec"]
    spec["resources"] = {"gpuType": GPU_TYPE, **resources}
    # Few steps: this checks that every process trains and one publishes, not what the adapter learns. The global
    # batch (batchSize x gradientAccumulation) is split over the 2 processes.
    spec["training"].update(maxSteps=8, checkpointEverySteps=4, batchSize=4, gradientAccumulation=2)
    spec["eval"]["gates"] = []
    return manifest


def test_two_processes_in_one_pod_train(
    loopback_nodes, operator, kubelet, kubectl, namespace, bucket, minio_client, task
):
    uris = upload(minio_client, bucket, task)
    apply(kubectl, namespace, tiny_lorajob("two-procs", bucket, uris, gpus=2))
    steps: set[int] = set()
    done = wait_for("the run to finish", lambda: _finished(kubectl, namespace, "two-procs", steps), timeout=900)
    status = done["status"]
    assert status["phase"] == "Succeeded", (status, kubelet.logs(namespace)[-6000:])
    assert status["training"]["worldSize"] == 2 and status["training"].get("nodes", 1) == 1, status["training"]
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 8
    pods = pods_of(kubectl, namespace, "two-procs")
    assert len(pods) == 1
    command = pods[0]["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", distributed.LAUNCHER_MODULE] and "--nproc-per-node" in command
    assert command[command.index("--nproc-per-node") + 1] == "2"


def test_two_nodes_run_as_two_pods_that_rendezvous_and_publish_once(
    loopback_nodes, operator, kubelet, kubectl, namespace, bucket, minio_client, task
):
    uris = upload(minio_client, bucket, task)
    apply(kubectl, namespace, tiny_lorajob("two-nodes", bucket, uris, gpus=1, nodes=2))
    steps: set[int] = set()
    done = wait_for("the run to finish", lambda: _finished(kubectl, namespace, "two-nodes", steps), timeout=900)
    status = done["status"]
    logs = kubelet.logs(namespace)
    assert status["phase"] == "Succeeded", (status, logs[-6000:])
    assert status["training"]["worldSize"] == 2 and status["training"]["nodes"] == 2, status["training"]
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 8

    # Two pods of the Indexed Job, each with its own pod IP on loopback, each ran the trainer image to exit 0.
    job = get(kubectl, namespace, "job", status["jobName"])
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    pods = pods_of(kubectl, namespace, "two-nodes")
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 2 and all(ip.startswith("127.2.") for ip in ips), ips
    for pod in pods:
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 0, terminated
        assert pod["spec"]["hostname"].startswith(status["jobName"] + "-")
    # Each pod's launcher named its own node rank (JOB_COMPLETION_INDEX) and pod 0's stable hostname.
    assert "node_rank=0" in logs and "node_rank=1" in logs, logs[-6000:]
    service = get(kubectl, namespace, "service", pods[0]["spec"]["subdomain"])
    assert f"{status['jobName']}-0.{service['metadata']['name']}:{distributed.RDZV_PORT}" in logs

    # One adapter, published once: one digest directory under the output, and the pointer names it.
    prefix = "adapters/two-nodes/sha256/"
    digests = {o.object_name.split("/")[3] for o in minio_client.list_objects(bucket, prefix=prefix, recursive=True)}
    assert digests == {status["adapter"]["digest"].removeprefix("sha256:")}, digests
    pointer = json.loads(s3_bytes(minio_client, bucket, "adapters/two-nodes/kubelora-latest.json"))
    assert pointer["digest"] == status["adapter"]["digest"]
