"""The production path: images built from images/, pods that run them, the operator's Job path.

Every test here trains with the trainer image from its own entrypoint, in a pod of a Job that the
operator created, on a kwok GPU node; ``kubelora.devenv.podrunner`` plays the kubelet for it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubelora.devenv import cluster
from tests.helm.conftest import chart_crds_in_cluster  # noqa: F401 - the fixture, for the chart-operator test
from tests.operator.harness import OperatorProcess, create_s3_secret, install_crds


@pytest.fixture(scope="module")
def crds(devenv: cluster.DevEnv) -> None:
    install_crds(devenv)


@pytest.fixture
def kubelet(devenv: cluster.DevEnv, namespace: str, tmp_path: Path, images: dict[str, str]) -> Iterator[Any]:
    """Runs the containers of this namespace's pods from their images, as a kubelet would."""
    from kubelora.devenv import podrunner

    runner = podrunner.image_runner(devenv, tmp_path / "pods", namespace=namespace)
    runner.start()
    yield runner
    runner.stop()


@pytest.fixture
def operator(
    devenv: cluster.DevEnv, crds: None, namespace: str, tmp_path: Path, kubectl: Any, images: dict[str, str]
) -> Iterator[OperatorProcess]:
    create_s3_secret(kubectl, namespace, devenv)
    proc = OperatorProcess(devenv, namespace, tmp_path, trainerImage=images["trainer"])
    proc.start()
    yield proc
    proc.kill(signal.SIGTERM)
