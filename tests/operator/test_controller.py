"""The event-driven LoRAJob controller's pieces, without a cluster: keys from events, pacing, pause, slim bodies."""

from __future__ import annotations

import asyncio
import types
from datetime import UTC, datetime, timedelta

import kopf

from kubelora.operator import handlers
from kubelora.operator.config import OperatorConfig
from kubelora.operator.jobspec import build_job
from kubelora.operator.workqueue import WorkQueue
from tests.operator.test_reconcile import lorajob

AT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def peer(priority: int, seconds_ago: float, lifetime: int = 60) -> dict:
    return {"priority": priority, "lastseen": (AT - timedelta(seconds=seconds_ago)).isoformat(), "lifetime": lifetime}


def test_the_queue_pauses_by_kopfs_rule_a_live_peer_of_higher_or_equal_priority():
    me = "me@host/1"
    assert handlers.peering_paused({}, me, 10, AT) is False
    assert handlers.peering_paused({me: peer(10, 0)}, me, 10, AT) is False  # ourselves
    assert handlers.peering_paused({me: peer(10, 0), "other": peer(5, 0)}, me, 10, AT) is False
    assert handlers.peering_paused({"other": peer(20, 10)}, me, 10, AT) is True
    assert handlers.peering_paused({"other": peer(10, 10)}, me, 10, AT) is True  # kopf pauses equal priorities
    assert handlers.peering_paused({"other": peer(20, 61)}, me, 10, AT) is False  # dead: lastseen + lifetime passed
    assert handlers.peering_paused({"other": {"priority": 20, "lastseen": "garbage"}}, me, 10, AT) is False


def test_a_lorajob_is_looked_at_again_by_its_phase_and_never_once_finished():
    config = OperatorConfig(progress_interval_seconds=7)
    assert handlers.next_look({"phase": "Training"}, config) == 7
    assert handlers.next_look({"phase": "Evaluating"}, config) == 7
    assert handlers.next_look({"phase": "Pending"}, config) == handlers.RECONCILE_INTERVAL
    assert handlers.next_look(None, config) == handlers.RECONCILE_INTERVAL
    assert handlers.next_look({"phase": "Succeeded"}, config) is None
    assert handlers.next_look({"phase": "Failed"}, config) is None


def test_indexes_and_the_queue_keep_slim_bodies():
    pod = {
        "metadata": {"name": "p", "uid": "p-1", "namespace": "ns", "managedFields": [{"x": 1}], "labels": {"a": "b"}},
        "spec": {"containers": [{"name": "trainer", "image": "big"}]},
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.1",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [
                {"name": "trainer", "image": "big", "imageID": "sha", "state": {"running": {"startedAt": "t"}}}
            ],
        },
    }
    slim = handlers._slim_pod(pod)
    assert slim == {
        "metadata": {"name": "p", "uid": "p-1", "namespace": "ns"},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": "t"}}}],
        },
    }
    body = {
        "metadata": {
            "name": "j",
            "namespace": "ns",
            "uid": "u",
            "generation": 2,
            "resourceVersion": "9",
            "annotations": {"kubelora.dev/last-handled-configuration": "{...the whole spec...}"},
            "managedFields": [{}],
        },
        "spec": {"method": "lora"},
        "status": {"phase": "Training", "kopf": {"progress": {}}},
    }
    assert handlers._slim_lorajob(body) == {
        "metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": 2, "resourceVersion": "9"},
        "spec": {"method": "lora"},
        "status": {"phase": "Training"},
    }


def test_finished_jobs_carry_the_configured_ttl():
    assert build_job(lorajob(), OperatorConfig())["spec"]["ttlSecondsAfterFinished"] == 3600
    assert build_job(lorajob(), OperatorConfig(job_ttl_seconds_after_finished=60))["spec"][
        "ttlSecondsAfterFinished"
    ] == 60  # fmt: skip
    assert "ttlSecondsAfterFinished" not in build_job(lorajob(), OperatorConfig(job_ttl_seconds_after_finished=None))[
        "spec"
    ]  # fmt: skip


