"""Helpers for the chart tests: the pinned helm binary, rendering, and the chart's CRDs in the cluster."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubelora.devenv import tools
from tests.conftest import REPO, wait_for

CHART = REPO / "helm" / "kubelora"
SOURCE_CRDS = REPO / "crds"
KUBELORA_CRDS = ("lorajobs.kubelora.dev", "adapterdeployments.kubelora.dev")
KOPF_CRDS = ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")

Helm = Callable[..., subprocess.CompletedProcess[str]]


def helm_path() -> Path:
    path = tools.HELM.path()
    if not path.is_file():
        pytest.fail(f"helm is not built at {path}; run `make tools`")
    return path


def run_helm(*args: str, kubeconfig: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(helm_path()), *args]
    if args[0] in ("template", "lint") and "--kube-version" not in args:
        # helm built from source (go install) assumes Kubernetes v1.20 when rendering without a cluster,
        # below the chart's kubeVersion; render for the version the dev cluster runs.
        cmd += ["--kube-version", tools.KUBERNETES_VERSION]
    if kubeconfig is not None:
        cmd += ["--kubeconfig", str(kubeconfig)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def set_args(values: dict[str, Any] | None) -> list[str]:
    """Values as one --set-json per top-level key (exact types, lists and maps included)."""
    args: list[str] = []
    for key, value in (values or {}).items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def template(
    values: dict[str, Any] | None = None,
    *,
    release: str = "kl",
    namespace: str = "kubelora-system",
    extra: tuple[str, ...] = (),
) -> str:
    return run_helm("template", release, str(CHART), "--namespace", namespace, *set_args(values), *extra).stdout


def render(values: dict[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(template(values, **kwargs)) if d]


def find(
    docs: list[dict[str, Any]], kind: str, name: str | None = None, namespace: str | None = None
) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d["kind"] == kind
        and (name is None or d["metadata"]["name"] == name)
        and (namespace is None or d["metadata"].get("namespace") == namespace)
    ]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None, namespace: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''} in {namespace or 'any namespace'}, got {len(found)}"
    return found[0]


def source_crds_present() -> bool:
    """True once `make crds` has written the generated CRDs (placeholder detection)."""
    for path in SOURCE_CRDS.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                return True
    return False


def unique_release(prefix: str = "kl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def chart_crds_in_cluster(devenv: Any) -> Iterator[None]:
    """kubelora's and kopf's CRDs, as the chart renders them, exist and are Established.

    Other tests may own them already (then they are left as they are); missing ones are created
    from the chart, so that custom objects (kopf's peering objects) can be validated.
    """
    from kubelora.devenv import cluster

    if not source_crds_present():
        pytest.skip("crds/ holds no generated CRDs yet (run `make crds`)")
    docs = render({"crds": {"enabled": True, "keep": True, "kopfPeering": True}})
    crds = find(docs, "CustomResourceDefinition")
    names = {c["metadata"]["name"] for c in crds}
    assert set(KUBELORA_CRDS) | set(KOPF_CRDS) <= names, names
    for crd in crds:
        name = crd["metadata"]["name"]
        if cluster.kubectl(devenv, "get", "crd", name, check=False).returncode != 0:
            cluster.kubectl(devenv, "create", "-f", "-", input=json.dumps(crd), check=False)
    for name in sorted(names):
        wait_for(
            f"CRD {name} to be Established",
            lambda name=name: (
                cluster.kubectl(
                    devenv, "wait", "--for=condition=Established", f"crd/{name}", "--timeout=5s", check=False
                ).returncode
                == 0
            ),
            timeout=60,
        )
    yield
