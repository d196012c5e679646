"""Build the kubelora container images on this machine with buildah, from ``images/Dockerfile.*``.

There is no Docker engine here, and no registry to pull ``python:3.11-slim-bookworm`` from, so:

1. ``mmdebstrap`` bootstraps a Debian bookworm root filesystem with python3, python3-venv and
   ca-certificates (cached as a tarball under ``$XDG_CACHE_HOME/kubelora/images``), which
   ``buildah`` commits as :data:`BASE_IMAGE_REF`.
2. ``buildah bud --isolation chroot`` builds the same Dockerfiles users build with Docker, with
   ``--build-arg BASE_IMAGE=`` that base, and tags them as the Helm chart's defaults name them
   (``ghcr.io/kubelora/<name>:<appVersion>``).

``pip`` inside the build reaches the package index the way the host's ``pip`` is configured: the
effective ``pip config list`` (files and ``PIP_*`` variables) is mounted read-only as
``/root/.config/pip/pip.conf`` inside a throwaway directory mounted over the build's ``/root``, and
the host's CA bundle read-only over the base's ``/etc/ssl/certs/ca-certificates.crt``. Only bind
mounts onto paths the base already has (buildah would leave an empty file or directory in a layer
for a mount target it had to create), so nothing of the host's configuration lands in a layer.
``apt-get`` steps, if a Dockerfile has any, get the host's apt sources and configuration the same way.

Each image carries a hash of its inputs (Dockerfile, the context files its ``.dockerignore`` lets
through, build arguments and the base image id) in the label :data:`INPUTS_LABEL`; an image whose
label matches is not rebuilt, so a warm ``make images`` takes well under a second. ``buildah
--layers`` keeps the dependency layers (torch and friends) across source changes; pip's own cache
(``RUN --mount=type=cache``) only helps where the package index sends cache headers.

    python -m kubelora.devenv.images build [--force] [--push REGISTRY] [operator agent trainer]
    python -m kubelora.devenv.images push REGISTRY [--tls-verify=false] [names...]
    python -m kubelora.devenv.images refs
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from kubelora.devenv.tools import cache_root
from kubelora.serving.vllm import VLLM_CPU_IMAGE, VLLM_VERSION

REPO = Path(__file__).resolve().parents[3]
IMAGES_DIR = REPO / "images"
CHART = REPO / "helm" / "kubelora" / "Chart.yaml"

#: The images kubelora releases (the chart's defaults, pushed by the release workflow).
IMAGE_NAMES: tuple[str, ...] = ("operator", "agent", "trainer")
#: Images only the dev cluster runs, never pushed: vLLM's CPU build for the serving pods (this machine
#: has no GPU; a GPU cluster runs vllm/vllm-openai at the same version).
DEV_IMAGE_NAMES: tuple[str, ...] = ("vllm-cpu",)
ALL_IMAGE_NAMES: tuple[str, ...] = IMAGE_NAMES + DEV_IMAGE_NAMES
# Where the chart's defaults look for the images (values.yaml image.repository and friends).
IMAGE_REPOSITORY = "ghcr.io/kubelora"
BASE_SUITE = "bookworm"
BASE_IMAGE_REF = f"localhost/kubelora-base:{BASE_SUITE}"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Documentation, man pages and translations are of no use in an image.
BASE_DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# Set it to a mirror URL or a sources.list file for mmdebstrap; unset, mmdebstrap's default.
BASE_MIRROR_ENV = "KUBELORA_BASE_MIRROR"
INPUTS_LABEL = "dev.kubelora.inputs"
# Bump when the way the base or the images are built changes, so the cached ones are rebuilt once.
BASE_RECIPE_VERSION = "1"
RECIPE_VERSION = "2"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Where the base image keeps its CA bundle (ca-certificates): the host's is mounted over it.
IMAGE_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
APT_PATHS = (
    "/etc/apt/sources.list",
    "/etc/apt/sources.list.d",
    "/etc/apt/apt.conf.d",
    "/etc/apt/auth.conf.d",
    "/etc/apt/keyrings",
    "/etc/apt/trusted.gpg.d",
)
HEARTBEAT_SECONDS = 60.0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def images_cache() -> Path:
    return cache_root() / "images"


def log_path(name: str) -> Path:
    return cache_root() / "logs" / f"image-{name}.log"


def app_version() -> str:
    """The chart's ``appVersion``: the tag the chart's image defaults use."""
    chart = yaml.safe_load(CHART.read_text())
    return str(chart["appVersion"])


def image_ref(name: str, version: str | None = None) -> str:
    if name == "vllm-cpu":
        return VLLM_CPU_IMAGE
    if name not in IMAGE_NAMES:
        raise ValueError(f"Unknown image {name!r}; the images are {', '.join(ALL_IMAGE_NAMES)}")
    return f"{IMAGE_REPOSITORY}/{name}:{version or app_version()}"


def dockerfile(name: str) -> Path:
    return IMAGES_DIR / f"Dockerfile.{name}"


def require_build_tools() -> None:
    missing = [tool for tool in ("buildah", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"{' and '.join(missing)} not found: `make images` installs them "
            "(apt-get install buildah mmdebstrap, as root)"
        )
    if not IMAGES_DIR.is_dir():
        raise RuntimeError(f"No {IMAGES_DIR}: build the images from a kubelora checkout")


# --- running commands ------------------------------------------------------------------------


def _buildah(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["buildah", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _run_logged(cmd: list[str], log: Path, what: str, cwd: Path | None = None, verb: str = "building") -> None:
    """Run a long step into its log, saying every minute that it is still going."""
    started = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    proc.wait(timeout=HEARTBEAT_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    _say(f"Still {verb} {what} elapsed={time.monotonic() - started:.0f}s log={log}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{verb.capitalize()} {what} failed ({proc.returncode}); log={log}\n{tail}")


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """One image build at a time on this machine (make images and the tests may overlap)."""
    images_cache().mkdir(parents=True, exist_ok=True)
    with (images_cache() / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say("Waiting for another image build on this machine to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- local images ----------------------------------------------------------------------------


def inspect_image(ref: str) -> dict[str, Any] | None:
    """``buildah inspect`` of a local image, or None when there is none."""
    result = _buildah("inspect", "--type", "image", ref, check=False)
    if result.returncode != 0:
        return None
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def image_config(info: dict[str, Any]) -> dict[str, Any]:
    """The OCI config (Entrypoint, Cmd, User, Env, WorkingDir, Labels) of an inspected image."""
    config: dict[str, Any] = (info.get("OCIv1") or {}).get("config") or {}
    return config


def image_id(info: dict[str, Any]) -> str:
    return str(info["FromImageID"])


def image_size(info: dict[str, Any]) -> int:
    """Bytes of all layers (uncompressed, as stored locally)."""
    manifest = json.loads(info.get("Manifest") or "{}")
    return sum(int(layer.get("size", 0)) for layer in manifest.get("layers", []))


def _label(info: dict[str, Any] | None) -> str | None:
    if info is None:
        return None
    labels = image_config(info).get("Labels") or {}
    value = labels.get(INPUTS_LABEL)
    return str(value) if value is not None else None


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit in ("B", "KB") else f"{value:.2f} {unit}"
        value /= 1000
    return f"{value:.2f} GB"


# --- the base image --------------------------------------------------------------------------


def _base_recipe() -> dict[str, Any]:
    return {
        "recipe": BASE_RECIPE_VERSION,
        "suite": BASE_SUITE,
        "variant": "minbase",
        "packages": list(BASE_PACKAGES),
        "dpkg": list(BASE_DPKG_OPTIONS),
        "mirror": os.environ.get(BASE_MIRROR_ENV, ""),
        "env": BASE_ENV,
    }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def base_tarball() -> Path:
    return images_cache() / f"base-{BASE_SUITE}-{_digest(_base_recipe())[:12]}.tar"


def _bootstrap_base(tarball: Path) -> None:
    """mmdebstrap the base root filesystem into ``tarball`` (atomically), with its sha256 beside it."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    log = log_path("base")
    log.write_text("")
    partial = tarball.with_suffix(".partial.tar")
    partial.unlink(missing_ok=True)
    cmd = [
        "mmdebstrap",
        "--variant=minbase",
        f"--include={','.join(BASE_PACKAGES)}",
        *(f"--dpkgopt={option}" for option in BASE_DPKG_OPTIONS),
        BASE_SUITE,
        str(partial),
    ]
    mirror = os.environ.get(BASE_MIRROR_ENV)
    if mirror:
        cmd.append(mirror)
    _say(f"[base] mmdebstrap {BASE_SUITE} with {', '.join(BASE_PACKAGES)} (about a minute) log={log}")
    started = time.monotonic()
    _run_logged(cmd, log, f"image=base ({BASE_SUITE} root filesystem)")
    tarball.with_suffix(".sha256").write_text(_file_sha256(partial) + "\n")
    partial.rename(tarball)
    _say(f"[base] {tarball} seconds={time.monotonic() - started:.1f}")


