"""kopf's change-detection essence: built for our own kinds as kopf builds it, and not at all for the rest."""

from __future__ import annotations

import kopf

from kubelora.operator.persistence import OwnKindsDiffBase

KEY = dict(prefix="kubelora.dev", key="last-handled-configuration")


def lorajob_body() -> dict:
    return {
        "apiVersion": "kubelora.dev/v1alpha1",
        "kind": "LoRAJob",
        "metadata": {
            "name": "a",
            "namespace": "t",
            "uid": "u-1",
            "generation": 2,
            "resourceVersion": "77",
            "labels": {"team": "x"},
            "annotations": {"kubelora.dev/last-handled-configuration": "{}", "note": "kept"},
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {"method": "lora", "training": {"maxSteps": 10}},
        "status": {"phase": "Training", "conditions": [{"type": "Ready", "status": "False"}]},
    }


def test_our_kinds_get_the_essence_kopf_itself_builds():
    body = lorajob_body()
    ours = OwnKindsDiffBase(**KEY).build(body=kopf.Body(body))
    stock = kopf.AnnotationsDiffBaseStorage(**KEY).build(body=kopf.Body(lorajob_body()))
    assert ours == stock
    assert ours["spec"] == body["spec"] and "status" not in ours
    assert ours["metadata"]["labels"] == {"team": "x"}
    # A later change to the body never reaches an essence already built (kopf compares them later).
    body["spec"]["training"]["maxSteps"] = 99
    assert ours["spec"]["training"]["maxSteps"] == 10


def test_a_status_field_a_handler_asks_for_stays_in_the_essence():
    ours = OwnKindsDiffBase(**KEY).build(body=kopf.Body(lorajob_body()), extra_fields=[("status", "phase")])
    stock = kopf.AnnotationsDiffBaseStorage(**KEY).build(
        body=kopf.Body(lorajob_body()), extra_fields=[("status", "phase")]
    )
    assert ours == stock and ours["status"] == {"phase": "Training"}


def test_other_kinds_are_not_copied():
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "t"}, "spec": {"containers": []}}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "t"}, "spec": {}}
    storage = OwnKindsDiffBase(**KEY)
    assert storage.build(body=kopf.Body(pod)) == {}
    assert storage.build(body=kopf.Body(job)) == {}
    assert kopf.AnnotationsDiffBaseStorage(**KEY).build(body=kopf.Body(pod)) != {}, "the control: kopf copies pods"
