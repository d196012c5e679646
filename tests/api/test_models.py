"""The API models offline: wire round-trips, defaults, derived status fields and the Python mirror of the CEL rules."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from kubelora.api import v1alpha1 as api
from kubelora.api.v1alpha1 import (
    AdapterArtifact,
    AdapterDeploymentStatus,
    EvalResults,
    InvalidObjectError,
    LoRAJobSpec,
    LoRAJobStatus,
    TrainingProgress,
    dump,
    validate_adapterdeployment,
    validate_lorajob,
    validate_lorajob_update,
)
from tests.api.helpers import Example, invalid_examples, valid_examples

DIGEST = "sha256:" + "0123456789abcdef" * 4


def validate(example: Example) -> api.LoRAJob | api.AdapterDeployment:
    if example.kind == "LoRAJob":
        return validate_lorajob(example.body)
    assert example.kind == "AdapterDeployment"
    return validate_adapterdeployment(example.body)


def minimal_job(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://adapters/x/"},
    }
    body.update(spec)
    return {"apiVersion": api.API_VERSION, "kind": "LoRAJob", "metadata": {"name": "x"}, "spec": body}


def test_examples_exist():
    names = {e.path.name for e in valid_examples()}
    assert {
        "lorajob-support-classifier-qlora.yaml",
        "lorajob-json-extraction-dora.yaml",
        "adapterdeployment-canary.yaml",
    } <= names
    assert len(invalid_examples()) >= 10
    for example in invalid_examples():
        assert example.expect, f"{example.path} has no '# expect:' header"
        assert example.expect.startswith("spec."), f"{example.path}: the expected message should name the field"


@pytest.mark.parametrize("example", valid_examples(), ids=lambda e: e.id)
def test_example_round_trips(example: Example):
    model = validate(example)
    wire = dump(model)
    again = validate_lorajob(wire) if example.kind == "LoRAJob" else validate_adapterdeployment(wire)
    assert again == model
    assert dump(again) == wire
    # Everything the manifest says survives, under the same camelCase names.
    assert _is_subset(example.body["spec"], wire["spec"]), wire["spec"]


def _is_subset(small: Any, big: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _is_subset(v, big[k]) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(small) == len(big) and all(map(_is_subset, small, big))
    if isinstance(small, int | float) and not isinstance(small, bool):
        return isinstance(big, int | float | str) and float(big) == float(small)
    return small == big


@pytest.mark.parametrize("example", invalid_examples(), ids=lambda e: e.id)
def test_invalid_example_rejected_offline_with_the_same_message(example: Example):
    with pytest.raises(InvalidObjectError) as info:
        validate(example)
    assert example.offline_message is not None
    assert example.offline_message in str(info.value)
    assert len(info.value.causes) == 1, f"{example.path} should break exactly one rule: {info.value.causes}"


def test_defaults_are_filled_like_the_api_server_does():
    spec = validate_lorajob(minimal_job()).spec
    assert spec.method == "lora"
    assert spec.lora.rank == 16 and spec.lora.target_modules == ["all-linear"] and spec.lora.rs_lora is False
    assert spec.training.epochs is None and spec.training.max_steps is None  # the trainer then runs one epoch
    assert spec.training.learning_rate == 2e-4 and spec.training.gradient_checkpointing is True
    assert spec.resources.gpus == 1 and spec.resources.tolerations == []
    assert spec.dataset.validation_split == 0.05 and spec.dataset.format == "chat"
    assert spec.eval is None and spec.retries == 2
    wire = dump(spec)
    assert wire["lora"]["rsLoRA"] is False
    assert wire["training"]["checkpointEverySteps"] == 100
    assert "epochs" not in wire["training"]


def test_epochs_description_says_what_happens_when_unset():
    description = api.TrainingConfig.model_fields["epochs"].description
    assert description is not None and "epochs=1" in description


def test_python_names_and_wire_names_both_work():
    by_name = api.LoRAConfig(rank=8, target_modules=["q_proj"], rs_lora=True)
    by_alias = api.LoRAConfig.model_validate({"rank": 8, "targetModules": ["q_proj"], "rsLoRA": True})
    assert by_name == by_alias
    assert dump(by_name) == {"rank": 8, "alpha": 32.0, "dropout": 0.05, "targetModules": ["q_proj"], "rsLoRA": True}


def test_unknown_spec_fields_are_rejected_and_named():
    job = minimal_job(lora={"rank": 8, "rnak": 4})
    with pytest.raises(InvalidObjectError, match=r"spec\.lora\.rnak: Extra inputs are not permitted"):
        validate_lorajob(job)


def test_quantities_accept_numbers_and_strings():
    resources = validate_lorajob(minimal_job(resources={"cpu": 8, "memory": "64Gi"})).spec.resources
    assert resources.cpu == "8" and resources.memory == "64Gi"
    with pytest.raises(InvalidObjectError, match=r"spec\.resources\.memory"):
        validate_lorajob(minimal_job(resources={"memory": "lots"}))


def test_set_lists_reject_duplicates():
    with pytest.raises(InvalidObjectError, match=r"spec\.eval\.metrics: Duplicate value"):
        validate_lorajob(minimal_job(eval={"testSet": "s3://data/test.jsonl", "metrics": ["f1", "f1"]}))


@pytest.mark.parametrize(
    ("spec", "accepted"),
    [
        ({"method": "qlora"}, True),  # resources.gpus defaults to 1
        ({"method": "qlora", "resources": {"gpus": 0}}, False),
        ({"method": "lora", "resources": {"gpus": 0}}, True),
        ({"training": {"epochs": 2}}, True),
        ({"training": {"maxSteps": 10}}, True),
        ({"training": {"epochs": 2, "maxSteps": 10}}, False),
        ({"eval": {"testSet": "s3://d/t", "gates": [{"metric": "loss", "max": 1.0}]}}, True),
        ({"eval": {"testSet": "s3://d/t", "gates": [{"metric": "perplexity", "minImprovementOverBase": 0.5}]}}, True),
        ({"eval": {"testSet": "s3://d/t", "gates": [{"metric": "f1", "min": 0.5}]}}, False),
        ({"eval": {"testSet": "s3://d/t", "metrics": ["f1"], "gates": [{"metric": "f1", "min": 0.5}]}}, True),
        ({"eval": {"testSet": "s3://d/t", "gates": [{"metric": "loss"}]}}, False),
        ({"eval": {"testSet": "s3://d/t", "gates": [{"metric": "loss", "min": 0, "max": 1}]}}, False),
        ({"eval": {"testSet": "s3://d/t", "metrics": ["accuracy"]}}, False),
        ({"eval": {"testSet": "s3://d/t", "metrics": ["accuracy"], "labels": ["a", "b"]}}, True),
        ({"dataset": {"train": "s3://d/x", "format": "completion"}, "eval": {"testSet": "s3://d/t"}}, False),
        (
            {
                "dataset": {"train": "s3://d/x", "format": "completion"},
                "eval": {"testSet": "s3://d/t", "metrics": ["loss"]},
            },
            True,
        ),
        ({"lora": {"targetModules": ["all-linear"]}}, True),
        ({"lora": {"targetModules": ["all-linear", "q_proj"]}}, False),
    ],
)
def test_lorajob_rules(spec: dict[str, Any], accepted: bool):
    job = minimal_job(**spec)
    if accepted:
        validate_lorajob(job)
    else:
        with pytest.raises(InvalidObjectError) as info:
            validate_lorajob(job)
        assert all(cause.startswith("spec.") for cause in info.value.causes)


TOKEN = {"agentTokenSecretRef": {"name": "agent-token"}}


def ad(adapter: dict[str, Any], target: dict[str, Any], rollout: dict[str, Any] | None = None) -> dict[str, Any]:
    """An AdapterDeployment; deploymentName and selector targets name an agent token Secret unless given None."""
    if "managed" not in target and "agentTokenSecretRef" not in target:
        target = {**target, **TOKEN}
    target = {k: v for k, v in target.items() if v is not None}
    spec: dict[str, Any] = {"adapter": adapter, "servedName": "s", "target": {"baseModel": "m", **target}}
    if rollout is not None:
        spec["rollout"] = rollout
    return {"apiVersion": api.API_VERSION, "kind": "AdapterDeployment", "metadata": {"name": "x"}, "spec": spec}


MANAGED = {"managed": {"baseModel": {"uri": "hf://a/b"}, "replicas": 2}}


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (ad({"loraJob": "j"}, {"deploymentName": "vllm"}), None),
        (ad({"uri": "s3://a/", "digest": DIGEST}, {"selector": {"app": "vllm"}}), None),
        (ad({"loraJob": "j", "digest": DIGEST}, {"deploymentName": "vllm"}), None),
        (ad({}, {"deploymentName": "vllm"}), "spec.adapter: set exactly one of loraJob or uri"),
        (ad({"loraJob": "j", "uri": "s3://a/", "digest": DIGEST}, {"deploymentName": "v"}), "exactly one of loraJob"),
        (ad({"uri": "s3://a/"}, {"deploymentName": "vllm"}), "spec.adapter.digest: is required"),
        (ad({"loraJob": "j"}, {}), "spec.target: set exactly one of deploymentName, selector or managed"),
        (ad({"loraJob": "j"}, {"deploymentName": "v", **MANAGED}), "spec.target: set exactly one"),
        (ad({"loraJob": "j"}, MANAGED, {"canaryReplicas": 2}), None),
        (ad({"loraJob": "j"}, MANAGED, {"canaryReplicas": 3}), "spec.rollout.canaryReplicas: must not exceed"),
        (ad({"loraJob": "j"}, MANAGED, {"strategy": "AllAtOnce", "canaryReplicas": 3}), None),
        (ad({"loraJob": "j"}, {"deploymentName": "v"}, {"canaryReplicas": 3}), None),  # replica count unknown
        (
            ad({"loraJob": "j"}, {"selector": {"app": "v"}, "agentTokenSecretRef": None}),
            "agentTokenSecretRef: is required",
        ),
        (
            ad({"loraJob": "j"}, {"deploymentName": "v", "agentTokenSecretRef": None}),
            "agentTokenSecretRef: is required",
        ),
        (ad({"loraJob": "j"}, {**MANAGED, **TOKEN}), None),  # a managed server may use the platform's own Secret
        (ad({"uri": "file:///var/run/secrets/", "digest": DIGEST}, {"deploymentName": "v"}), "spec.adapter.uri"),
        (ad({"uri": "pvc://claim/adapter/", "digest": DIGEST}, {"deploymentName": "v"}), "spec.adapter.uri"),
        (ad({"loraJob": "j"}, MANAGED, {"steps": [{"replicas": 1, "bakeSeconds": 60}, {"percent": 50}]}), None),
        (ad({"loraJob": "j"}, MANAGED, {"steps": [{"replicas": 1, "percent": 50}]}), "exactly one of replicas"),
        (ad({"loraJob": "j"}, MANAGED, {"steps": [{"bakeSeconds": 60}]}), "exactly one of replicas"),
        (ad({"loraJob": "j"}, {"deploymentName": "v", "maxLoraRank": 320}), None),
        (ad({"loraJob": "j"}, {"deploymentName": "v", "maxLoraRank": 48}), "maxLoraRank"),  # vLLM refuses 48
    ],
)
def test_adapterdeployment_rules(obj: dict[str, Any], message: str | None):
    if message is None:
        validate_adapterdeployment(obj)
    else:
        with pytest.raises(InvalidObjectError, match=message.replace(".", r"\.")):
            validate_adapterdeployment(obj)


def test_update_of_training_fields_is_rejected_like_the_api_server():
    old = minimal_job(lora={"rank": 8}, eval={"testSet": "s3://d/t"})
    new = copy.deepcopy(old)
    new["spec"]["lora"]["rank"] = 16
    with pytest.raises(InvalidObjectError, match=r"spec\.lora: is immutable once set"):
        validate_lorajob_update(old, new)

    no_eval = copy.deepcopy(old)
    del no_eval["spec"]["eval"]
    with pytest.raises(InvalidObjectError, match=r"spec\.eval: is immutable once set; it cannot be added or removed"):
        validate_lorajob_update(old, no_eval)
    with pytest.raises(InvalidObjectError, match=r"cannot be added or removed"):
        validate_lorajob_update(no_eval, old)

    mutable = copy.deepcopy(old)
    mutable["spec"]["output"]["deleteOnJobDeletion"] = True
    assert validate_lorajob_update(old, mutable).spec.output.delete_on_job_deletion is True

    for change, message in (
        ({"resources": {"gpus": 2}}, "spec.resources: is immutable once set"),
        ({"retries": 5}, "spec.retries: is immutable once set"),
        ({"output": {"uri": "s3://elsewhere/"}}, "spec.output.uri: is immutable once set"),
        ({"output": {"uri": old["spec"]["output"]["uri"], "mergedModel": True}}, "spec.output.mergedModel"),
        ({"activeDeadlineSeconds": 600}, "spec.activeDeadlineSeconds: is immutable once set; it cannot be added"),
    ):
        changed = copy.deepcopy(old)
        changed["spec"].update(change)
        with pytest.raises(InvalidObjectError, match=re.escape(message)):
            validate_lorajob_update(old, changed)
    with_secret = copy.deepcopy(old)
    with_secret["spec"]["output"]["secretRef"] = {"name": "other"}
    with pytest.raises(InvalidObjectError, match=r"spec\.output\.secretRef: is immutable once set; it cannot be added"):
        validate_lorajob_update(old, with_secret)

    # Spelling out a default is not a change.
    explicit = copy.deepcopy(old)
    explicit["spec"]["method"] = "lora"
    explicit["spec"]["lora"]["alpha"] = 32
    validate_lorajob_update(old, explicit)


def test_immutable_fields_are_every_field_of_the_run():
    assert api.immutable_fields(LoRAJobSpec) == {
        "base_model": "spec.baseModel",
        "dataset": "spec.dataset",
        "method": "spec.method",
        "lora": "spec.lora",
        "training": "spec.training",
        "resources": "spec.resources",
        "eval": "spec.eval",
        "retries": "spec.retries",
        "active_deadline_seconds": "spec.activeDeadlineSeconds",
        "queue_name": "spec.queueName",
    }
    assert api.immutable_fields(api.OutputTarget) == {
        "uri": "spec.output.uri",
        "secret_ref": "spec.output.secretRef",
        "merged_model": "spec.output.mergedModel",
    }
    # Every spec field is either immutable or named here (with the reason in docs/concepts.md).
    mutable_sections = {"output"}  # of output, deleteOnJobDeletion alone may change
    assert set(LoRAJobSpec.model_fields) == set(api.immutable_fields(LoRAJobSpec)) | mutable_sections
    assert set(api.OutputTarget.model_fields) == set(api.immutable_fields(api.OutputTarget)) | {
        "delete_on_job_deletion"
    }


def test_derived_status_fields_follow_their_sources():
    progress = TrainingProgress(step=30, total_steps=120)
    assert dump(progress)["summary"] == "25%"
    progress.step = 120  # assignment after construction: still current on the wire
    assert dump(progress)["summary"] == "100%"
    assert dump(TrainingProgress(step=3, percent=99.9))["summary"] == "99%"
    assert "summary" not in dump(TrainingProgress(step=3))

    artifact = AdapterArtifact(
        uri="s3://a/", digest=DIGEST, size_bytes=1, trainable_parameters=2, rank=8, base_model="m"
    )
    assert dump(artifact)["shortDigest"] == "0123456789ab"
    assert artifact.model_dump()["short_digest"] == "0123456789ab"  # Python names stay Python names
    assert dump(EvalResults(passed=False))["verdict"] == "Failed"
    status = AdapterDeploymentStatus(desired_replicas=3, loaded_replicas=2, active_digest=DIGEST)
    assert dump(status)["loaded"] == "2/3" and dump(status)["activeShortDigest"] == "0123456789ab"


def test_status_reads_what_the_cluster_returns():
    artifact = AdapterArtifact(
        uri="s3://a/", digest=DIGEST, size_bytes=1, trainable_parameters=2, rank=8, base_model="m"
    )
    wire = dump(LoRAJobStatus(phase="Succeeded", adapter=artifact, progress=TrainingProgress(step=1, total_steps=1)))
    wire["kopf"] = {"progress": {"create": {"retries": 0}}}  # kopf's bookkeeping
    wire["fieldFromANewerOperator"] = 1
    status = LoRAJobStatus.model_validate(wire)
    assert status.kopf is not None and status.adapter == AdapterArtifact.model_validate(wire["adapter"])
    assert "kopf" not in dump(status)  # never written back by us
    assert dump(status) == {k: v for k, v in wire.items() if k not in ("kopf", "fieldFromANewerOperator")}


def test_error_names_the_object_and_every_field():
    job = minimal_job(lora={"rank": 0}, retries=99)
    with pytest.raises(InvalidObjectError) as info:
        validate_lorajob(job)
    assert str(info.value).startswith('LoRAJob "x" is invalid: ')
    assert {c.split(":")[0] for c in info.value.causes} == {"spec.lora.rank", "spec.retries"}


@pytest.mark.parametrize(
    ("spec", "accepted"),
    [
        ({"method": "dora"}, False),  # mergedModel defaults to false
        ({"method": "dora", "output": {"uri": "s3://adapters/x/", "mergedModel": False}}, False),
        ({"method": "dora", "output": {"uri": "s3://adapters/x/", "mergedModel": True}}, True),
        ({"method": "lora"}, True),
        ({"method": "qlora"}, True),
    ],
)
def test_a_dora_job_must_publish_its_merged_model(spec: dict[str, Any], accepted: bool):
    """vLLM cannot load DoRA adapters as runtime LoRA: a DoRA job is served, and so evaluated, merged."""
    job = minimal_job(**spec)
    if accepted:
        validate_lorajob(job)
        return
    with pytest.raises(InvalidObjectError) as info:
        validate_lorajob(job)
    assert "spec.output.mergedModel: method dora needs mergedModel: true" in str(info.value)
    assert "vLLM cannot load DoRA adapters as runtime LoRA" in str(info.value)
    rule = next(r for r in LoRAJobSpec.cel_rules if "dora" in r.cel)
    assert rule.cel == "self.method != 'dora' || self.output.mergedModel"
    assert rule.field_path == ".output.mergedModel" and rule.reason == "FieldValueRequired"
