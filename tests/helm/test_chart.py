"""The chart, rendered without a cluster: lint, the strict values schema, and what each mode renders."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tests.helm.conftest import (
    CHART,
    KOPF_CRDS,
    SOURCE_CRDS,
    find,
    one,
    render,
    run_helm,
    set_args,
    source_crds_present,
    template,
)

APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
NAMESPACED = {"watchNamespaces": ["team-a", "team-b"]}
MINIO = {"minio": {"enabled": True}}


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(docs, "Deployment", "kl-kubelora")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return containers[0]


def rules_of(role: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples of a Role or ClusterRole."""
    return [
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    ]


def config_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "ConfigMap", "kl-kubelora")["data"]["config.yaml"])


# --------------------------------------------------------------------------------------------------------------------
# Lint and schema


@pytest.mark.parametrize("values", [{}, NAMESPACED, MINIO], ids=["default", "namespaced", "minio"])
@pytest.mark.parametrize("strict", [False, True], ids=["lint", "strict"])
def test_helm_lint(values, strict):
    args = ["lint", str(CHART), *set_args(values)]
    if strict:
        args.insert(1, "--strict")
    result = run_helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"replicaCont": 2}, "replicaCont"),
        ({"minio": {"persistance": {"enabled": False}}}, "persistance"),
        ({"config": {"gpuPrices": {}}}, "gpuPrices"),
        ({"crds": {"enabled": True, "keepp": True}}, "keepp"),
        ({"containerSecurityContext": {"privilegd": True}}, "privilegd"),
        ({"networkPolicy": {"enabled": True, "ingress": [{"form": []}]}}, "form"),
        ({"podDisruptionBudget": {"minAvaliable": 1}}, "minAvaliable"),
        ({"podAntiAffinity": {"topologykey": "zone"}}, "topologykey"),
    ],
    ids=[
        "top-level",
        "minio.persistence",
        "config",
        "crds",
        "securityContext",
        "networkPolicy.ingress",
        "podDisruptionBudget",
        "podAntiAffinity",
    ],
)
def test_schema_rejects_unknown_keys_by_name(values, named):
    result = run_helm("template", "kl", str(CHART), *set_args(values), check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert named in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"config": {"executor": "cloud"}}, "executor"),
        ({"replicaCount": "two"}, "replicaCount"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
        ({"config": {"gpuPricesPerHour": {"NVIDIA-L4": -1}}}, "gpuPricesPerHour"),
        ({"minio": {"buckets": ["x; rm -rf /"]}}, "buckets"),
        ({"image": {"repository": "r", "digest": "latest"}}, "digest"),
        ({"podDisruptionBudget": {"minAvailable": "half"}}, "minAvailable"),
        ({"podAntiAffinity": {"weight": 0}}, "weight"),
    ],
    ids=[
        "executor-enum",
        "type",
        "namespace-name",
        "negative-price",
        "bucket-name",
        "digest",
        "pdb-percentage",
        "anti-affinity-weight",
    ],
)
def test_schema_rejects_bad_values(values, field):
    result = run_helm("template", "kl", str(CHART), *set_args(values), check=False)
    assert result.returncode != 0
    assert field in result.stderr, result.stderr


