"""The chart's self-service API (api.*): off by default; when on, its own Deployment, ServiceAccount, exact RBAC,
Service and catalogue, which `kubelora api` accepts."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from kubelora.selfservice.catalogue import Catalogue
from tests.helm.conftest import CHART, find, one, render, run_helm, set_args
from tests.helm.test_chart import APP_VERSION, rules_of

API = {"api": {"enabled": True}}
API_NAME = "kl-kubelora-api"


def api_objects(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted(
        (d["kind"], d["metadata"]["name"])
        for d in docs
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "api"
    )


def test_the_api_is_off_by_default():
    docs = render({})
    assert api_objects(docs) == []
    assert not [d for d in docs if d["metadata"]["name"].startswith(API_NAME)]


def test_enabled_renders_its_own_deployment_serviceaccount_rbac_service_and_catalogue():
    docs = render(API)
    assert api_objects(docs) == [
        ("ClusterRole", API_NAME),
        ("ClusterRoleBinding", API_NAME),
        ("ConfigMap", f"{API_NAME}-catalogue"),
        ("Deployment", API_NAME),
        ("Service", API_NAME),
        ("ServiceAccount", API_NAME),
    ]
    deployment = one(docs, "Deployment", API_NAME)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == API_NAME
    (container,) = pod["containers"]
    assert container["image"] == f"ghcr.io/kubelora/operator:{APP_VERSION}"
    assert container["command"] == ["kubelora", "api"]
    assert container["args"] == ["--host=0.0.0.0", "--port=8080", "--catalogue=/etc/kubelora-api/catalogue.yaml"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {v["name"]: v for v in pod["volumes"]}["catalogue"]["configMap"]["name"] == f"{API_NAME}-catalogue"
    # The Service selects the API pods, not the operator's.
    service = one(docs, "Service", API_NAME)
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "api"
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    binding = one(docs, "ClusterRoleBinding", API_NAME)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": API_NAME, "namespace": "kubelora-system"}]
    assert binding["roleRef"]["name"] == API_NAME


def test_api_rbac_is_exactly_what_the_api_calls():
    role = one(render(API), "ClusterRole", API_NAME)
    assert sorted(rules_of(role)) == sorted(
        [
            ("authentication.k8s.io", "tokenreviews", "create"),
            ("authorization.k8s.io", "subjectaccessreviews", "create"),
            *(("kubelora.dev", "lorajobs", v) for v in ("get", "list", "create", "patch", "delete")),
            *(("kubelora.dev", "adapterdeployments", v) for v in ("get", "list", "create")),
            ("batch", "jobs", "delete"),
            ("", "events", "list"),
            ("", "pods", "get"),
            ("", "secrets", "get"),
        ]
    )
    # Secrets: only the tenant storage Secret, by name.
    (secrets,) = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secrets["resourceNames"] == ["kubelora-api-storage"]
    renamed = one(
        render({"api": {"enabled": True, "catalogue": {"storageSecret": "ft-storage"}}}), "ClusterRole", API_NAME
    )
    (secrets,) = [r for r in renamed["rules"] if "secrets" in r["resources"]]
    assert secrets["resourceNames"] == ["ft-storage"]


def test_catalogue_values_reach_the_api_in_a_form_it_accepts():
    values = {
        "api": {
            "enabled": True,
            "catalogue": {
                "maxFileBytes": 1024,
                "models": {"llama": {"uri": "s3://models/llama/", "gpus": 2, "gpuType": "NVIDIA-L4", "retries": 1}},
                "servingPools": {
                    "support": {
                        "target": {
                            "deploymentName": "vllm",
                            "baseModel": "llama",
                            "agentTokenSecretRef": {"name": "t"},
                        },
                        "endpoint": "http://vllm.serving:8000",
                    }
                },
            },
        }
    }
    docs = render(values)
    text = one(docs, "ConfigMap", f"{API_NAME}-catalogue")["data"]["catalogue.yaml"]
    catalogue = Catalogue.model_validate(yaml.safe_load(text))
    assert catalogue.max_file_bytes == 1024 and catalogue.models["llama"].gpus == 2
    assert catalogue.serving_pools["support"].validated_target().deployment_name == "vllm"
    # A catalogue change rolls the API pods.
    before = one(render(API), "Deployment", API_NAME)["spec"]["template"]["metadata"]["annotations"]
    after = one(docs, "Deployment", API_NAME)["spec"]["template"]["metadata"]["annotations"]
    assert before["checksum/catalogue"] != after["checksum/catalogue"]


def test_tokens_must_be_for_the_api_audience_by_default():
    text = one(render(API), "ConfigMap", f"{API_NAME}-catalogue")["data"]["catalogue.yaml"]
    assert Catalogue.model_validate(yaml.safe_load(text)).audience == "kubelora-api"
    docs = render({"api": {"enabled": True, "audience": "fine-tuning.example.com"}})
    text = one(docs, "ConfigMap", f"{API_NAME}-catalogue")["data"]["catalogue.yaml"]
    assert Catalogue.model_validate(yaml.safe_load(text)).audience == "fine-tuning.example.com"
    # Empty: the API server's own audience (tokens that also work against the cluster).
    docs = render({"api": {"enabled": True, "audience": ""}})
    text = one(docs, "ConfigMap", f"{API_NAME}-catalogue")["data"]["catalogue.yaml"]
    assert Catalogue.model_validate(yaml.safe_load(text)).audience is None


def test_allowed_storage_endpoints_reach_the_catalogue():
    docs = render({"api": {"enabled": True, "catalogue": {"allowedStorageEndpoints": ["minio.storage:9000"]}}})
    text = one(docs, "ConfigMap", f"{API_NAME}-catalogue")["data"]["catalogue.yaml"]
    catalogue = Catalogue.model_validate(yaml.safe_load(text))
    assert catalogue.allowed_storage_endpoints == ["minio.storage:9000"]
    assert catalogue.storage_endpoint_allowed("http://minio.storage:9000")
    assert not catalogue.storage_endpoint_allowed("kubernetes.default:443")
    text = one(render(API), "ConfigMap", f"{API_NAME}-catalogue")["data"]["catalogue.yaml"]
    assert Catalogue.model_validate(yaml.safe_load(text)).allowed_storage_endpoints == []


def test_an_image_of_its_own_and_a_service_port():
    docs = render(
        {"api": {"enabled": True, "image": {"repository": "reg/kubelora-api", "tag": "1.2"}, "service": {"port": 8443}}}
    )
    (container,) = one(docs, "Deployment", API_NAME)["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "reg/kubelora-api:1.2"
    assert one(docs, "Service", API_NAME)["spec"]["ports"][0]["port"] == 8443


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"api": {"enabled": True, "typo": 1}}, "typo"),
        ({"api": {"catalogue": {"models": {"m": {"uri": "s3://m/", "gpu": 1}}}}}, "gpu"),
        ({"api": {"catalogue": {"models": {"m": {"uri": "ftp://m/"}}}}}, "uri"),
        ({"api": {"catalogue": {"servingPools": {"p": {"endpoint": "http://x"}}}}}, "target"),
        ({"api": {"service": {"type": "Ingress"}}}, "type"),
        ({"api": {"audience": 1}}, "audience"),
        ({"api": {"catalogue": {"allowedStorageEndpoints": "minio:9000"}}}, "allowedStorageEndpoints"),
    ],
)
def test_schema_checks_the_api_values(values, field):
    result = run_helm("template", "kl", str(CHART), *set_args(values), check=False)
    assert result.returncode != 0 and field in result.stderr, result.stderr


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "strict"])
def test_helm_lint_with_the_api(strict):
    args = ["lint", str(CHART), *set_args(API)]
    if strict:
        args.append("--strict")
    result = run_helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nothing_else_changes_when_the_api_is_on():
    off = {(d["kind"], d["metadata"]["name"]) for d in render({})}
    on = {(d["kind"], d["metadata"]["name"]) for d in render(API)}
    assert on - off == set(api_objects(render(API)))
    assert find(render(API), "Deployment", "kl-kubelora")
