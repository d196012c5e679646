"""A Job labelled to look like a LoRAJob's own is never taken for it (part of the tenancy attack suite).

Labels are for people and selectors; anyone who may create Jobs can copy them. The operator finds a
LoRAJob's Job by the UID in the Job's controller ownerReference, so a look-alike Job that succeeds does
not make the LoRAJob succeed, and its pods count for nothing in the LoRAJob's attempts, GPU-seconds or
cost. The AdapterDeployment side of the suite is in tests/rollout/test_e2e_tenancy.py; a Job that takes
the LoRAJob's Job name is in test_e2e_lorajob.py.
"""

from __future__ import annotations

import json

import pytest

from kubelora.operator import names
from tests.conftest import wait_for
from tests.operator.harness import get, lorajob_manifest, wait_phase
from tests.operator.test_e2e_lorajob import apply, crds, finish_pods, jobs_in, operator  # noqa: F401 - fixtures

pytestmark = pytest.mark.e2e


def test_a_job_labelled_like_a_lorajobs_own_is_ignored(operator, kubectl, namespace, bucket):  # noqa: F811
    apply(kubectl, namespace, lorajob_manifest("team-a", bucket, retries=0))
    lorajob = wait_phase(kubectl, namespace, "team-a", "Training", timeout=120)
    uid = lorajob["metadata"]["uid"]
    own = get(kubectl, namespace, "job", lorajob["status"]["jobName"])
    labels = {"kubelora.dev/lorajob": names.label_value("team-a"), "kubelora.dev/lorajob-uid": uid}
    assert {k: own["metadata"]["labels"][k] for k in labels} == labels  # the look-alike copies the real labels
    lookalike = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "team-a-train-lookalike", "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": own["spec"]["template"]["spec"].get("nodeSelector") or {},
                    "tolerations": own["spec"]["template"]["spec"].get("tolerations") or [],
                    "containers": [{"name": "trainer", "image": "busybox"}],
                },
            },
        },
    }
    apply(kubectl, namespace, lookalike)
    fake = get(kubectl, namespace, "job", "team-a-train-lookalike")
    finish_pods(kubectl, namespace, fake, "Succeeded")
    wait_for(
        "the look-alike Job to complete",
        lambda: any(
            c["type"] == "Complete" and c["status"] == "True"
            for c in get(kubectl, namespace, "job", "team-a-train-lookalike").get("status", {}).get("conditions", [])
        ),
        timeout=120,
    )
    # The LoRAJob's own Job then fails: the operator has seen everything the look-alike did by the time it says so.
    finish_pods(kubectl, namespace, own, "Failed")
    final = wait_phase(kubectl, namespace, "team-a", "Succeeded", "Failed", timeout=180)
    status = final["status"]
    assert status["phase"] == "Failed", status
    assert status["jobName"] == own["metadata"]["name"] and "adapter" not in status
    assert "lookalike" not in json.dumps(status)
    assert sorted(j["metadata"]["name"] for j in jobs_in(kubectl, namespace)) == sorted(
        [own["metadata"]["name"], "team-a-train-lookalike"]
    )
    assert "ownerReferences" not in get(kubectl, namespace, "job", "team-a-train-lookalike")["metadata"]
