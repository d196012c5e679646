"""Shared fixtures: the real local environment (control plane, kwok GPU nodes, MinIO)."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubelora.devenv import cluster

# Nothing a test starts may read S3 with credentials it inherited: each gets them from a Secret or
# from the test itself, so a broken secretRef path fails a test instead of passing on ambient keys.
for _name in [
    n for n in os.environ if n.startswith(("AWS_", "S3_")) or n.endswith(("_AWS_ACCESS_KEY_ID", "_S3_ENDPOINT"))
]:
    del os.environ[_name]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def wait_for(description: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; fail with the last value or error on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"Timed out after {timeout:.0f}s waiting for {description}; last={last!r}")


@pytest.fixture(scope="session")
def devenv() -> Iterator[cluster.DevEnv]:
    """A running environment: reuse one that is up, else start one and stop it afterwards."""
    env = cluster.load()
    started_here = env is None
    if env is None:
        env = cluster.up()
    os.environ.update({k: v for k, v in env.env().items() if k != "PATH"})
    yield env
    if started_here and not os.environ.get("KUBELORA_KEEP_DEVENV"):
        cluster.down()


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """Every image (operator, agent, trainer, vLLM's CPU build), built from images/ (cached by their inputs)."""
    from kubelora.devenv.images import ensure_images

    return ensure_images()


@pytest.fixture(scope="session")
def api_client(devenv: cluster.DevEnv) -> Iterator[Any]:
    from kubernetes import config

    api_client = config.new_client_from_config(config_file=str(devenv.kubeconfig))
    yield api_client
    api_client.close()


def kubectl_runner(devenv: cluster.DevEnv) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Real kubectl against the dev cluster; a failure is a test failure with kubectl's message."""

    def run(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = cluster.kubectl(devenv, *args, input=input, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    return run


@pytest.fixture
def kubectl(devenv: cluster.DevEnv) -> Callable[..., subprocess.CompletedProcess[str]]:
    return kubectl_runner(devenv)


def scratch_namespace(devenv: cluster.DevEnv) -> Iterator[str]:
    """A fresh namespace for one test, deleted without waiting afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.kubectl(devenv, "create", "namespace", name)
    yield name
    cluster.kubectl(devenv, "delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def namespace(devenv: cluster.DevEnv) -> Iterator[str]:
    yield from scratch_namespace(devenv)


@pytest.fixture
def other_namespace(devenv: cluster.DevEnv) -> Iterator[str]:
    """A second namespace, for a release in one namespace that acts in another (a tenant)."""
    yield from scratch_namespace(devenv)


@pytest.fixture(scope="session")
def minio_client(devenv: cluster.DevEnv) -> Any:
    from minio import Minio

    return Minio(devenv.minio_endpoint, devenv.minio_access_key, devenv.minio_secret_key, secure=False)


@pytest.fixture(scope="session")
def s3_env(devenv: cluster.DevEnv) -> dict[str, str]:
    """MinIO credentials for a trainer process a test starts itself: handed over by name, never inherited."""
    return dict(devenv.s3_env())


@pytest.fixture
def bucket(minio_client: Any) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:12]}"
    minio_client.make_bucket(name)
    yield name
    for obj in minio_client.list_objects(name, recursive=True):
        minio_client.remove_object(name, obj.object_name)
    minio_client.remove_bucket(name)
