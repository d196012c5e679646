"""The chart against the real API server: server-side dry runs, install, RBAC as the operator sees it, uninstall."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubelora.operator import peering
from tests.conftest import REPO, wait_for
from tests.helm.conftest import CHART, KOPF_CRDS, KUBELORA_CRDS, run_helm, set_args, template, unique_release

pytestmark = pytest.mark.e2e


def can_i(
    kubectl,
    namespace: str,
    service_account: str,
    verb: str,
    resource: str,
    *,
    on: str | None = None,
    subresource: str = "",
) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as=system:serviceaccount:{namespace}:{service_account}"]
    if on is not None:
        args += ["-n", on]
    if subresource:
        args.append(f"--subresource={subresource}")
    result = kubectl(*args, check=False)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stdout + result.stderr
    return answer == "yes"


def get_json(kubectl, *args: str) -> dict[str, Any]:
    return dict(json.loads(kubectl("get", *args, "-o", "json").stdout))


def exists(kubectl, *args: str) -> bool:
    return kubectl("get", *args, check=False).returncode == 0


def adopt_crds(kubectl, release: str, namespace: str) -> None:
    """Hand CRDs that already exist (other tests create them) to this release, as Helm requires to install them."""
    for name in (*KUBELORA_CRDS, *KOPF_CRDS):
        if exists(kubectl, "crd", name):
            kubectl("label", "crd", name, "app.kubernetes.io/managed-by=Helm", "--overwrite")
            kubectl(
                "annotate",
                "crd",
                name,
                f"meta.helm.sh/release-name={release}",
                f"meta.helm.sh/release-namespace={namespace}",
                "--overwrite",
            )


# --------------------------------------------------------------------------------------------------------------------
# Server-side dry runs


@pytest.mark.parametrize("mode", ["default", "namespaced", "minio", "replicas"])
def test_server_side_dry_run(mode, kubectl, namespace, other_namespace, chart_crds_in_cluster):
    values: dict[str, Any] = {
        "default": {},
        "namespaced": {"watchNamespaces": [namespace, other_namespace]},
        "minio": {"minio": {"enabled": True}},
        "replicas": {"replicaCount": 2, "strategy": {"type": "RollingUpdate"}},
    }[mode]
    manifest = template(values, release=unique_release(), namespace=namespace)
    kinds = {d["kind"] for d in yaml.safe_load_all(manifest) if d}
    assert {"Deployment", "ServiceAccount", "ConfigMap", "CustomResourceDefinition"} <= kinds
    result = kubectl("apply", "--dry-run=server", "-f", "-", input=manifest, check=False)
    assert result.returncode == 0, result.stderr
    applied = result.stdout.splitlines()
    assert all("(server dry run)" in line for line in applied), result.stdout
    assert any(line.startswith("deployment.apps/") for line in applied)
    # The operator creates its peering objects; the chart has none.
    assert not any("kopfpeering.kopf.dev/" in line for line in applied), result.stdout
    if mode == "namespaced":
        assert sum(line.startswith("role.rbac.authorization.k8s.io/") for line in applied) == 2
    if mode == "minio":
        assert any(line.startswith("persistentvolumeclaim/") for line in applied)
    assert any(line.startswith("poddisruptionbudget.policy/") for line in applied) == (mode == "replicas")


def test_server_rejects_what_the_schema_lets_through(kubectl, namespace, chart_crds_in_cluster):
    """The dry run is a real check: an invalid Kubernetes field in a free-form value fails on the server."""
    manifest = template(
        {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": "x"}}}},
        release=unique_release(),
        namespace=namespace,
    )
    result = kubectl("apply", "--dry-run=server", "-f", "-", input=manifest, check=False)
    assert result.returncode != 0


# --------------------------------------------------------------------------------------------------------------------
# Install, RBAC, uninstall


def helm_install(devenv, release: str, namespace: str, values: dict[str, Any]) -> str:
    result = run_helm(
        "install",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--wait",
        "--timeout",
        "180s",
        *set_args(values),
        kubeconfig=devenv.kubeconfig,
        check=False,
    )
    if result.returncode != 0:
        from kubelora.devenv import cluster

        events = cluster.kubectl(devenv, "get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False)
        run_helm("uninstall", release, "--namespace", namespace, kubeconfig=devenv.kubeconfig, check=False)
        raise AssertionError(
            f"helm install {release} failed:\n{result.stderr}\nEvents in {namespace}:\n{events.stdout}"
        )
    return result.stdout


def helm_uninstall(devenv, release: str, namespace: str) -> None:
    run_helm(
        "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s", kubeconfig=devenv.kubeconfig
    )


def test_install_cluster_mode_then_uninstall_keeps_crds(devenv, kubectl, namespace, chart_crds_in_cluster, tmp_path):
    release = unique_release()
    fullname = f"{release}-kubelora"
    adopt_crds(kubectl, release, namespace)
    notes = helm_install(devenv, release, namespace, {"crds": {"enabled": True, "keep": True}})
    try:
        assert "kubectl get lorajobs" in notes and "-w" in notes
        status = json.loads(
            run_helm("status", release, "-n", namespace, "-o", "json", kubeconfig=devenv.kubeconfig).stdout
        )
        assert status["info"]["status"] == "deployed"

        for name in (*KUBELORA_CRDS, *KOPF_CRDS):
            crd = get_json(kubectl, "crd", name)
            assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == release
            assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

        deployment = get_json(kubectl, "deployment", fullname, "-n", namespace)
        assert deployment["status"].get("readyReplicas") == 1
        pods = get_json(kubectl, "pods", "-n", namespace, "-l", "app.kubernetes.io/component=operator")["items"]
        assert [p["spec"]["nodeName"] for p in pods] == ["cpu-0"], "the operator runs on the CPU node"
        assert exists(kubectl, "serviceaccount", fullname, "-n", namespace)
        assert exists(kubectl, "configmap", fullname, "-n", namespace)
        assert exists(kubectl, "service", f"{fullname}-metrics", "-n", namespace)
        assert exists(kubectl, "clusterrole", fullname)
        assert exists(kubectl, "clusterrolebinding", fullname)
        # The chart leaves the peering object to the operator (no Helm hook for a GitOps sync to re-create).
        assert not exists(kubectl, "clusterkopfpeering", fullname)

        sa = fullname
        assert can_i(kubectl, namespace, sa, "create", "jobs.batch", on=namespace)
        assert can_i(kubectl, namespace, sa, "patch", "lorajobs.kubelora.dev", on=namespace, subresource="status")
        assert can_i(
            kubectl, namespace, sa, "patch", "adapterdeployments.kubelora.dev", on=namespace, subresource="status"
        )
        assert can_i(kubectl, namespace, sa, "create", "deployments.apps", on=namespace)
        assert can_i(kubectl, namespace, sa, "list", "nodes")
        assert can_i(kubectl, namespace, sa, "patch", f"clusterkopfpeerings.kopf.dev/{fullname}")
        assert can_i(kubectl, namespace, sa, "create", "clusterkopfpeerings.kopf.dev")
        assert not can_i(kubectl, namespace, sa, "delete", "clusterkopfpeerings.kopf.dev")
        assert not can_i(kubectl, namespace, sa, "create", "kopfpeerings.kopf.dev", on=namespace)
        assert not can_i(kubectl, namespace, sa, "delete", "nodes")
        assert not can_i(kubectl, namespace, sa, "create", "clusterroles.rbac.authorization.k8s.io")
        assert not can_i(kubectl, namespace, sa, "list", "secrets", on=namespace)
        assert not can_i(kubectl, namespace, sa, "create", "pods", on=namespace)
        assert not can_i(kubectl, namespace, sa, "delete", "lorajobs.kubelora.dev", on=namespace)

        # What the operator does at startup in cluster mode, with the ServiceAccount's own token (running the
        # whole operator cluster-wide would act on other tests' objects).
        api = sa_api_client(devenv, kubectl, namespace, sa, tmp_path)
        try:
            assert peering.ensure(api, fullname, [None]) == {None: "created"}
            assert peering.ensure(api, fullname, [None]) == {None: "exists"}, "a second replica finds it"
        finally:
            api.close()
        created = get_json(kubectl, "clusterkopfpeering", fullname)
        assert created["metadata"]["labels"] == peering.LABELS
    finally:
        helm_uninstall(devenv, release, namespace)

    assert not exists(kubectl, "deployment", fullname, "-n", namespace)
    assert not exists(kubectl, "clusterrole", fullname)
    assert not exists(kubectl, "clusterrolebinding", fullname)
    for name in (*KUBELORA_CRDS, *KOPF_CRDS):
        assert exists(kubectl, "crd", name), f"crds.keep=true, yet {name} is gone"
    kubectl("delete", "clusterkopfpeering", fullname, "--ignore-not-found")


def test_install_namespaced_mode_without_crds(
    devenv, kubectl, namespace, other_namespace, chart_crds_in_cluster, tmp_path
):
    """A second kind of install: the CRDs belong to someone else, the operator watches one other namespace."""
    release = unique_release()
    fullname = f"{release}-kubelora"
    watched = other_namespace
    helm_install(devenv, release, namespace, {"crds": {"enabled": False}, "watchNamespaces": [watched]})
    try:
        for name in KUBELORA_CRDS:
            annotations = get_json(kubectl, "crd", name)["metadata"].get("annotations") or {}
            assert annotations.get("meta.helm.sh/release-name") != release
        assert exists(kubectl, "role", fullname, "-n", watched)
        assert exists(kubectl, "rolebinding", fullname, "-n", watched)
        assert not exists(kubectl, "role", fullname, "-n", namespace)
        assert not exists(kubectl, "kopfpeering", fullname, "-n", watched), "the operator creates it, not the chart"
        assert exists(kubectl, "clusterrole", f"{fullname}-cluster-read")
        assert not exists(kubectl, "clusterrole", fullname)
        wait_for(
            "the operator Deployment to be ready",
            lambda: get_json(kubectl, "deployment", fullname, "-n", namespace)["status"].get("readyReplicas") == 1,
        )

        sa = fullname
        assert can_i(kubectl, namespace, sa, "create", "jobs.batch", on=watched)
        assert can_i(kubectl, namespace, sa, "patch", "lorajobs.kubelora.dev", on=watched, subresource="status")
        assert can_i(kubectl, namespace, sa, "get", "secrets", on=watched)
        assert can_i(kubectl, namespace, sa, "patch", f"kopfpeerings.kopf.dev/{fullname}", on=watched)
        assert can_i(kubectl, namespace, sa, "create", "kopfpeerings.kopf.dev", on=watched)
        assert not can_i(kubectl, namespace, sa, "create", "kopfpeerings.kopf.dev", on=namespace)
        assert not can_i(kubectl, namespace, sa, "create", "clusterkopfpeerings.kopf.dev")
        assert can_i(kubectl, namespace, sa, "list", "nodes")
        assert not can_i(kubectl, namespace, sa, "watch", "nodes"), "preflight lists nodes; nothing watches them"
        assert can_i(kubectl, namespace, sa, "list", "customresourcedefinitions.apiextensions.k8s.io")
        assert not can_i(kubectl, namespace, sa, "get", "secrets", on=namespace), "secrets outside watched namespaces"
        assert not can_i(kubectl, namespace, sa, "get", "secrets", on="default")
        assert not can_i(kubectl, namespace, sa, "create", "jobs.batch", on="default")
        assert not can_i(kubectl, namespace, sa, "list", "lorajobs.kubelora.dev", on="default")
        assert not can_i(kubectl, namespace, sa, "delete", "nodes")
        assert not can_i(kubectl, namespace, sa, "create", "clusterroles.rbac.authorization.k8s.io")
        assert not can_i(kubectl, namespace, sa, "list", "namespaces")

        # Outside the watched namespaces the operator may not create one, and says why instead of idling.
        api = sa_api_client(devenv, kubectl, namespace, sa, tmp_path)
        try:
            with pytest.raises(peering.PeeringError, match=f"KopfPeering {fullname} \\(namespace={namespace}\\): 403"):
                peering.ensure(api, fullname, [namespace])
        finally:
            api.close()
    finally:
        helm_uninstall(devenv, release, namespace)

    assert not exists(kubectl, "role", fullname, "-n", watched)
    assert not exists(kubectl, "clusterrole", f"{fullname}-cluster-read")
    for name in KUBELORA_CRDS:
        assert exists(kubectl, "crd", name), "crds.enabled=false must never touch the CRDs"


# --------------------------------------------------------------------------------------------------------------------
# The real operator under the chart's RBAC


def service_account_kubeconfig(devenv, kubectl, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount, with a short-lived token."""
    token = kubectl("create", "token", service_account, "-n", namespace, "--duration=20m").stdout.strip()
    admin = yaml.safe_load(devenv.kubeconfig.read_text())
    cluster = dict(admin["clusters"][0]["cluster"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "devenv", "cluster": cluster}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "devenv", "user": service_account}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def sa_api_client(devenv, kubectl, namespace: str, service_account: str, tmp_path: Path) -> Any:
    from kubernetes import config

    path = service_account_kubeconfig(devenv, kubectl, namespace, service_account, tmp_path / "sa-kubeconfig")
    return config.new_client_from_config(config_file=str(path))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_operator_stops_when_it_cannot_create_its_peering_object(devenv):
    """Without its peering object kopf would keep the operator paused, silently; it exits and says why instead."""
    missing = unique_release("kl-missing")
    command = [
        sys.executable, "-m", "kubelora.cli", "operator",
        f"--namespace={missing}", "--peering=kl-nowhere", f"--health-port={free_port()}",
    ]  # fmt: skip
    env = {**os.environ, "KUBECONFIG": str(devenv.kubeconfig)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f'Cannot create KopfPeering kl-nowhere (namespace={missing}): 404 namespaces "{missing}" not found' in output


@pytest.mark.slow
def test_operator_runs_under_the_namespaced_rbac(
    devenv, kubectl, namespace, other_namespace, chart_crds_in_cluster, tmp_path
):
    """`kubelora operator` with the chart's ServiceAccount token: peering keep-alives and a LoRAJob, no 403.

    Namespaced mode only: an operator for every namespace would also act on other tests' LoRAJobs.
    """
    release = unique_release()
    fullname = f"{release}-kubelora"
    watched = other_namespace
    example = REPO / "examples" / "lorajob-support-classifier-qlora.yaml"
    name = yaml.safe_load(example.read_text())["metadata"]["name"]
    helm_install(devenv, release, namespace, {"crds": {"enabled": False}, "watchNamespaces": [watched]})
    process: subprocess.Popen[str] | None = None
    log = tmp_path / "operator.log"
    try:
        assert not exists(kubectl, "kopfpeering", fullname, "-n", watched)
        kubeconfig = service_account_kubeconfig(devenv, kubectl, namespace, fullname, tmp_path / "kubeconfig")
        config = tmp_path / "config.yaml"
        config.write_text(get_json(kubectl, "configmap", fullname, "-n", namespace)["data"]["config.yaml"])
        deployment = get_json(kubectl, "deployment", fullname, "-n", namespace)
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert f"--namespace={watched}" in args and f"--peering={fullname}" in args
        args = [a for a in args if not a.startswith(("--config=", "--metrics-port=", "--health-port="))]
        command = [
            sys.executable,
            "-m",
            "kubelora.cli",
            "operator",
            *args,
            f"--config={config}",
            f"--metrics-port={free_port()}",
            f"--health-port={free_port()}",
        ]
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        with log.open("w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, text=True)

        # The operator creates the KopfPeering at startup (the chart has none), and kopf then writes its
        # keep-alive into it: without the object kopf would stay paused and never handle the LoRAJob below.
        wait_for(
            "the operator's keep-alive in the KopfPeering",
            lambda: process.poll() is None and get_json(kubectl, "kopfpeering", fullname, "-n", watched).get("status"),
            timeout=150,
            interval=1,
        )
        assert get_json(kubectl, "kopfpeering", fullname, "-n", watched)["metadata"]["labels"] == peering.LABELS
        kubectl(
            "create",
            "secret",
            "generic",
            "model-store",
            "-n",
            watched,
            "--from-literal=accessKey=a",
            "--from-literal=secretKey=b",
        )
        kubectl("apply", "-n", watched, "-f", str(example))
        wait_for(
            "the operator to report the LoRAJob's phase",
            lambda: (
                process.poll() is None
                and get_json(kubectl, "lorajob", name, "-n", watched).get("status", {}).get("phase")
            ),
            timeout=60,
        )
        # Deleting it while the operator runs lets kopf remove its finalizer.
        kubectl("delete", "lorajob", name, "-n", watched, "--timeout=60s")
        known_fallback = (
            'resource "namespaces"',
            "permissions to list namespaces",
            "permissions to watch for namespaces",
        )
        forbidden = [
            line
            for line in log.read_text().splitlines()
            if ("Forbidden" in line or "forbidden" in line or " 403" in line)
            and not any(known in line for known in known_fallback)
        ]
        assert forbidden == [], "\n".join(forbidden[:5])
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if exists(kubectl, "lorajob", name, "-n", watched):
            kubectl(
                "patch",
                "lorajob",
                name,
                "-n",
                watched,
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )
        helm_uninstall(devenv, release, namespace)
