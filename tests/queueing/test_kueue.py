"""LoRAJobs in a real Kueue: a ClusterQueue of 16 GPUs admits two 8-GPU jobs of three, then the third."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubelora.devenv import kueue as kueue_env
from kubelora.operator.names import job_name
from tests.conftest import wait_for
from tests.operator.harness import get, lorajob_manifest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def workloads(kubectl, namespace: str) -> list[dict[str, Any]]:
    out = kubectl("get", f"workloads.{kueue_env.API_VERSION}.{kueue_env.API_GROUP}", "-n", namespace, "-o", "json")
    return list(json.loads(out.stdout)["items"])


def admitted(workload: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Admitted" and c.get("status") == "True"
        for c in (workload.get("status") or {}).get("conditions") or []
    )


def job_uid_of(workload: dict[str, Any]) -> str:
    return next(o["uid"] for o in workload["metadata"]["ownerReferences"] if o.get("kind") == "Job")


def running_pods(kubectl, namespace: str, job_uid: str) -> list[dict[str, Any]]:
    items = json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
    return [
        p
        for p in items
        if p["status"].get("phase") == "Running"
        and any(o.get("uid") == job_uid for o in p["metadata"].get("ownerReferences") or [])
    ]


def test_three_8_gpu_jobs_on_16_gpus_two_run_one_waits_with_kueues_reason(
    operator, gpu_queue, gpu_nodes, kubectl, namespace, bucket
):
    names = ["ft-a", "ft-b", "ft-c"]
    for name in names:
        manifest = lorajob_manifest(
            name, bucket, queueName=gpu_queue, resources={"gpus": 8, "gpuType": gpu_nodes.product}
        )
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))

    # Every Job is created suspended with the queue label; Kueue makes one Workload per Job.
    def three_workloads() -> list[dict[str, Any]] | None:
        items = workloads(kubectl, namespace)
        return items if len(items) == 3 and sum(admitted(w) for w in items) == 2 else None

    items = wait_for("two of three Workloads admitted", three_workloads, timeout=120)
    jobs = {
        j["metadata"]["uid"]: j
        for j in json.loads(kubectl("get", "jobs", "-n", namespace, "-o", "json").stdout)["items"]
    }
    assert len(jobs) == 3
    for job in jobs.values():
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == gpu_queue
    waiting_workload = next(w for w in items if not admitted(w))
    waiting_job = jobs[job_uid_of(waiting_workload)]
    assert waiting_job["spec"]["suspend"] is True
    # Job names are a function of the LoRAJob's name and UID (kubelora.operator.names).
    job_name_of = {n: job_name(n, get(kubectl, namespace, "lorajob", n)["metadata"]["uid"]) for n in names}
    waiting = next(n for n in names if job_name_of[n] == waiting_job["metadata"]["name"])
    running = [n for n in names if n != waiting]

    # The two admitted ones run on the pool (Kueue put the flavour's node labels and toleration on their pods).
    for workload in (w for w in items if admitted(w)):
        pods = wait_for(
            "an admitted Job's pod running", lambda w=workload: running_pods(kubectl, namespace, job_uid_of(w))
        )
        assert pods[0]["spec"]["nodeName"].startswith(f"gpu-{gpu_nodes.pool.name}-")
    for name in running:
        wait_for(
            f"{name} Training",
            lambda n=name: get(kubectl, namespace, "lorajob", n)["status"].get("phase") == "Training",
        )

    # The third is Queued, and says why in Kueue's words (its Workload's QuotaReserved condition).
    def kueue_says() -> str | None:
        workload = next(w for w in workloads(kubectl, namespace) if job_uid_of(w) == waiting_job["metadata"]["uid"])
        conditions = (workload.get("status") or {}).get("conditions") or []
        quota = next((c for c in conditions if c["type"] == "QuotaReserved" and c["status"] == "False"), None)
        return quota["message"] if quota else None

    def queued_with_reason() -> dict[str, Any] | None:
        status = get(kubectl, namespace, "lorajob", waiting).get("status", {})
        said = kueue_says()
        if status.get("phase") == "Queued" and said and status.get("message") == said:
            return status
        raise AssertionError(f"status={status} kueue={said}")

    status = wait_for(f"{waiting} Queued with Kueue's reason", queued_with_reason, timeout=60)
    assert "insufficient" in status["message"] and "nvidia.com/gpu" in status["message"]
    scheduled = next(c for c in status["conditions"] if c["type"] == "Scheduled")
    assert scheduled == {**scheduled, "status": "False", "reason": "KueuePending", "message": status["message"]}

    # One of the two finishes: its quota goes back and Kueue admits the third, which starts.
    first_job_uid = next(uid for uid, j in jobs.items() if j["metadata"]["name"] == job_name_of[running[0]])
    for pod in running_pods(kubectl, namespace, first_job_uid):
        kubectl(
            "annotate",
            "pod",
            pod["metadata"]["name"],
            "-n",
            namespace,
            "kwok.kubelora.dev/outcome=Succeeded",
            "--overwrite",
        )
    wait_for(
        f"{waiting} Training after {running[0]} finished",
        lambda: get(kubectl, namespace, "lorajob", waiting)["status"].get("phase") == "Training",
        timeout=120,
    )
    assert get(kubectl, namespace, "job", waiting_job["metadata"]["name"])["spec"]["suspend"] is False
    # The other one kept running all along.
    assert get(kubectl, namespace, "lorajob", running[1])["status"]["phase"] == "Training"
