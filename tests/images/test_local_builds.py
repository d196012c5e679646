"""kubelora.devenv.images without building: build inputs, the build's mounts, and the tools' Go proxy."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from kubelora.devenv import images, tools
from tests.conftest import REPO


def rules(text: str, tmp_path: Path) -> list[tuple[bool, re.Pattern[str], str]]:
    path = tmp_path / "ignore"
    path.write_text(text)
    return images.ignore_rules(path)


def test_dockerignore_semantics(tmp_path: Path) -> None:
    r = rules("*\n!operator\n!README.md\n**/__pycache__\n**/*.pyc\n", tmp_path)
    assert images.is_ignored(".venv/bin/python", r)
    assert not images.is_ignored("README.md", r)
    assert not images.is_ignored("operator/kubelora/cli.py", r)
    assert images.is_ignored("operator/kubelora/__pycache__/cli.cpython-311.pyc", r)
    assert images.is_ignored("operator/x.pyc", r)
    assert images.is_ignored("docs/README.md", r)


@pytest.mark.parametrize("name", images.IMAGE_NAMES)
def test_context_is_what_the_dockerignore_lets_through(name: str) -> None:
    files = images.context_files(name)
    assert {"pyproject.toml", "constraints.txt", "README.md", "operator/kubelora/cli.py"} <= set(files)
    assert "trainer/kubelora/trainer/__main__.py" in files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or ".egg-info" in f]
    assert {f.split("/")[0] for f in files} <= {"pyproject.toml", "constraints.txt", "README.md", "operator", "trainer"}


def test_inputs_hash_follows_the_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed source file, base image or version is a new hash; an untouched checkout is the same."""
    first = images.inputs_hash("agent", "base-a", "0.1.0")
    assert first == images.inputs_hash("agent", "base-a", "0.1.0")
    assert first != images.inputs_hash("agent", "base-b", "0.1.0")
    assert first != images.inputs_hash("agent", "base-a", "0.2.0")
    assert first != images.inputs_hash("operator", "base-a", "0.1.0")
    real = images._file_sha256

    def edited(path: Path) -> str:
        return "edited" if path == REPO / "operator" / "kubelora" / "cli.py" else real(path)

    monkeypatch.setattr(images, "_file_sha256", edited)
    assert first != images.inputs_hash("agent", "base-a", "0.1.0")


def test_refs_follow_the_chart() -> None:
    import yaml

    version = yaml.safe_load((REPO / "helm" / "kubelora" / "Chart.yaml").read_text())["appVersion"]
    assert images.app_version() == version
    assert images.image_ref("trainer") == f"ghcr.io/kubelora/trainer:{version}"
    assert images.BASE_IMAGE_REF == "localhost/kubelora-base:bookworm"
    with pytest.raises(ValueError, match="Unknown image"):
        images.image_ref("vllm")


def test_the_build_mounts_the_host_pip_configuration_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip's effective configuration goes in through mounts under /root and the CA bundle, rewritten."""
    wheels = REPO / "images"  # any existing folder stands in for find-links
    config = {"global": {"cert": str(images.HOST_CA_BUNDLE), "find-links": f"{wheels} https://example.test/w"}}
    config["install"] = {"no-binary": ":none:"}
    monkeypatch.setattr(images, "host_pip_config", lambda: {k: dict(v) for k, v in config.items()})
    monkeypatch.setattr(images, "HOST_CA_BUNDLE", Path("/nonexistent/ca.crt"))
    with images.build_environment(needs_apt=True) as env:
        pip_conf = (env.home.parent / "pip.conf").read_text()
        volumes = env.volumes
    assert volumes[0].endswith(":/root") and volumes[1].endswith(":/root/.config/pip/pip.conf:ro")
    assert f"{wheels}:/root/.kubelora-host/1-images:ro" in volumes
    assert "find-links = /root/.kubelora-host/1-images https://example.test/w" in pip_conf
    assert "[install]\nno-binary = :none:" in pip_conf
    if Path(config["global"]["cert"]).is_file():
        assert f"{config['global']['cert']}:{images.IMAGE_CA_BUNDLE}:ro" in volumes
        assert f"cert = {images.IMAGE_CA_BUNDLE}" in pip_conf
    for path in images.APT_PATHS:
        assert (f"{path}:{path}:ro" in volumes) == Path(path).exists()
    assert all(v.endswith(":ro") for v in volumes[1:])


def test_host_pip_config_puts_environment_settings_in_global(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "77")
    config = images.host_pip_config()
    assert config["global"]["default-timeout"] == "77"


@pytest.mark.parametrize("proxy", ["off", "direct", "off|direct"])
def test_tools_need_an_http_go_proxy(proxy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOPROXY", proxy)
    with pytest.raises(RuntimeError, match="names no HTTP\\(S\\) Go module proxy"):
        tools.go_proxy()


def test_tools_use_the_go_proxy_go_is_configured_with(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOPROXY", "direct,https://go-mirror.example.test/mirror/|off")
    assert tools.go_proxy() == "https://go-mirror.example.test/mirror"
    monkeypatch.delenv("GOPROXY")
    configured = subprocess.run(
        ["go", "env", "GOPROXY"], capture_output=True, text=True, check=True, env=tools._go_env()
    ).stdout.strip()
    assert tools.go_proxy() in [entry.strip().rstrip("/") for entry in re.split(r"[,|]", configured)]
