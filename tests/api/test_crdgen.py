"""The generated CRDs: structural, current with the models (drift), and carrying the rules and columns."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import Field, create_model

from kubelora.api import crdgen, docgen
from kubelora.api import v1alpha1 as api
from kubelora.api.cel import Rule
from tests.api.helpers import CRDS, DOCS, REPO

# Keys a structural schema (apiextensions.k8s.io/v1 JSONSchemaProps) may carry here.
ALLOWED_KEYS = {
    "description", "type", "format", "enum", "default", "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "minItems", "maxItems", "minProperties", "maxProperties", "items",
    "properties", "additionalProperties", "required", "anyOf", "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-validations",
}  # fmt: skip


def committed() -> dict[str, dict[str, Any]]:
    return {kind.kind: yaml.safe_load((CRDS / kind.filename).read_text()) for kind in crdgen.KINDS}


def schema(kind: str) -> dict[str, Any]:
    return committed()[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


# ---------------------------------------------------------------------------------------------------------------------
# Drift: crds/*.yaml must be what the models generate


def test_committed_crds_match_the_models():
    delta = crdgen.diff(CRDS, crdgen.generate())
    assert not delta, f"crds/ is stale; run `make crds`:\n{delta}"


def test_committed_api_reference_matches_the_models():
    assert DOCS.read_text() == docgen.generate(), "docs/api-reference.md is stale; run `make crds`"


def _mutated_kinds(**fields: Any) -> tuple[crdgen.Kind, ...]:
    """KINDS with LoRAJobSpec replaced by a copy that adds or overrides ``fields``."""
    spec = create_model("LoRAJobSpec", __base__=api.LoRAJobSpec, __doc__=api.LoRAJobSpec.__doc__, **fields)
    lorajob = dataclasses.replace(crdgen.KINDS[0], spec=spec)
    return (lorajob, *crdgen.KINDS[1:])


def test_drift_check_goes_red_when_a_field_changes():
    # The same comparison as the drift test above, against a model with one default changed.
    kinds = _mutated_kinds(
        retries=(int, Field(default=3, ge=0, le=20, description="Failed training attempts to retry"))
    )
    delta = crdgen.diff(CRDS, crdgen.generate(kinds))
    assert "-                default: 2" in delta and "+                default: 3" in delta
    assert "lorajobs.kubelora.dev.yaml" in delta and "adapterdeployments" not in delta


def test_drift_check_goes_red_when_a_field_is_added_or_a_rule_changes(monkeypatch: pytest.MonkeyPatch):
    kinds = _mutated_kinds(priority=(int | None, Field(default=None, description="New knob")))
    assert "+              priority:" in crdgen.diff(CRDS, crdgen.generate(kinds))

    rule = Rule(cel="self.epochs > 1.0", message="spec.training: changed", check=lambda t: True)
    monkeypatch.setattr(api.TrainingConfig, "cel_rules", (rule,))
    delta = crdgen.diff(CRDS, crdgen.generate())
    assert "+                - rule: self.epochs > 1.0" in delta


def test_check_cli_fails_with_a_diff_on_stale_files_and_passes_on_fresh_ones(tmp_path: Path):
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "kubelora.api.crdgen", "--out", str(tmp_path), *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO)

    docs = tmp_path / "api-reference.md"
    assert run("--check").returncode == 1  # nothing there yet
    assert run("--docs", str(docs)).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(k.filename for k in crdgen.KINDS), docs.name])
    assert run("--check", "--docs", str(docs)).returncode == 0

    target = tmp_path / "lorajobs.kubelora.dev.yaml"
    edited = target.read_text().replace("maximum: 512", "maximum: 1024", 1)
    target.write_text(edited)
    stale = run("--check")
    assert stale.returncode == 1
    assert "-                    maximum: 1024" in stale.stdout and "+                    maximum: 512" in stale.stdout
    assert "run `make crds`" in stale.stderr
    assert target.read_text() == edited  # --check never writes

    docs.write_text(docs.read_text() + "local edit\n")
    assert run("--docs", str(docs)).returncode == 0  # rewrites both
    assert run("--check", "--docs", str(docs)).returncode == 0


# ---------------------------------------------------------------------------------------------------------------------
# Structure


@pytest.mark.parametrize("kind", ["LoRAJob", "AdapterDeployment"])
def test_schema_is_structural(kind: str):
    for path, node in walk(schema(kind)):
        assert set(node) <= ALLOWED_KEYS, f"{path}: {set(node) - ALLOWED_KEYS}"
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node and node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            continue
        assert "anyOf" not in node, path
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("default", "") is not None, path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(bound, True) is True, f"{path}: OpenAPI v3.0 wants a boolean {bound}"
        if "enum" in node:
            python_type = {"string": str, "integer": int, "number": float}[node["type"]]
            assert all(isinstance(v, python_type) for v in node["enum"]), path
        for required in node.get("required", []):
            assert required in node["properties"], f"{path}: required {required} is not a property"


@pytest.mark.parametrize("kind", ["LoRAJob", "AdapterDeployment"])
def test_spec_is_bounded_for_cel_cost(kind: str):
    for path, node in walk(schema(kind)["properties"]["spec"]):
        if node.get("type") == "array":
            assert "maxItems" in node, f"spec{path}: lists need maxItems"
        if node.get("type") == "string":
            assert "maxLength" in node or "enum" in node, f"spec{path}: strings need maxLength"
        if node.get("type") == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, f"spec{path}: maps need maxProperties"


@pytest.mark.parametrize("kind", ["LoRAJob", "AdapterDeployment"])
def test_defaults_are_present_and_valid(kind: str):
    spec = schema(kind)["properties"]["spec"]
    for path, node in walk(spec):
        if node.get("type") == "object" and "default" in node:
            assert node["default"] == {}, path
            assert not node.get("required"), f"spec{path}: default {{}} would fail its own required fields"
    assert not [p for p, n in walk(schema(kind)["properties"]["status"]) if "default" in n], "status has no defaults"


def test_defaults_cover_nested_objects():
    spec = schema("LoRAJob")["properties"]["spec"]["properties"]
    for name in ("lora", "training", "resources"):
        assert spec[name]["default"] == {}
    assert spec["lora"]["properties"]["rank"]["default"] == 16
    assert spec["lora"]["properties"]["targetModules"]["default"] == ["all-linear"]
    assert spec["eval"]["properties"]["metrics"]["default"] == ["exact_match"]
    assert "default" not in spec["eval"]  # optional section: absent means no evaluation
    assert "default" not in spec["training"]["properties"]["epochs"]
    ad = schema("AdapterDeployment")["properties"]["spec"]["properties"]
    assert ad["rollout"]["default"] == {} and ad["rollout"]["properties"]["strategy"]["default"] == "Canary"
    assert ad["gatePolicy"]["properties"]["requireEvalPassed"]["default"] is True


def test_optional_fields_are_not_required_and_not_nullable():
    spec = schema("LoRAJob")["properties"]["spec"]
    assert spec["required"] == ["baseModel", "dataset", "output"]
    epochs = spec["properties"]["training"]["properties"]["epochs"]
    assert epochs["type"] == "number" and epochs["minimum"] == 0 and epochs["exclusiveMinimum"] is True
    assert "nullable" not in str(spec)


def test_bounds_enums_and_patterns_survive():
    spec = schema("LoRAJob")["properties"]["spec"]["properties"]
    assert spec["lora"]["properties"]["rank"].items() >= {"minimum": 1, "maximum": 512}.items()
    assert spec["method"]["enum"] == ["lora", "qlora", "dora"]
    assert spec["baseModel"]["properties"]["uri"]["pattern"] == "^(s3|pvc|hf|file)://.+"
    assert (
        spec["dataset"]["properties"]["validationSplit"].items() >= {"maximum": 0.5, "exclusiveMaximum": True}.items()
    )
    digest = schema("AdapterDeployment")["properties"]["spec"]["properties"]["adapter"]["properties"]["digest"]
    assert digest["pattern"] == "^sha256:[0-9a-f]{64}$"


def _rules(kind: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """message -> (schema path, rule) for every x-kubernetes-validations entry."""
    return {
        r["message"]: (path, r) for path, node in walk(schema(kind)) for r in node.get("x-kubernetes-validations", [])
    }


def test_every_python_rule_is_in_the_crd_next_to_its_field():
    expected = {
        "spec.training: epochs and maxSteps are mutually exclusive": ".spec.training",
        "spec.resources.gpus: method qlora needs at least 1 GPU": ".spec",
        "spec.eval.gates: each gate sets exactly one of min, max or minImprovementOverBase": ".spec.eval.gates[]",
        "spec.eval.labels: the accuracy metric needs labels": ".spec.eval",
        "spec.lora.targetModules: all-linear cannot be combined with module names": ".spec.lora",
        "spec.adapter: set exactly one of loraJob or uri": ".spec.adapter",
        "spec.adapter.digest: is required when spec.adapter.uri is set": ".spec.adapter",
        "spec.target: set exactly one of deploymentName, selector or managed": ".spec.target",
        "spec.rollout.canaryReplicas: must not exceed spec.target.managed.replicas": ".spec",
    }
    rules = {**_rules("LoRAJob"), **_rules("AdapterDeployment")}
    for message, path in expected.items():
        assert rules[message][0] == path, message
    python_rules = {
        rule.message
        for model in vars(api).values()
        if isinstance(model, type) and issubclass(model, api.Model)
        for rule in model.__dict__.get("cel_rules", ())
    }
    crd_rules = {m for m in rules if not m.endswith(": is immutable once set")}
    assert python_rules == crd_rules
    for message, (_, rule) in rules.items():
        assert message.startswith("spec."), message
        assert "message" in rule and "rule" in rule


def test_every_field_of_the_run_is_immutable_but_the_deletion_policy():
    spec = schema("LoRAJob")["properties"]["spec"]
    output = spec["properties"]["output"]
    fields = {f"spec.{name}": node for name, node in spec["properties"].items() if name != "output"}
    fields.update({f"spec.output.{name}": node for name, node in output["properties"].items()})
    mutable = {"spec.output.deleteOnJobDeletion"}
    assert mutable <= fields.keys()
    for path, node in fields.items():
        rule = {"rule": "self == oldSelf", "message": f"{path}: is immutable once set", "reason": "FieldValueInvalid"}
        if path in mutable:
            assert "x-kubernetes-validations" not in node, path
        else:
            assert rule in node["x-kubernetes-validations"], path
    # Optional fields cannot be added or removed either (self == oldSelf only runs when both exist).
    presence = [r["rule"] for r in spec["x-kubernetes-validations"] + output["x-kubernetes-validations"]]
    for optional in ("eval", "activeDeadlineSeconds", "secretRef"):
        assert f"has(self.{optional}) == has(oldSelf.{optional})" in presence, optional


def test_field_paths_point_at_real_fields():
    checked = 0
    for kind in ("LoRAJob", "AdapterDeployment"):
        for path, node in walk(schema(kind)):
            for rule in node.get("x-kubernetes-validations", []):
                if "fieldPath" in rule:
                    target = node
                    for part in rule["fieldPath"].lstrip(".").split("."):
                        assert part in target.get("properties", {}), f"{path}: fieldPath {rule['fieldPath']}"
                        target = target["properties"][part]
                    checked += 1
    assert checked >= 5


def test_crd_metadata_columns_and_subresources():
    crds = committed()
    for kind, plural, short in (("LoRAJob", "lorajobs", "lj"), ("AdapterDeployment", "adapterdeployments", "ad")):
        crd = crds[kind]
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1" and crd["metadata"]["name"] == f"{plural}.kubelora.dev"
        spec = crd["spec"]
        assert spec["scope"] == "Namespaced" and spec["group"] == "kubelora.dev"
        assert spec["names"]["shortNames"] == [short] and spec["names"]["categories"] == ["kubelora"]
        (version,) = spec["versions"]
        assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}
        columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
        assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
        assert columns["Age"] == ".metadata.creationTimestamp"
    lj = {c["name"]: c["jsonPath"] for c in crds["LoRAJob"]["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert list(lj)[:5] == ["Phase", "Progress", "Eval", "Adapter", "Ready"]
    ad = {
        c["name"]: c["jsonPath"] for c in crds["AdapterDeployment"]["spec"]["versions"][0]["additionalPrinterColumns"]
    }
    assert list(ad)[:5] == ["Phase", "Served", "Active", "Loaded", "Ready"]


@pytest.mark.parametrize("kind", ["LoRAJob", "AdapterDeployment"])
def test_printer_columns_read_status_fields_that_exist(kind: str):
    root = schema(kind)
    crd = committed()[kind]
    for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
        path = column["jsonPath"]
        if path.startswith(".metadata") or "[?" in path:
            continue
        node = root
        for part in path.lstrip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == column["type"], path


def test_conditions_are_a_map_keyed_by_type():
    conditions = schema("LoRAJob")["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    kopf = schema("LoRAJob")["properties"]["status"]["properties"]["kopf"]
    assert kopf["x-kubernetes-preserve-unknown-fields"] is True