def walk_schema(node: Any, path: str = "") -> list[str]:
    """Paths of object schemas that declare properties but leave additionalProperties open."""
    open_objects = []
    if isinstance(node, dict):
        if "properties" in node and node.get("additionalProperties") is not False:
            open_objects.append(path or "/")
        for key, value in node.items():
            open_objects += walk_schema(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            open_objects += walk_schema(value, f"{path}/{index}")
    return open_objects


def test_schema_is_closed_at_every_level_and_covers_values_yaml():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert walk_schema(schema) == []
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node or "allOf" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node["allOf"][0]
        return node

    def check(value: Any, node: dict[str, Any], path: str) -> None:
        node = resolve(node)
        if isinstance(value, dict) and "properties" in node:
            for key, child in value.items():
                assert key in node["properties"], f"{path}.{key} is in values.yaml but not in values.schema.json"
                check(child, node["properties"][key], f"{path}.{key}")

    check(values, schema, "values")


def test_values_yaml_documents_every_key():
    """Every key of values.yaml has a comment on the lines above it, or belongs to a documented block."""
    undocumented = []
    lines = (CHART / "values.yaml").read_text().splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        previous = lines[index - 1].strip() if index else ""
        if indent == 0 and not previous.startswith("#"):
            undocumented.append(stripped.split(":")[0])
    assert undocumented == []


# --------------------------------------------------------------------------------------------------------------------
# Default (cluster mode)


def test_default_render_runs_one_restricted_operator_for_all_namespaces():
    docs = render()
    deployment = one(docs, "Deployment", "kl-kubelora")
    assert deployment["metadata"]["namespace"] == "kubelora-system"
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    container = operator_container(docs)
    assert container["image"] == f"ghcr.io/kubelora/operator:{APP_VERSION}"
    assert container["args"] == [
        "--all-namespaces",
        "--config=/etc/kubelora/config.yaml",
        "--metrics-port=8080",
        "--health-port=8081",
        "--peering=kl-kubelora",
    ]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 8080, "health": 8081}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["serviceAccountName"] == "kl-kubelora"
    assert "tolerations" not in pod, "the operator needs no GPU node"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/etc/kubelora", "/tmp"} <= mounts
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_every_namespaced_object_names_its_namespace():
    for values in ({}, NAMESPACED, MINIO, {"prometheus": {"servicemonitor": {"enabled": True}}}, {"replicaCount": 2}):
        for doc in render(values):
            cluster_scoped = doc["kind"] in {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
            assert cluster_scoped != bool(doc["metadata"].get("namespace")), (doc["kind"], doc["metadata"])


def test_config_file_carries_operator_settings():
    config = config_of(render())
    assert config == {
        "trainerImage": f"ghcr.io/kubelora/trainer:{APP_VERSION}",
        "trainerUid": 65532,
        "agentImage": f"ghcr.io/kubelora/agent:{APP_VERSION}",
        "vllmImage": "vllm/vllm-openai:v0.32.0",
        "imagePullSecrets": [],
        "gpuPricesPerHour": {
            "NVIDIA-A100-SXM4-80GB": 3.67,
            "NVIDIA-A100-SXM4-40GB": 3.06,
            "NVIDIA-H100-80GB-HBM3": 6.98,
            "NVIDIA-L4": 0.81,
            "NVIDIA-A10G": 1.01,
            "Tesla-T4": 0.53,
        },
        "defaultGpuPricePerHour": 2.0,
        "s3Secure": False,
        "progressIntervalSeconds": 15,
        "resyncSeconds": 300,
        "reconcileTimeoutSeconds": 60,
        "s3ConnectTimeoutSeconds": 3,
        "s3ReadTimeoutSeconds": 15,
        "jobTtlSecondsAfterFinished": 3600,
        "executor": "job",
        "shmSizePerGpu": "16Gi",
        "operatorCredentialsNamespaces": [],
        "adapterCacheSizeLimit": "10Gi",
        "vllmShmSize": "4Gi",
        # A managed server's NetworkPolicy admits its agent port from exactly these pods.
        "operatorNamespace": "kubelora-system",
        "operatorPodLabels": {
            "app.kubernetes.io/name": "kubelora",
            "app.kubernetes.io/instance": "kl",
            "app.kubernetes.io/component": "operator",
        },
    }
    pinned = config_of(
        render(
            {
                "trainer": {"image": {"repository": "registry.example/trainer", "digest": "sha256:" + "a" * 64}},
                "agent": {"image": {"repository": "registry.example/agent", "tag": "2.0.0"}},
                "vllm": {"image": {"repository": "registry.example/vllm", "digest": "sha256:" + "b" * 64}},
                "workloads": {"imagePullSecrets": ["regcred"]},
                "config": {"executor": "local", "gpuPricesPerHour": {"NVIDIA-L4": 1.5, "Tesla-T4": None}},
                "s3": {"endpoint": "https://s3.example.com", "existingSecret": "s3-creds"},
            }
        )
    )
    assert pinned["trainerImage"] == "registry.example/trainer@sha256:" + "a" * 64
    assert pinned["agentImage"] == "registry.example/agent:2.0.0"
    assert pinned["vllmImage"] == "registry.example/vllm@sha256:" + "b" * 64
    assert pinned["imagePullSecrets"] == ["regcred"]
    assert pinned["executor"] == "local"
    # Helm merges maps: one key changes, null removes one, the other defaults stay.
    assert pinned["gpuPricesPerHour"]["NVIDIA-L4"] == 1.5
    assert "Tesla-T4" not in pinned["gpuPricesPerHour"]
    assert pinned["gpuPricesPerHour"]["NVIDIA-A100-SXM4-80GB"] == 3.67
    assert pinned["defaultS3Endpoint"] == "https://s3.example.com"
    assert pinned["s3Secure"] is True


@pytest.mark.parametrize(
    "values",
    [
        {},
        NAMESPACED,
        MINIO,
        {"s3": {"endpoint": "s3.example.com:9000", "secure": True}, "config": {"executor": "local"}},
    ],
    ids=["default", "namespaced", "minio", "s3"],
)
def test_config_file_is_accepted_by_the_operator(values, tmp_path):
    """The operator's own loader (extra keys forbidden) reads what the chart renders."""
    config_module = pytest.importorskip("kubelora.operator.config")
    path = tmp_path / "config.yaml"
    path.write_text(one(render(values), "ConfigMap", "kl-kubelora")["data"]["config.yaml"])
    loaded = config_module.OperatorConfig.load(path)
    assert loaded.trainer_image.endswith(f":{APP_VERSION}")
    assert loaded.executor == values.get("config", {}).get("executor", "job")
    assert loaded.price_per_hour("NVIDIA-A100-SXM4-80GB") == 3.67


def test_config_change_rolls_the_operator():
    def checksum(values: dict[str, Any]) -> str:
        deployment = one(render(values), "Deployment", "kl-kubelora")
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum({}) != checksum({"config": {"progressIntervalSeconds": 30}})


# What the operator's code calls in a tenant namespace, and nothing else: the chart-installed operator
# runs a LoRAJob and an AdapterDeployment to the end under exactly these (tests/production).
NAMESPACED_RULES = {
    *(
        (g, r, v)
        for g in ["kubelora.dev"]
        for r in ["lorajobs", "adapterdeployments"]
        for v in ["get", "list", "watch", "patch"]
    ),
    ("kubelora.dev", "lorajobs/status", "patch"),
    ("kubelora.dev", "adapterdeployments/status", "patch"),
    ("kubelora.dev", "lorajobs/finalizers", "update"),
    ("kubelora.dev", "adapterdeployments/finalizers", "update"),
    ("batch", "jobs", "list"),
    ("batch", "jobs", "watch"),
    ("batch", "jobs", "create"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("apps", "deployments", "get"),
    ("apps", "deployments", "create"),
    ("apps", "deployments", "patch"),
    ("apps", "deployments", "delete"),
    ("", "secrets", "get"),
    ("", "secrets", "create"),
    ("networking.k8s.io", "networkpolicies", "get"),
    ("networking.k8s.io", "networkpolicies", "create"),
    ("networking.k8s.io", "networkpolicies", "patch"),
    ("networking.k8s.io", "networkpolicies", "delete"),
    ("", "configmaps", "get"),
    ("", "configmaps", "create"),
    ("", "configmaps", "patch"),
    ("", "events", "create"),
    ("", "events", "list"),
    ("", "services", "create"),
    ("kueue.x-k8s.io", "workloads", "list"),
}
CLUSTER_READ_RULES = {
    ("", "nodes", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "get"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}


def test_cluster_mode_rbac_is_least_privilege():
    docs = render()
    role = one(docs, "ClusterRole", "kl-kubelora")
    granted = rules_of(role)
    assert len(granted) == len(set(granted)), "no rule granted twice"
    assert set(granted) == NAMESPACED_RULES | CLUSTER_READ_RULES | {
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
        # The operator creates its ClusterKopfPeering at startup when it is missing.
        *(("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch", "create")),
    }
    binding = one(docs, "ClusterRoleBinding", "kl-kubelora")
    assert binding["roleRef"]["name"] == "kl-kubelora"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kl-kubelora", "namespace": "kubelora-system"}]
    assert find(docs, "Role") == [] and find(docs, "RoleBinding") == []


def test_aggregated_roles_let_namespace_editors_use_lorajobs():
    docs = render()
    edit = one(docs, "ClusterRole", "kl-kubelora-edit")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert ("kubelora.dev", "lorajobs", "create") in rules_of(edit)
    view = one(docs, "ClusterRole", "kl-kubelora-view")
    assert {v for _, _, v in rules_of(view)} == {"get", "list", "watch"}
    assert find(render({"rbac": {"aggregateClusterRoles": False}}), "ClusterRole", "kl-kubelora-edit") == []


# --------------------------------------------------------------------------------------------------------------------
# Namespaced mode


def test_namespaced_mode_uses_roles_in_watched_namespaces_only():
    docs = render(NAMESPACED)
    assert operator_container(docs)["args"][:2] == ["--namespace=team-a", "--namespace=team-b"]
    assert "--all-namespaces" not in operator_container(docs)["args"]
    cluster_roles = [r for r in find(docs, "ClusterRole") if not r["metadata"]["name"].endswith(("-view", "-edit"))]
    assert [r["metadata"]["name"] for r in cluster_roles] == ["kl-kubelora-cluster-read"]
    assert set(rules_of(cluster_roles[0])) == CLUSTER_READ_RULES
    for namespace in ("team-a", "team-b"):
        role = one(docs, "Role", "kl-kubelora", namespace)
        assert set(rules_of(role)) == NAMESPACED_RULES | {
            ("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch", "create")
        }
        binding = one(docs, "RoleBinding", "kl-kubelora", namespace)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kl-kubelora"}
        assert binding["subjects"][0]["namespace"] == "kubelora-system"
    assert find(docs, "Role", namespace="kubelora-system") == []


@pytest.mark.parametrize("values", [{}, NAMESPACED, {"replicaCount": 2}], ids=["cluster", "namespaced", "replicas"])
def test_the_chart_renders_no_peering_object_and_no_hook(values):
    """The operator creates its peering object at startup (kubelora.operator.peering), so a GitOps sync
    (Argo CD runs Helm hooks as sync hooks, deleting and re-creating them each time) never resets it."""
    manifest = template(values)
    assert "KopfPeering" not in {d["kind"] for d in render(values)}
    assert "helm.sh/hook" not in manifest


@pytest.mark.parametrize("values", [{}, NAMESPACED], ids=["cluster", "namespaced"])
def test_operator_creates_peering_objects_where_the_chart_grants_create(values):
    """The places the operator's startup code creates peering objects in, from the chart's own arguments."""
    peering = pytest.importorskip("kubelora.operator.peering")
    docs = render(values)
    args = operator_container(docs)["args"]
    namespaces = [a.split("=", 1)[1] for a in args if a.startswith("--namespace=")]
    places = peering.peering_namespaces(namespaces, clusterwide="--all-namespaces" in args)
    if not values:
        assert places == [None]
        assert ("kopf.dev", "clusterkopfpeerings", "create") in rules_of(one(docs, "ClusterRole", "kl-kubelora"))
    else:
        assert places == ["team-a", "team-b"]
        for namespace in places:
            assert ("kopf.dev", "kopfpeerings", "create") in rules_of(one(docs, "Role", "kl-kubelora", namespace))
    assert peering.peering_namespaces(["team-a", "team-*", "team-a"], clusterwide=False) == ["team-a"]


def test_peering_can_be_turned_off_for_a_single_replica():
    docs = render({"peering": {"enabled": False}})
    assert not [a for a in operator_container(docs)["args"] if a.startswith("--peering")]
    result = run_helm(
        "template", "kl", str(CHART), *set_args({"peering": {"enabled": False}, "replicaCount": 2}), check=False
    )
    assert result.returncode != 0 and "peering" in result.stderr


def test_standby_replicas_with_peering():
    docs = render({"replicaCount": 3, "strategy": {"type": "RollingUpdate"}, "peering": {"name": "shared"}})
    deployment = one(docs, "Deployment", "kl-kubelora")
    assert deployment["spec"]["replicas"] == 3
    assert "--peering=shared" in operator_container(docs)["args"]
    env = {e["name"]: e for e in operator_container(docs)["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


SELECTOR = {
    "app.kubernetes.io/name": "kubelora",
    "app.kubernetes.io/instance": "kl",
    "app.kubernetes.io/component": "operator",
}
SPREAD_OVER_NODES = {
    "preferredDuringSchedulingIgnoredDuringExecution": [
        {
            "weight": 100,
            "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": SELECTOR}},
        }
    ]
}


def pod_affinity(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    return one(docs, "Deployment", "kl-kubelora")["spec"]["template"]["spec"].get("affinity")


@pytest.mark.parametrize("replicas", [0, 1])
def test_one_replica_gets_no_disruption_budget_and_no_anti_affinity(replicas):
    """A budget that keeps one of one pod would block every node drain."""
    docs = render({"replicaCount": replicas})
    assert find(docs, "PodDisruptionBudget") == []
    assert pod_affinity(docs) is None


def test_several_replicas_get_a_disruption_budget_and_spread_over_nodes():
    docs = render({"replicaCount": 2})
    deployment = one(docs, "Deployment", "kl-kubelora")
    assert deployment["spec"]["selector"]["matchLabels"] == SELECTOR
    pdb = one(docs, "PodDisruptionBudget", "kl-kubelora", "kubelora-system")
    assert pdb["apiVersion"] == "policy/v1"
    # One replica works, the others stand by: a drain may take every standby but never the last pod.
    assert pdb["spec"] == {
        "selector": {"matchLabels": SELECTOR},
        "minAvailable": 1,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }
    assert pod_affinity(docs) == {"podAntiAffinity": SPREAD_OVER_NODES}


def test_disruption_budget_and_anti_affinity_values():
    by_max = one(render({"replicaCount": 3, "podDisruptionBudget": {"maxUnavailable": 1}}), "PodDisruptionBudget")
    assert by_max["spec"]["maxUnavailable"] == 1 and "minAvailable" not in by_max["spec"]
    share = one(render({"replicaCount": 4, "podDisruptionBudget": {"minAvailable": "50%"}}), "PodDisruptionBudget")
    assert share["spec"]["minAvailable"] == "50%"
    both = {"replicaCount": 2, "podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}}
    result = run_helm("template", "kl", str(CHART), *set_args(both), check=False)
    assert result.returncode != 0 and "not both" in result.stderr

    off = render({"replicaCount": 2, "podDisruptionBudget": {"enabled": False}, "podAntiAffinity": {"enabled": False}})
    assert find(off, "PodDisruptionBudget") == [] and pod_affinity(off) is None

    zones = pod_affinity(render({"replicaCount": 2, "podAntiAffinity": {"topologyKey": "topology.kubernetes.io/zone"}}))
    assert zones is not None
    (term,) = zones["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "topology.kubernetes.io/zone"

    # The user's own affinity stays; their own podAntiAffinity replaces the chart's.
    node_affinity = {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference": {}}]}
    merged = pod_affinity(render({"replicaCount": 2, "affinity": {"nodeAffinity": node_affinity}}))
    assert merged == {"nodeAffinity": node_affinity, "podAntiAffinity": SPREAD_OVER_NODES}
    required = {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "kubernetes.io/hostname"}]}
    assert pod_affinity(render({"replicaCount": 2, "affinity": {"podAntiAffinity": required}})) == {
        "podAntiAffinity": required
    }


# --------------------------------------------------------------------------------------------------------------------
# CRDs


def crd_names(docs: list[dict[str, Any]]) -> set[str]:
    return {d["metadata"]["name"] for d in find(docs, "CustomResourceDefinition")}


def test_crds_follow_enabled_keep_and_kopf_peering():
    kept = find(render({"crds": {"enabled": True, "keep": True}}), "CustomResourceDefinition")
    assert set(KOPF_CRDS) <= {c["metadata"]["name"] for c in kept}
    for crd in kept:
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", crd["metadata"]["name"]
        assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == "kl"
    for crd in find(render({"crds": {"enabled": True, "keep": False}}), "CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})
    assert crd_names(render({"crds": {"enabled": False}})) == set()
    assert not crd_names(render({"crds": {"kopfPeering": False}})) & set(KOPF_CRDS)


def test_kopf_peering_crds_match_kopf():
    """kopf patches .status of a peering object directly, so no status subresource and open status."""
    docs = find(render(), "CustomResourceDefinition")
    for name, scope, kind in (
        ("clusterkopfpeerings.kopf.dev", "Cluster", "ClusterKopfPeering"),
        ("kopfpeerings.kopf.dev", "Namespaced", "KopfPeering"),
    ):
        crd = one(docs, "CustomResourceDefinition", name)
        assert crd["spec"]["group"] == "kopf.dev" and crd["spec"]["scope"] == scope
        assert crd["spec"]["names"]["kind"] == kind
        (version,) = crd["spec"]["versions"]
        assert version["name"] == "v1" and version["served"] and version["storage"]
        assert "subresources" not in version
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["x-kubernetes-preserve-unknown-fields"] is True


def test_chart_crds_are_in_sync_with_crds_dir():
    if not source_crds_present():
        pytest.skip("crds/ holds no generated CRDs yet (run `make crds`)")
    result = subprocess.run(
        [sys.executable, str(CHART / "sync-crds.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_rendered_crds_equal_the_generated_ones():
    if not source_crds_present():
        pytest.skip("crds/ holds no generated CRDs yet (run `make crds`)")
    rendered = {d["metadata"]["name"]: d for d in find(render({"crds": {"keep": True}}), "CustomResourceDefinition")}
    for path in sorted(SOURCE_CRDS.glob("*.yaml")):
        for source in yaml.safe_load_all(path.read_text()):
            if not (isinstance(source, dict) and source.get("kind") == "CustomResourceDefinition"):
                continue
            name = source["metadata"]["name"]
            assert name in rendered, f"{name} from {path.name} is not in the chart"
            assert rendered[name]["spec"] == source["spec"], name
            for key, value in (source["metadata"].get("labels") or {}).items():
                assert rendered[name]["metadata"]["labels"][key] == value


def test_sync_script_wraps_escapes_and_prunes(tmp_path):
    source, dest = tmp_path / "crds", tmp_path / "chart-crds"
    source.mkdir()
    dest.mkdir()
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.kubelora.dev"},
        "spec": {"group": "kubelora.dev", "description": "a {{ literal }} brace"},
    }
    (source / "widgets.yaml").write_text(yaml.safe_dump(crd))
    (dest / "hand-written.yaml").write_text("kind: Keep\n")
    (dest / "gone.yaml").write_text("{{- /* Generated by helm/kubelora/sync-crds.py from crds/gone.yaml */ -}}\n")
    script = [sys.executable, str(CHART / "sync-crds.py"), "--source", str(source), "--dest", str(dest)]

    assert subprocess.run([*script, "--check"], capture_output=True, check=False).returncode == 1
    subprocess.run(script, capture_output=True, check=True)
    assert subprocess.run([*script, "--check"], capture_output=True, check=False).returncode == 0
    assert sorted(p.name for p in dest.iterdir()) == ["hand-written.yaml", "widgets.yaml"]
    text = (dest / "widgets.yaml").read_text()
    assert "{{- if .Values.crds.enabled }}" in text and "helm.sh/resource-policy: keep" in text
    assert '{{ "{{" }} literal }}' in text


# --------------------------------------------------------------------------------------------------------------------
# S3 and MinIO


def test_existing_s3_service_and_secret_reach_the_operator():
    docs = render({"s3": {"endpoint": "s3.example.com:443", "region": "eu-west-1", "existingSecret": "s3-creds"}})
    env = {e["name"]: e for e in operator_container(docs)["env"]}
    assert env["S3_ENDPOINT"]["value"] == "s3.example.com:443"
    assert env["S3_REGION"]["value"] == "eu-west-1"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": "accessKey"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": "secretKey"}
    assert find(docs, "Deployment", "kl-kubelora-minio") == []


def test_minio_for_evaluation():
    docs = render(MINIO)
    secret = one(docs, "Secret", "kl-kubelora-minio")
    assert set(secret["data"]) == {"accessKey", "secretKey"}
    one(docs, "PersistentVolumeClaim", "kl-kubelora-minio")
    service = one(docs, "Service", "kl-kubelora-minio")
    assert service["spec"]["ports"][0]["port"] == 9000
    deployment = one(docs, "Deployment", "kl-kubelora-minio")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("quay.io/minio/minio:RELEASE.")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "models" in container["lifecycle"]["postStart"]["exec"]["command"][-1]
    assert service["spec"]["selector"] != one(docs, "Service", "kl-kubelora-metrics")["spec"]["selector"]
    endpoint = "kl-kubelora-minio.kubelora-system.svc:9000"
    assert config_of(docs)["defaultS3Endpoint"] == endpoint
    env = {e["name"]: e for e in operator_container(docs)["env"]}
    assert env["S3_ENDPOINT"]["value"] == endpoint
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "kl-kubelora-minio"

    ephemeral = render({"minio": {"enabled": True, "persistence": {"enabled": False}, "existingSecret": "mine"}})
    assert find(ephemeral, "PersistentVolumeClaim") == [] and find(ephemeral, "Secret") == []
    result = run_helm("template", "kl", str(CHART), *set_args({**MINIO, "s3": {"endpoint": "s3:9000"}}), check=False)
    assert result.returncode != 0 and "either s3.endpoint" in result.stderr


# --------------------------------------------------------------------------------------------------------------------
# Optional objects


def test_metrics_service_and_service_monitor():
    docs = render({"prometheus": {"servicemonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    service = one(docs, "Service", "kl-kubelora-metrics")
    assert service["spec"]["ports"] == [
        {"name": "http-metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    monitor = one(docs, "ServiceMonitor", "kl-kubelora")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "http-metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert find(render(), "ServiceMonitor") == []


def test_network_policy():
    assert find(render(), "NetworkPolicy") == []
    policy = one(render({"networkPolicy": {"enabled": True}}), "NetworkPolicy", "kl-kubelora")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"


def test_operator_flags_exist_in_the_cli():
    """Every flag the Deployment passes is an option of `kubelora operator`."""
    typer = pytest.importorskip("typer")
    cli = pytest.importorskip("kubelora.cli")
    command = typer.main.get_command(cli.app)
    operator = getattr(command, "commands", {}).get("operator")
    assert operator is not None, "`kubelora operator` is not a command of kubelora.cli:app"
    options = {opt for param in operator.params for opt in getattr(param, "opts", [])}
    args = set()
    for values in ({}, NAMESPACED):
        args |= {a.split("=", 1)[0] for a in operator_container(render(values))["args"]}
    assert args <= options, args - options


def test_template_without_cluster_is_deterministic_apart_from_minio_password():
    assert template() == template()