def memo_with(*bodies: dict) -> types.SimpleNamespace:
    memo = types.SimpleNamespace(
        lorajobs={}, lorajob_keys={}, job_owners={}, config=OperatorConfig(progress_interval_seconds=3), pool=None
    )
    memo.queue = WorkQueue("test", lambda key: asyncio.sleep(0))
    for body in bodies:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        memo.lorajobs[key] = body
        memo.lorajob_keys[body["metadata"]["uid"]] = key
    return memo


def lorajob_body(name: str, uid: str, phase: str | None = None, rv: str = "1") -> dict:
    meta = {"name": name, "namespace": "ns", "uid": uid, "generation": 1, "resourceVersion": rv}
    return {"metadata": meta, "spec": {}, "status": {"phase": phase, "observedGeneration": 1} if phase else {}}


def job_body(uid: str, owner: str | None) -> kopf.Body:
    meta: dict = {"name": f"job-{uid}", "namespace": "ns", "uid": uid}
    if owner:
        meta["ownerReferences"] = [
            {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRAJob", "name": "x", "uid": owner, "controller": True}
        ]
    return kopf.Body({"metadata": meta})


def pod_body(job_uid: str) -> kopf.Body:
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": job_uid, "controller": True}
    return kopf.Body({"metadata": {"name": "pod", "namespace": "ns", "uid": "pod-1", "ownerReferences": [owner]}})


def test_job_and_pod_events_ask_for_their_lorajob_by_owner_uid_and_finished_ones_are_left_alone():
    async def run() -> None:
        memo = memo_with(lorajob_body("a", "u-a", "Training"), lorajob_body("done", "u-done", "Succeeded"))
        await handlers.job_changed(event={"type": "ADDED"}, body=job_body("job-1", "u-a"), memo=memo)
        assert memo.queue.is_busy(("ns", "a")) and memo.job_owners == {"job-1": "u-a"}
        memo.queue = WorkQueue("test", lambda key: asyncio.sleep(0))
        await handlers.pod_changed(event={"type": "MODIFIED"}, body=pod_body("job-1"), memo=memo)
        assert memo.queue.is_busy(("ns", "a"))
        memo.queue = WorkQueue("test", lambda key: asyncio.sleep(0))
        await handlers.job_changed(event={"type": "ADDED"}, body=job_body("job-2", "u-done"), memo=memo)
        await handlers.job_changed(event={"type": "ADDED"}, body=job_body("job-3", None), memo=memo)
        await handlers.pod_changed(event={"type": "ADDED"}, body=pod_body("job-unknown"), memo=memo)
        assert memo.queue.pending() == 0
        await handlers.job_changed(event={"type": "DELETED"}, body=job_body("job-1", "u-a"), memo=memo)
        assert "job-1" not in memo.job_owners

    asyncio.run(run())


def test_a_reconcile_reads_the_latest_body_and_keeps_its_own_write(monkeypatch):
    seen: list[str] = []

    def resync_one(body, memo):
        seen.append(body["metadata"]["resourceVersion"])
        return {
            **lorajob_body("a", "u-a", "Training", rv="7"),
            "metadata": {**body["metadata"], "resourceVersion": "7"},
        }

    monkeypatch.setattr(handlers, "resync_one", resync_one)

    async def run() -> None:
        memo = memo_with(lorajob_body("a", "u-a", rv="5"))
        memo.lorajobs[("ns", "a")] = lorajob_body("a", "u-a", rv="6")  # the watch delivered a newer one
        assert await handlers.reconcile_key(("ns", "a"), memo) == 3  # Training: the progress interval
        assert seen == ["6"]
        assert memo.lorajobs[("ns", "a")]["metadata"]["resourceVersion"] == "7"
        memo.lorajobs[("ns", "a")] = lorajob_body("a", "u-a", "Failed")
        assert await handlers.reconcile_key(("ns", "a"), memo) is None and seen == ["6"]
        assert await handlers.reconcile_key(("ns", "gone"), memo) is None

    asyncio.run(run())
