"""The self-service API as a real process, under its own ServiceAccount and the chart's RBAC, and its tenants.

``kubelora api`` runs as a subprocess with a kubeconfig that holds only a token of the ServiceAccount
``kubelora-api`` (never the admin's credentials), bound to the ClusterRole the chart renders for
``api.enabled=true``: every call the API makes goes through that RBAC. Tenants are namespaces with the
storage Secret and ServiceAccounts whose tokens the tests hand to the ``openai`` client as API keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubelora.devenv import cluster
from tests.conftest import REPO, kubectl_runner, wait_for
from tests.helm.conftest import one, render
from tests.operator.harness import free_port, install_crds

STORAGE_SECRET = "kubelora-api-storage"
#: The audience the API under test requires (the chart's default api.audience); tenants' tokens are made for it.
AUDIENCE = "kubelora-api"
Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def chart_api_role(storage_secret: str = STORAGE_SECRET) -> dict[str, Any]:
    """The ClusterRole the chart gives the API."""
    docs = render({"api": {"enabled": True, "catalogue": {"storageSecret": storage_secret}}})
    return one(docs, "ClusterRole", "kl-kubelora-api")


def token(kubectl: Kubectl, namespace: str, name: str, audience: str | None = AUDIENCE) -> str:
    """A ServiceAccount token for the API (``--audience``), or with ``audience=None`` one for the API server."""
    args = ["create", "token", name, "-n", namespace, "--duration=2h"]
    if audience is not None:
        args.append(f"--audience={audience}")
    return kubectl(*args).stdout.strip()


def sa_kubeconfig(devenv: cluster.DevEnv, bearer: str, path: Path) -> Path:
    """A kubeconfig with the admin's server and CA but only ``bearer`` as credentials."""
    admin = yaml.safe_load(devenv.kubeconfig.read_text())
    server = admin["clusters"][0]["cluster"]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "dev", "cluster": server}],
                "users": [{"name": "kubelora-api", "user": {"token": bearer}}],
                "contexts": [{"name": "api", "context": {"cluster": "dev", "user": "kubelora-api"}}],
                "current-context": "api",
            }
        )
    )
    path.chmod(0o600)
    return path


@dataclasses.dataclass
class ApiIdentity:
    namespace: str
    role: str
    kubeconfig: Path


@pytest.fixture(scope="session")
def api_identity(devenv: cluster.DevEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiIdentity]:
    """The API's ServiceAccount in its own namespace, bound to the chart's ClusterRole (under a unique name)."""
    kubectl = kubectl_runner(devenv)
    install_crds(devenv)
    suffix = uuid.uuid4().hex[:8]
    namespace, role_name = f"t-ssapi-{suffix}", f"t-kubelora-api-{suffix}"
    kubectl("create", "namespace", namespace)
    role = chart_api_role()
    role["metadata"] = {"name": role_name}
    try:
        kubectl("apply", "-f", "-", input=json.dumps(role))
        kubectl("create", "serviceaccount", "kubelora-api", "-n", namespace)
        kubectl(
            "create", "clusterrolebinding", role_name, f"--clusterrole={role_name}",
            f"--serviceaccount={namespace}:kubelora-api",
        )  # fmt: skip
        path = sa_kubeconfig(
            devenv,
            token(kubectl, namespace, "kubelora-api", audience=None),  # the API's own, for the API server
            tmp_path_factory.mktemp("api") / "kubeconfig",
        )
        yield ApiIdentity(namespace, role_name, path)
    finally:
        kubectl("delete", "clusterrolebinding", role_name, "--wait=false", check=False)
        kubectl("delete", "clusterrole", role_name, "--wait=false", check=False)
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


