"""The CRDs on the real API server: examples accepted and defaulted, invalid ones rejected with the promised
message, training-defining fields immutable, and status written through the models shown by `kubectl get`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from kubelora.api import crdgen
from kubelora.api.v1alpha1 import (
    AdapterArtifact,
    AdapterDeploymentStatus,
    Condition,
    EvalResults,
    GateVerdict,
    LoRAJobStatus,
    ReplicaState,
    TrainingProgress,
    dump,
    validate_adapterdeployment,
    validate_lorajob,
)
from tests.api.helpers import CRDS, EXAMPLES, Example, invalid_examples, load_example, valid_examples
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e

Kubectl = Callable[..., Any]
DIGEST = "sha256:" + "5f1e2d3c4b5a6978" * 4
RESOURCE = {"LoRAJob": "lorajobs.kubelora.dev", "AdapterDeployment": "adapterdeployments.kubelora.dev"}

# Fields each example leaves out, and the value the API server must fill in.
DEFAULTS: dict[str, dict[str, Any]] = {
    "lorajob-support-classifier-qlora": {
        "training.warmupRatio": 0.03,
        "training.seed": 42,
        "training.gradientCheckpointing": True,
        "lora.rsLoRA": False,
        "dataset.validationSplit": 0.05,
        "output.mergedModel": False,
        "eval.samplePredictions": 20,
        "baseModel.trustRemoteCode": False,
    },
    "lorajob-json-extraction-dora": {
        "retries": 2,
        "lora.dropout": 0.05,
        "training.gradientAccumulation": 1,
        "training.warmupRatio": 0.03,
        "resources.tolerations": [],
        "dataset.maxBadRows": 0,
        "eval.labels": None,  # optional without default: stays absent
        "training.epochs": None,
    },
    "adapterdeployment-canary": {"adapter.digest": None},
    "adapterdeployment-pinned-uri-managed": {
        "rollout.strategy": "Canary",
        "rollout.smokePrompts": 5,
        "rollout.smokeMinMatch": 0.8,
        "rollout.autoRollback": True,
        "target.port": 8000,
        "target.maxLoras": 4,
        "target.maxLoraRank": 64,
        "target.managed.image": None,  # unset: the operator's vllmImage
        "target.managed.baseModel.trustRemoteCode": False,
    },
}


@pytest.fixture
def crds(kubectl: Kubectl) -> None:
    """The generated CRDs, installed (idempotent: server-side apply of crds/)."""
    kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=kubelora-api-tests", "-f", str(CRDS))
    names = [f"crd/{kind.name}" for kind in crdgen.KINDS]
    kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)
    wait_for("kubectl to discover the kinds", lambda: kubectl("get", "lj,ad", "-A", check=False).returncode == 0)


def get(kubectl: Kubectl, namespace: str, kind: str, name: str) -> dict[str, Any]:
    out = kubectl("get", RESOURCE[kind], name, "-n", namespace, "-o", "json").stdout
    return dict(json.loads(out))


def lookup(obj: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def normalize(value: Any) -> Any:
    """JSON from the server has 32 where Python has 32.0, and quantities may be numbers or strings."""
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def server_spec(obj: dict[str, Any]) -> Any:
    spec = obj["spec"]
    for key in ("cpu", "memory"):
        if key in spec.get("resources", {}):
            spec["resources"][key] = str(spec["resources"][key])
    return normalize(spec)


@pytest.mark.parametrize("example", valid_examples(), ids=lambda e: e.id)
def test_example_is_accepted_and_defaulted_like_the_models(
    crds: None, kubectl: Kubectl, namespace: str, example: Example
):
    kubectl("apply", "-n", namespace, "-f", str(example.path))
    obj = get(kubectl, namespace, example.kind, example.body["metadata"]["name"])

    for path, value in DEFAULTS[example.id].items():
        assert lookup(example.body["spec"], path) is None, f"{path} is set in {example.path}, so it proves nothing"
        assert lookup(obj["spec"], path) == value, f"spec.{path}"

    # The API server's defaulting and the models' defaulting agree on every field.
    model = validate_lorajob(example.body) if example.kind == "LoRAJob" else validate_adapterdeployment(example.body)
    assert server_spec(obj) == normalize(dump(model.spec))
    # And what the server stored parses back into the same model.
    again = validate_lorajob(obj) if example.kind == "LoRAJob" else validate_adapterdeployment(obj)
    assert again.spec == model.spec


@pytest.mark.parametrize("example", invalid_examples(), ids=lambda e: e.id)
def test_invalid_example_is_rejected_by_the_api_server(crds: None, kubectl: Kubectl, namespace: str, example: Example):
    result = kubectl("apply", "-n", namespace, "-f", str(example.path), check=False)
    assert result.returncode != 0, f"{example.path} was accepted"
    assert example.expect is not None
    assert example.expect in result.stderr, result.stderr
    listed = kubectl("get", RESOURCE[example.kind], "-n", namespace, "-o", "name").stdout
    assert listed.strip() == ""


def patch(kubectl: Kubectl, namespace: str, name: str, body: Any, *, kind: str = "merge", check: bool = False) -> Any:
    return kubectl("patch", "lorajob", name, "-n", namespace, f"--type={kind}", "-p", json.dumps(body), check=check)


def test_training_defining_fields_are_immutable(crds: None, kubectl: Kubectl, namespace: str):
    example = load_example(EXAMPLES / "lorajob-support-classifier-qlora.yaml")
    name = example.body["metadata"]["name"]
    kubectl("apply", "-n", namespace, "-f", str(example.path))
    before = get(kubectl, namespace, "LoRAJob", name)

    result = patch(kubectl, namespace, name, {"spec": {"lora": {"rank": 32}}})
    assert result.returncode != 0 and "spec.lora: is immutable once set" in result.stderr, result.stderr
    result = patch(kubectl, namespace, name, {"spec": {"method": "lora"}})
    assert "spec.method: is immutable once set" in result.stderr, result.stderr
    result = patch(kubectl, namespace, name, {"spec": {"training": {"maxSteps": 10, "epochs": None}}})
    assert "spec.training: is immutable once set" in result.stderr, result.stderr
    result = patch(kubectl, namespace, name, {"spec": {"eval": {"gates": []}}})
    assert "spec.eval: is immutable once set" in result.stderr, result.stderr
    result = patch(kubectl, namespace, name, [{"op": "remove", "path": "/spec/eval"}], kind="json")
    assert "spec.eval: is immutable once set; it cannot be added or removed" in result.stderr, result.stderr
    assert get(kubectl, namespace, "LoRAJob", name)["spec"] == before["spec"]

    # So are the resources, the retries, the deadline and where the adapter goes ...
    for change, message in (
        ({"resources": {"gpus": 2}}, "spec.resources: is immutable once set"),
        ({"retries": 3}, "spec.retries: is immutable once set"),
        ({"activeDeadlineSeconds": 600}, "spec.activeDeadlineSeconds: is immutable once set"),
        ({"output": {"uri": "s3://adapters/elsewhere/"}}, "spec.output.uri: is immutable once set"),
        ({"output": {"mergedModel": True}}, "spec.output.mergedModel: is immutable once set"),
        ({"output": {"secretRef": {"name": "other"}}}, "spec.output.secretRef: is immutable once set"),
        ({"output": {"secretRef": None}}, "spec.output.secretRef: is immutable once set; it cannot be added or"),
    ):
        result = patch(kubectl, namespace, name, {"spec": change})
        assert result.returncode != 0 and message in result.stderr, (change, result.stderr)
    result = patch(kubectl, namespace, name, [{"op": "remove", "path": "/spec/activeDeadlineSeconds"}], kind="json")
    assert "spec.activeDeadlineSeconds: is immutable once set; it cannot be added" in result.stderr, result.stderr
    assert get(kubectl, namespace, "LoRAJob", name)["spec"] == before["spec"]

    # ... but whether the adapter files go with the LoRAJob may change: it is read only on deletion.
    patch(kubectl, namespace, name, {"spec": {"output": {"deleteOnJobDeletion": True}}}, check=True)
    assert get(kubectl, namespace, "LoRAJob", name)["spec"]["output"]["deleteOnJobDeletion"] is True
    # Re-applying the unchanged manifest (defaults spelled out or not) is no change.
    kubectl("apply", "-n", namespace, "-f", str(example.path))

    # An optional training-defining section cannot be added later either.
    bare = yaml.safe_load((EXAMPLES / "lorajob-json-extraction-dora.yaml").read_text())
    del bare["spec"]["eval"]
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bare))
    result = patch(kubectl, namespace, bare["metadata"]["name"], {"spec": {"eval": {"testSet": "s3://d/test.jsonl"}}})
    assert "spec.eval: is immutable once set; it cannot be added or removed" in result.stderr, result.stderr


def columns(kubectl: Kubectl, namespace: str, resource: str, name: str) -> dict[str, str]:
    """`kubectl get` as the user sees it: header -> cell (empty cells stay empty, cells are cut at header offsets)."""
    header, row = kubectl("get", resource, name, "-n", namespace).stdout.splitlines()
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]
    ends = [*starts[1:], None]
    return {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, ends, strict=True)}


def test_lorajob_status_from_the_models_shows_in_kubectl_get(crds: None, kubectl: Kubectl, namespace: str):
    example = load_example(EXAMPLES / "lorajob-support-classifier-qlora.yaml")
    name = example.body["metadata"]["name"]
    kubectl("apply", "-n", namespace, "-f", str(example.path))
    assert columns(kubectl, namespace, "lj", name)["PHASE"] == ""

    training = LoRAJobStatus(phase="Training", attempts=1, progress=TrainingProgress(step=90, total_steps=360))
    kubectl(
        "patch",
        "lj",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": dump(training)}),
    )
    row = columns(kubectl, namespace, "lj", name)
    assert (row["PHASE"], row["PROGRESS"], row["EVAL"], row["ADAPTER"]) == ("Training", "25%", "", "")

    done = LoRAJobStatus(
        phase="Succeeded",
        attempts=1,
        progress=TrainingProgress(step=360, total_steps=360, loss=0.41),
        eval=EvalResults(
            passed=True,
            base={"accuracy": 0.61, "f1": 0.55},
            adapter={"accuracy": 0.9, "f1": 0.86},
            gates=[GateVerdict(metric="accuracy", rule="min", threshold=0.85, value=0.9, passed=True)],
        ),
        adapter=AdapterArtifact(
            uri="s3://adapters/support-classifier/", digest=DIGEST, size_bytes=84_000_000,
            trainable_parameters=41_943_040, rank=16, base_model="meta-llama/Llama-3.1-8B-Instruct",
        ),
        conditions=[Condition(type="Ready", status="True", reason="Published", last_transition_time="2025-06-01T10:00:00Z")],
        estimate={"gpuHours": 1.25, "fits": True, "memoryBytes": {"total": 21474836480}},
    )  # fmt: skip
    kubectl(
        "patch",
        "lj",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": dump(done)}),
    )
    row = columns(kubectl, namespace, "lj", name)
    assert (row["PHASE"], row["PROGRESS"], row["EVAL"], row["READY"]) == ("Succeeded", "100%", "Passed", "True")
    assert row["ADAPTER"] == DIGEST.removeprefix("sha256:")[:12]

    stored = get(kubectl, namespace, "LoRAJob", name)["status"]
    assert stored["estimate"]["memoryBytes"] == {"total": 21474836480}  # free-form, not pruned
    assert normalize(dump(LoRAJobStatus.model_validate(stored))) == normalize(dump(done))


def test_adapterdeployment_status_shows_in_kubectl_get(crds: None, kubectl: Kubectl, namespace: str):
    example = load_example(EXAMPLES / "adapterdeployment-canary.yaml")
    name = example.body["metadata"]["name"]
    kubectl("apply", "-n", namespace, "-f", str(example.path))
    status = AdapterDeploymentStatus(
        phase="Canary",
        active_digest=DIGEST,
        desired_replicas=3,
        loaded_replicas=2,
        replicas=[ReplicaState(pod=f"vllm-{i}", digest=DIGEST, state="Loaded") for i in range(2)],
        conditions=[Condition(type="Ready", status="False", reason="CanaryInProgress")],
    )
    kubectl(
        "patch",
        "ad",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": dump(status)}),
    )
    row = columns(kubectl, namespace, "ad", name)
    assert (row["PHASE"], row["SERVED"], row["LOADED"], row["READY"]) == (
        "Canary",
        "support-classifier",
        "2/3",
        "False",
    )
    assert row["ACTIVE"] == DIGEST.removeprefix("sha256:")[:12]


def test_kinds_are_listed_by_category_and_short_name(crds: None, kubectl: Kubectl, namespace: str):
    for path in ("lorajob-json-extraction-dora.yaml", "adapterdeployment-canary.yaml"):
        kubectl("apply", "-n", namespace, "-f", str(EXAMPLES / path))
    names = kubectl("get", "kubelora", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(names) == [
        "adapterdeployment.kubelora.dev/support-classifier",
        "lorajob.kubelora.dev/invoice-json-extractor",
    ]
    assert kubectl("get", "lj", "-n", namespace, "-o", "name").stdout.split() == [names[1]]
