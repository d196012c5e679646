"""The images, built for real with buildah from images/Dockerfile.*, and run from their own entrypoints.

``ensure_images`` builds the local Debian base and the three images (a cold build takes minutes:
the trainer installs torch; a warm one seconds). Each image then runs as ``buildah run --isolation
chroot`` with the user, entrypoint, environment and working directory its config names: the
operator prints its usage, the agent answers /health, and the trainer trains the tiny model on
the CPU and writes an adapter whose manifest digests the test recomputes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubelora.devenv import images
from tests.trainer.helpers import make_spec

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(5400)]


@pytest.fixture(scope="session")
def built() -> dict[str, str]:
    """name -> local ref, built (or found up to date) through the module's public API."""
    return images.ensure_images()


def config_of(ref: str) -> dict[str, Any]:
    info = images.inspect_image(ref)
    assert info is not None, f"no local image {ref}"
    return images.image_config(info)


@contextlib.contextmanager
def working_container(ref: str) -> Iterator[str]:
    container = subprocess.run(
        ["buildah", "from", "--pull=never", ref], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield container
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False)


@contextlib.contextmanager
def mounted(ref: str) -> Iterator[Path]:
    """The image's root filesystem, read through a throwaway working container."""
    with working_container(ref) as container:
        root = subprocess.run(["buildah", "mount", container], capture_output=True, text=True, check=True)
        try:
            yield Path(root.stdout.strip())
        finally:
            subprocess.run(["buildah", "umount", container], capture_output=True, check=False)