def ensure_base(*, force: bool = False) -> str:
    """Bootstrap (cached) and commit :data:`BASE_IMAGE_REF`; returns its image id."""
    require_build_tools()
    tarball = base_tarball()
    if force or not tarball.is_file() or not tarball.with_suffix(".sha256").is_file():
        _bootstrap_base(tarball)
    inputs = _digest({"recipe": _base_recipe(), "tarball": tarball.with_suffix(".sha256").read_text().strip()})
    info = inspect_image(BASE_IMAGE_REF)
    if info is not None and _label(info) == inputs and not force:
        return image_id(info)
    started = time.monotonic()
    _say(f"[base] committing {BASE_IMAGE_REF} from {tarball.name}")
    container = _buildah("from", "scratch").stdout.strip()
    try:
        mount = _buildah("mount", container).stdout.strip()
        try:
            subprocess.run(["tar", "-C", mount, "--numeric-owner", "-xf", str(tarball)], check=True)
        finally:
            _buildah("umount", container)
        config = ["config", "--label", f"{INPUTS_LABEL}={inputs}", "--cmd", "/bin/bash"]
        for key, value in BASE_ENV.items():
            config += ["--env", f"{key}={value}"]
        _buildah(*config, container)
        _buildah("commit", "--quiet", "--rm", container, BASE_IMAGE_REF)
        container = ""
    finally:
        if container:
            _buildah("rm", container, check=False)
    info = inspect_image(BASE_IMAGE_REF)
    assert info is not None
    _say(f"[base] {BASE_IMAGE_REF} ready seconds={time.monotonic() - started:.1f}")
    return image_id(info)


