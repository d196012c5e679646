"""The release workflow: actionlint-clean, and it publishes what `make images` builds, for two architectures."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubelora.devenv import images, tools
from tests.conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "release.yml"


def actionlint(path: Path) -> subprocess.CompletedProcess[str]:
    if not tools.ACTIONLINT.is_built():
        pytest.skip(f"actionlint is not built ({tools.ACTIONLINT.directory}); `make tools` builds it")
    return subprocess.run(
        [str(tools.ACTIONLINT.path()), "-no-color", str(path)], capture_output=True, text=True, cwd=REPO, check=False
    )


def workflow() -> dict[Any, Any]:
    loaded: dict[Any, Any] = yaml.safe_load(WORKFLOW.read_text())
    return loaded


def test_actionlint_passes() -> None:
    result = actionlint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_would_catch_a_broken_workflow(tmp_path: Path) -> None:
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo ${{ matrix.nope }}\n      - uses: actions/checkout@v4\n        with: {bogus: 1}\n"
    )
    result = actionlint(bad)
    assert result.returncode != 0 and "bogus" in result.stdout, result.stdout


def test_release_runs_on_version_tags_only() -> None:
    # PyYAML reads the key `on` as True.
    triggers = workflow()[True]
    assert triggers == {"push": {"tags": ["v*"]}}


def test_images_are_built_for_two_architectures_and_pushed_to_ghcr() -> None:
    job = workflow()["jobs"]["images"]
    assert job["strategy"]["matrix"]["image"] == list(images.IMAGE_NAMES)
    assert job["permissions"]["packages"] == "write"
    steps = {step.get("uses", "").split("@")[0]: step for step in job["steps"]}
    build = steps["docker/build-push-action"]["with"]
    assert build["file"] == "images/Dockerfile.${{ matrix.image }}"
    assert build["context"] == "."
    assert set(build["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert build["push"] is True
    assert "VERSION=" in build["build-args"] and "BASE_IMAGE" not in build["build-args"]
    meta = steps["docker/metadata-action"]["with"]
    assert meta["images"].startswith("ghcr.io/${{ needs.version.outputs.owner }}/")
    assert "type=semver,pattern={{version}}" in meta["tags"]
    assert "docker/setup-qemu-action" in steps and "docker/setup-buildx-action" in steps


def test_chart_is_pushed_as_an_oci_artifact_with_the_tag_version() -> None:
    job = workflow()["jobs"]["chart"]
    assert "images" in job["needs"]
    script = "\n".join(step.get("run", "") for step in job["steps"])
    assert 'helm package helm/kubelora --version "$VERSION" --app-version "$VERSION"' in script
    assert 'helm push "dist/kubelora-${VERSION}.tgz" "oci://ghcr.io/${OWNER}/charts"' in script
    helm = next(step for step in job["steps"] if step.get("uses", "").startswith("azure/setup-helm"))
    assert helm["with"]["version"] == tools.HELM_VERSION