def run_command(
    container: str,
    config: dict[str, Any],
    args: list[str] | None = None,
    volumes: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> list[str]:
    """``buildah run`` of the image's ENTRYPOINT (+ args, else CMD) as the image's USER."""
    command = [*(config.get("Entrypoint") or []), *(args if args is not None else config.get("Cmd") or [])]
    cmd = ["buildah", "run", "--isolation", "chroot", "--user", config["User"]]
    if config.get("WorkingDir"):
        cmd += ["--workingdir", config["WorkingDir"]]
    for volume in volumes:
        cmd += ["--volume", volume]
    for key, value in (env or {}).items():
        cmd += ["--env", f"{key}={value}"]
    return [*cmd, container, "--", *command]


@pytest.mark.parametrize("name", images.IMAGE_NAMES)
def test_images_are_tagged_as_the_chart_names_them(built: dict[str, str], name: str) -> None:
    chart = yaml.safe_load(images.CHART.read_text())
    assert built[name] == f"ghcr.io/kubelora/{name}:{chart['appVersion']}"
    config = config_of(built[name])
    assert config["User"] == "65532:65532"
    base = images.inspect_image(images.BASE_IMAGE_REF)
    assert base is not None
    expected = images.inputs_hash(name, images.image_id(base), chart["appVersion"])
    assert config["Labels"][images.INPUTS_LABEL] == expected
    assert config["Labels"]["org.opencontainers.image.version"] == chart["appVersion"]


def test_a_warm_build_is_a_cache_hit(built: dict[str, str]) -> None:
    images.build_images()  # whatever others changed in the checkout since the fixture built
    started = time.monotonic()
    results = images.build_images()
    assert all(r.cached for r in results), [(r.name, r.cached) for r in results]
    assert {r.name: r.ref for r in results} == built
    assert time.monotonic() - started < 60


def host_pip_config_files() -> list[Path]:
    """The pip configuration files ``pip config debug`` lists as existing on this host."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "debug"], capture_output=True, text=True, check=False
    ).stdout
    found = []
    for line in out.splitlines():
        line = line.strip()
        if line.endswith("exists: True"):
            found.append(Path(line.split(",")[0]))
    return found


@pytest.mark.parametrize("name", images.ALL_IMAGE_NAMES)
def test_no_layer_keeps_the_build_configuration(built: dict[str, str], name: str) -> None:
    """pip's config, the CA bundle, apt sources and pip's cache were mounted, never copied."""
    with mounted(images.BASE_IMAGE_REF) as base, mounted(built[name]) as root:
        for path in [*host_pip_config_files(), Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf")]:
            assert not (root / path.relative_to("/")).exists(), path
        for leftover in (".cache", ".config", ".kubelora-host"):
            assert not (root / "root" / leftover).exists(), f"/root/{leftover}"
        assert not (root / "opt" / "wheels").exists()
        # The CA bundle is the base's own, not the host's that the build had mounted over it.
        bundle = images.IMAGE_CA_BUNDLE.lstrip("/")
        assert (root / bundle).read_bytes() == (base / bundle).read_bytes()
        for folder in ("etc/apt/sources.list.d", "etc/apt/apt.conf.d"):
            assert sorted(p.name for p in (root / folder).iterdir()) == sorted(
                p.name for p in (base / folder).iterdir()
            )
        assert not list((root / "opt" / "venv").rglob("pip.conf"))


def test_vllm_cpu_image_is_the_pinned_vllm(built: dict[str, str]) -> None:
    from kubelora.serving import vllm

    assert built["vllm-cpu"] == vllm.VLLM_CPU_IMAGE
    config = config_of(built["vllm-cpu"])
    assert config["Entrypoint"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert config["User"] == "65532:65532"
    assert config["Labels"]["org.opencontainers.image.version"] == vllm.VLLM_VERSION
    script = "import importlib.metadata as m; print(m.version('vllm-cpu'), m.version('torch'))"
    with working_container(built["vllm-cpu"]) as container:
        cmd = run_command(container, {**config, "Entrypoint": None}, ["python", "-c", script])
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [vllm.VLLM_VERSION, "2.13.0"]


def test_operator_prints_its_usage(built: dict[str, str]) -> None:
    config = config_of(built["operator"])
    assert config["Entrypoint"] == ["kubelora", "operator"]
    with working_container(built["operator"]) as container:
        result = subprocess.run(
            run_command(container, config, ["--help"]), capture_output=True, text=True, timeout=120, check=False
        )
    assert result.returncode == 0, result.stderr
    assert "Usage: kubelora operator" in result.stdout
    assert "--all-namespaces" in result.stdout and "--health-port" in result.stdout


def free_loopback() -> tuple[str, int]:
    host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(1, 254)}"
    with socket.socket() as probe:
        probe.bind((host, 0))
        return host, probe.getsockname()[1]


def test_agent_answers_health(built: dict[str, str], tmp_path: Path) -> None:
    config = config_of(built["agent"])
    assert config["Entrypoint"] == ["python", "-m", "kubelora.serving.agent"]
    assert config["Cmd"] == ["--host", "0.0.0.0", "--port", "8001", "--dir", "/adapters"]
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    os.chown(adapters, 65532, 65532)
    host, port = free_loopback()
    log = tmp_path / "agent.log"
    with working_container(built["agent"]) as container, log.open("w") as out:
        cmd = run_command(
            container,
            config,
            ["--host", host, "--port", str(port), "--dir", "/adapters"],
            (f"{adapters}:/adapters",),
            {"KUBELORA_AGENT_TOKEN": "image-test-token"},
        )
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            body = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as response:
                        assert response.status == 200
                        body = response.read()
                        break
                except OSError:
                    time.sleep(0.3)
            assert body is not None, f"no /health answer; rc={proc.poll()}\n{log.read_text()[-3000:]}"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        pytest.fail("the agent still listens after being stopped")


def test_trainer_trains_the_tiny_model_on_the_cpu(built: dict[str, str], tmp_path: Path) -> None:
    from kubelora.trainer import tiny

    config = config_of(built["trainer"])
    assert config["Entrypoint"] == ["python", "-m", "kubelora.trainer"]
    job = tmp_path / "job"
    tiny.build_tiny_model(job / "model")
    task = tiny.write_task(job / "data", n_train=200, n_test=16, n_regression=8)
    spec = make_spec(
        base="file:///job/model",
        train=f"file:///job/data/{task['train'].name}",
        output="file:///job/out",
        max_steps=30,
        checkpoint_every=15,
    )
    (job / "spec.yaml").write_text(yaml.safe_dump(spec))
    for path in [job, *job.rglob("*")]:
        os.chown(path, 65532, 65532)
    with working_container(built["trainer"]) as container:
        cmd = run_command(
            container,
            config,
            ["--spec", "/job/spec.yaml", "--report-file", "/job/report.jsonl", "--workdir", "/workspace/run"],
            (f"{job}:/job",),
            {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "KUBELORA_PROGRESS_INTERVAL": "0.5"},
        )
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    events = [json.loads(line) for line in (job / "report.jsonl").read_text().splitlines() if line.strip()]
    final = [e for e in events if e["type"] == "result"][-1]
    assert final["training"]["steps"] == 30
    hex_digest = final["adapter"]["digest"].removeprefix("sha256:")
    assert final["adapter"]["uri"] == f"file:///job/out/sha256/{hex_digest}/"
    out = job / "out" / "sha256" / hex_digest
    raw = (out / "kubelora-manifest.json").read_bytes()
    assert hex_digest == hashlib.sha256(raw).hexdigest()
    assert json.loads((job / "out" / "kubelora-latest.json").read_text())["digest"] == final["adapter"]["digest"]
    manifest = json.loads(raw)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {f["path"] for f in manifest["files"]}
    for entry in manifest["files"]:
        data = (out / entry["path"]).read_bytes()
        assert len(data) == entry["sizeBytes"], entry["path"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
    # Written by the image's user, not root.
    assert (out / "adapter_model.safetensors").stat().st_uid == 65532
    shutil.rmtree(job, ignore_errors=True)