# --- build inputs ----------------------------------------------------------------------------


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex over a relative path."""
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex + r"\Z")


def ignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str], str]]:
    """(negated, regex, pattern) per line of a .dockerignore file."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).strip("/")
        rules.append((negated, _compile_pattern(pattern), pattern))
    return rules


def is_ignored(relative: str, rules: Sequence[tuple[bool, re.Pattern[str], str]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for negated, regex, _ in rules:
        if any(regex.match(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def context_files(name: str) -> list[str]:
    """The repository files the image's .dockerignore lets into the build context, sorted."""
    rules = ignore_rules(IMAGES_DIR / f"Dockerfile.{name}.dockerignore")
    reincluded_tops = [pattern.split("/")[0] for negated, _, pattern in rules if negated]
    found = []
    for root, dirs, files in os.walk(REPO):
        base = Path(root).relative_to(REPO).as_posix()
        prefix = "" if base == "." else f"{base}/"
        kept = []
        for d in sorted(dirs):
            rel = prefix + d
            top = rel.split("/")[0]
            if is_ignored(rel, rules) and not any(_compile_pattern(t).match(top) for t in reincluded_tops):
                continue  # nothing below can come back in
            kept.append(d)
        dirs[:] = kept
        found += [prefix + f for f in files if not is_ignored(prefix + f, rules)]
    return sorted(found)


def build_args(version: str, name: str = "") -> dict[str, str]:
    if name == "vllm-cpu":
        return {"BASE_IMAGE": BASE_IMAGE_REF, "VLLM_VERSION": VLLM_VERSION}
    return {"BASE_IMAGE": BASE_IMAGE_REF, "VERSION": version}


def inputs_hash(name: str, base_id: str, version: str) -> str:
    """What the image is built from: recipe, Dockerfile, .dockerignore, context files, args, base."""
    digest = hashlib.sha256()
    ignore = IMAGES_DIR / f"Dockerfile.{name}.dockerignore"
    digest.update(
        json.dumps(
            {
                "recipe": RECIPE_VERSION,
                "name": name,
                "dockerfile": hashlib.sha256(dockerfile(name).read_bytes()).hexdigest(),
                "dockerignore": hashlib.sha256(ignore.read_bytes()).hexdigest(),
                "args": build_args(version, name),
                "base": base_id,
            },
            sort_keys=True,
        ).encode()
    )
    for rel in context_files(name):
        path = REPO / rel
        digest.update(f"\0{rel}\0{path.stat().st_mode & 0o111:o}\0{_file_sha256(path)}".encode())
    return digest.hexdigest()


# --- the build environment: how pip and apt inside a build reach their registries ---------------


def host_pip_config() -> dict[str, dict[str, str]]:
    """The host's effective pip configuration (files, then ``PIP_*`` variables), by section."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    file_level: dict[str, dict[str, str]] = {}
    env_level: dict[str, str] = {}
    for line in result.stdout.splitlines():
        name, sep, raw = line.partition("=")
        if not sep or "." not in name:
            continue
        section, _, key = name.partition(".")
        try:
            value = str(ast.literal_eval(raw))
        except (SyntaxError, ValueError):
            value = raw.strip("'\"")
        if section == ":env:":
            env_level[key] = value
        else:
            file_level.setdefault(section, {})[key] = value
    file_level.setdefault("global", {}).update(env_level)
    return file_level


@dataclasses.dataclass
class BuildEnvironment:
    """Read-only bind mounts (``-v``) for ``buildah bud``; none of them lands in a layer."""

    volumes: list[str]
    home: Path


@contextlib.contextmanager
def build_environment(needs_apt: bool) -> Iterator[BuildEnvironment]:
    """A throwaway ``/root`` with the host's pip configuration, plus the CA bundle and apt config.

    The pip configuration is rewritten to name in-container paths: the CA bundle where the base
    keeps its own, local ``find-links`` folders and other host files under ``/root``.
    """
    with tempfile.TemporaryDirectory(prefix="kubelora-build-") as tmp:
        home = Path(tmp) / "root"
        home.mkdir()
        volumes: list[str] = []
        config = host_pip_config()
        cert = config.get("global", {}).get("cert")
        ca = Path(cert) if cert and Path(cert).is_file() else HOST_CA_BUNDLE
        if ca.is_file():
            volumes.append(f"{ca}:{IMAGE_CA_BUNDLE}:ro")
            if cert:
                config["global"]["cert"] = IMAGE_CA_BUNDLE
        mounted = 0
        for section in config.values():
            for key, value in section.items():
                if key == "cert":
                    continue
                rewritten = []
                for item in value.split():
                    local = Path(item.removeprefix("file://"))
                    if item.startswith(("/", "file:///")) and local.exists():
                        mounted += 1
                        target = f"/root/.kubelora-host/{mounted}-{local.name}"
                        volumes.append(f"{local}:{target}:ro")
                        rewritten.append(target)
                    elif not item.startswith(("/", "file:///")):
                        rewritten.append(item)
                    # else: a local path that is not there has nothing to offer the build
                section[key] = " ".join(rewritten)
        pip_conf = Path(tmp) / "pip.conf"
        lines = []
        for section_name, values in config.items():
            lines.append(f"[{section_name}]")
            lines += [f"{key} = {value}" for key, value in values.items() if value != ""]
        pip_conf.write_text("\n".join(lines) + "\n")
        pip_conf.chmod(0o600)
        # The throwaway home goes over the image's /root first (buildah sorts mounts by path), so
        # the targets of the mounts under /root, and anything a build step writes to ~, are
        # created in it rather than in a layer.
        volumes[:0] = [f"{home}:/root", f"{pip_conf}:/root/.config/pip/pip.conf:ro"]
        if needs_apt:
            volumes += [f"{p}:{p}:ro" for p in APT_PATHS if Path(p).exists()]
        yield BuildEnvironment(volumes, home)


# --- building --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageResult:
    name: str
    ref: str
    image_id: str
    size_bytes: int
    seconds: float
    cached: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "id": self.image_id,
            "sizeBytes": self.size_bytes,
            "size": _human(self.size_bytes),
            "seconds": round(self.seconds, 1),
            "cached": self.cached,
        }


def _build_one(name: str, base_id: str, version: str, force: bool) -> ImageResult:
    started = time.monotonic()
    ref = image_ref(name, version)
    inputs = inputs_hash(name, base_id, version)
    existing = inspect_image(ref)
    if existing is not None and _label(existing) == inputs and not force:
        return ImageResult(name, ref, image_id(existing), image_size(existing), time.monotonic() - started, cached=True)
    log = log_path(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    text = dockerfile(name).read_text()
    with build_environment(needs_apt="apt-get" in text) as env:
        cmd = [
            "buildah",
            "bud",
            "--isolation",
            "chroot",
            "--layers",
            "--pull=never",
            # Docker's image format: OCI's has no SHELL, and buildah would run RUN steps without
            # the Dockerfiles' `bash -o pipefail`.
            "--format",
            "docker",
            "--file",
            str(dockerfile(name)),
            "--ignorefile",
            str(IMAGES_DIR / f"Dockerfile.{name}.dockerignore"),
            "--label",
            f"{INPUTS_LABEL}={inputs}",
            "--tag",
            ref,
        ]
        for key, value in build_args(version, name).items():
            cmd += ["--build-arg", f"{key}={value}"]
        for volume in env.volumes:
            cmd += ["--volume", volume]
        # No --no-cache with force: the re-bootstrapped base has a new id, which no cached layer
        # matches, and the three images keep sharing the cached steps they have in common.
        cmd.append(str(REPO))
        _run_logged(cmd, log, f"image={name}", cwd=REPO)
    info = inspect_image(ref)
    if info is None:
        raise RuntimeError(f"buildah reported success but there is no {ref} (log={log})")
    if _label(info) != inputs:
        raise RuntimeError(f"{ref} came out without label {INPUTS_LABEL}={inputs} (log={log})")
    if existing is not None and image_id(existing) != image_id(info):
        # The previous build of this tag, now untagged; layers other images share stay.
        _buildah("rmi", image_id(existing), check=False)
    return ImageResult(name, ref, image_id(info), image_size(info), time.monotonic() - started, cached=False)


def build_images(names: Iterable[str] = ALL_IMAGE_NAMES, *, force: bool = False) -> list[ImageResult]:
    """Build the base image and the named images where their inputs changed; report each."""
    selected = list(names)
    for name in selected:
        image_ref(name)  # a clear error for an unknown name
    require_build_tools()
    version = app_version()
    results = []
    with _lock():
        base_id = ensure_base(force=force)
        for index, name in enumerate(selected, 1):
            heavy = name in ("trainer", "vllm-cpu")
            cold = "a cold build installs torch, several GB" if heavy else "about a minute cold"
            _say(f"[{index}/{len(selected)}] {image_ref(name, version)}: checking inputs ({cold}) log={log_path(name)}")
            result = _build_one(name, base_id, version, force)
            state = "cached" if result.cached else "built"
            _say(
                f"[{index}/{len(selected)}] {name}: {state} size={_human(result.size_bytes)} "
                f"seconds={result.seconds:.1f}"
            )
            results.append(result)
    return results


def ensure_images(names: Iterable[str] = ALL_IMAGE_NAMES) -> dict[str, str]:
    """Local refs of the named images (name -> ref), building those whose inputs changed."""
    return {result.name: result.ref for result in build_images(names)}


def push_images(registry: str, names: Iterable[str] = IMAGE_NAMES, *, tls_verify: bool = True) -> dict[str, str]:
    """Push the (built) images to ``REGISTRY/kubelora/<name>:<tag>``; returns name -> pushed ref."""
    registry = registry.strip().removeprefix("docker://").rstrip("/")
    names = list(names)
    dev_only = [n for n in names if n in DEV_IMAGE_NAMES]
    if dev_only:
        raise ValueError(f"{', '.join(dev_only)} is built for this machine only and is not pushed")
    if not registry:
        raise ValueError("No registry given: make push REGISTRY=registry.example:5000")
    pushed = {}
    for name, ref in ensure_images(names).items():
        target = f"{registry}/kubelora/{ref.rsplit('/', 1)[1]}"
        _say(f"Pushing {ref} to {target}")
        started = time.monotonic()
        cmd = ["buildah", "push", f"--tls-verify={'true' if tls_verify else 'false'}", ref, f"docker://{target}"]
        _run_logged(cmd, log_path(f"push-{name}"), f"image={name} to={target}", verb="pushing")
        _say(f"Pushed {target} seconds={time.monotonic() - started:.1f}")
        pushed[name] = target
    return pushed


# --- command line ----------------------------------------------------------------------------


def report(results: Sequence[ImageResult]) -> str:
    """A table, then one JSON line."""
    rows = [("IMAGE", "REF", "ID", "SIZE", "SECONDS", "STATE")]
    rows += [
        (
            r.name,
            r.ref,
            r.image_id[:12],
            _human(r.size_bytes),
            f"{r.seconds:.1f}",
            "cached" if r.cached else "built",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
    return table + "\n" + json.dumps({"images": {r.name: r.as_json() for r in results}})


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubelora.devenv.images", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the base image and the images whose inputs changed")
    build.add_argument("names", nargs="*", default=[], metavar="NAME", help=f"default: {' '.join(ALL_IMAGE_NAMES)}")
    build.add_argument("--force", action="store_true", help="rebuild everything, the base root filesystem too")
    build.add_argument("--push", metavar="REGISTRY", help="then push to REGISTRY/kubelora/<name>:<tag>")
    push = sub.add_parser("push", help="build if needed, then push to REGISTRY/kubelora/<name>:<tag>")
    push.add_argument("registry", metavar="REGISTRY")
    push.add_argument("names", nargs="*", default=[], metavar="NAME")
    for command in (build, push):
        command.add_argument(
            "--tls-verify", type=_bool, default=True, metavar="BOOL", help="verify the registry's TLS (default true)"
        )
    sub.add_parser("refs", help="print the image refs (name<TAB>ref)")
    args = parser.parse_args(argv)
    if args.command == "refs":
        for name in ALL_IMAGE_NAMES:
            print(f"{name}\t{image_ref(name)}")
        return 0
    names = args.names or list(ALL_IMAGE_NAMES if args.command == "build" else IMAGE_NAMES)
    try:
        if args.command == "build":
            print(report(build_images(names, force=args.force)), flush=True)
            if args.push:
                # Dev-only images (vLLM's CPU build) stay on this machine.
                push_images(args.push, [n for n in names if n in IMAGE_NAMES], tls_verify=args.tls_verify)
        else:
            for name, target in push_images(args.registry, names, tls_verify=args.tls_verify).items():
                print(f"{name}\t{target}")
    except (RuntimeError, ValueError) as exc:
        _say(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
