"""A namespace ResourceQuota on requests.nvidia.com/gpu that refuses the training pods is a clear condition."""

from __future__ import annotations

import json

import pytest

from tests.conftest import wait_for
from tests.operator.harness import get, lorajob_manifest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_gpu_quota_that_refuses_the_pods_is_a_quota_exceeded_condition(operator, kubectl, namespace, bucket):
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "gpus"},
        "spec": {"hard": {"requests.nvidia.com/gpu": "1"}},
    }
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(quota))
    wait_for(
        "the quota's status",
        lambda: get(kubectl, namespace, "resourcequota", "gpus").get("status", {}).get("hard"),
    )
    manifest = lorajob_manifest("too-big", bucket, resources={"gpus": 2})
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))

    def refused():
        status = get(kubectl, namespace, "lorajob", "too-big").get("status", {})
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
        return status if ready.get("reason") == "QuotaExceeded" else None

    status = wait_for("a QuotaExceeded condition", refused, timeout=90)
    assert status["phase"] == "Pending"
    conditions = {c["type"]: c for c in status["conditions"]}
    for kind in ("Ready", "Scheduled"):
        assert conditions[kind]["status"] == "False" and conditions[kind]["reason"] == "QuotaExceeded"
        assert "exceeded quota: gpus" in conditions[kind]["message"]
        assert "requests.nvidia.com/gpu" in conditions[kind]["message"]
    assert "ResourceQuota" in status["message"]
    # No pod was made, and the run is not counted as an attempt or a failure.
    assert get(kubectl, namespace, "job", status["jobName"]).get("status", {}).get("failed") in (None, 0)
    events = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    assert any(
        e["type"] == "Warning" and e["reason"] == "QuotaExceeded" and e["involvedObject"]["name"] == "too-big"
        for e in events
    )