class ApiProcess:
    """``kubelora api`` in a child process."""

    def __init__(self, identity: ApiIdentity, catalogue: dict[str, Any], workdir: Path) -> None:
        self.identity = identity
        self.catalogue_path = workdir / "catalogue.yaml"
        # Like the chart (api.audience): tenants' tokens are made for the API, not for the API server.
        self.catalogue_path.write_text(yaml.safe_dump({"audience": AUDIENCE, **catalogue}))
        self.log_path = workdir / "api.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        # Nothing inherited: no admin kubeconfig, no S3 keys; only what the command line names.
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        env.update({"PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'trainer'}", "NO_PROXY": "*"})
        command = [sys.executable, "-m", "kubelora.cli", "api", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--catalogue", str(self.catalogue_path), "--kubeconfig", str(self.identity.kubeconfig)]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        wait_for("the API's /healthz", self.healthy, timeout=60)

    def healthy(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"kubelora api exited; log:\n{self.log()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclasses.dataclass
class Tenant:
    namespace: str
    bucket: str
    prefix: str
    users: dict[str, str]  # ServiceAccount name -> token


#: What a tenant's users may do: the verbs the API checks, as a namespace's editors would have them (cancel deletes
#: the training Job).
TENANT_RULES = [
    {"apiGroups": ["kubelora.dev"], "resources": ["lorajobs", "adapterdeployments"], "verbs": ["*"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["delete"]},
]
READER_RULES = [
    {"apiGroups": ["kubelora.dev"], "resources": ["lorajobs", "adapterdeployments"], "verbs": ["get", "list"]},
]


def make_tenant(
    devenv: cluster.DevEnv, kubectl: Kubectl, minio_client: Any, bucket: str, namespace: str | None = None
) -> Tenant:
    """A namespace with its storage Secret, a user ``alice`` (may fine-tune) and ``reader`` (may only read)."""
    namespace = namespace or f"t-sst-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", namespace)
    if not minio_client.bucket_exists(bucket):
        minio_client.make_bucket(bucket)
    prefix = f"tenants/{namespace}/"
    kubectl(
        "create", "secret", "generic", STORAGE_SECRET, "-n", namespace,
        f"--from-literal=accessKey={devenv.minio_access_key}",
        f"--from-literal=secretKey={devenv.minio_secret_key}",
        f"--from-literal=endpoint={devenv.minio_endpoint}",
        f"--from-literal=bucket={bucket}",
        f"--from-literal=prefix={prefix}",
    )  # fmt: skip
    users = {}
    for user, rules in (("alice", TENANT_RULES), ("reader", READER_RULES)):
        kubectl("create", "serviceaccount", user, "-n", namespace)
        role = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": f"fine-tuning-{user}", "namespace": namespace},
            "rules": rules,
        }
        kubectl("apply", "-f", "-", input=json.dumps(role))
        kubectl(
            "create", "rolebinding", f"fine-tuning-{user}", "-n", namespace, f"--role=fine-tuning-{user}",
            f"--serviceaccount={namespace}:{user}",
        )  # fmt: skip
        users[user] = token(kubectl, namespace, user)
    return Tenant(namespace, bucket, prefix, users)


def drop_tenant(kubectl: Kubectl, tenant: Tenant) -> None:
    kubectl("delete", "lorajobs,adapterdeployments", "--all", "-n", tenant.namespace, "--timeout=60s", check=False)
    kubectl("delete", "namespace", tenant.namespace, "--wait=false", check=False)


def empty_bucket(minio_client: Any, bucket: str) -> None:
    for obj in minio_client.list_objects(bucket, recursive=True):
        minio_client.remove_object(bucket, obj.object_name)
    minio_client.remove_bucket(bucket)


def client_for(api: ApiProcess, bearer: str, **kwargs: Any) -> Any:
    """The standard openai client, pointed at the API, with a Kubernetes token as its API key."""
    import openai

    return openai.OpenAI(base_url=api.base_url, api_key=bearer, max_retries=0, timeout=60, **kwargs)


CHAT_ROW = {
    "messages": [
        {"role": "user", "content": "My card was charged twice"},
        {"role": "assistant", "content": "billing"},
    ]
}


def jsonl(rows: list[Any]) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
