"""The buildah side: images in buildah's local store, working containers, `buildah run` and runner tokens."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("kubelora.devenv.kubelet")

#: Names of buildah working containers: ``kpr-<runner pid>-<ns>-<pod>-<container>-<hash>``.
CONTAINER_PREFIX = "kpr-"
#: Where the container's stdout and stderr go, bind-mounted to the host log file (see PodWorker._start).
OUTPUT_PATH = "/.podrunner-output.log"


# ------------------------------------------------------------------------------------------------------------
# Images in buildah's local store


@dataclasses.dataclass(frozen=True)
class Image:
    ref: str  # the name it was found under
    id: str
    config: dict[str, Any]  # OCI image config: Entrypoint, Cmd, Env, User, WorkingDir


def image_candidates(ref: str) -> list[str]:
    """Names under which an image reference may sit in buildah's store (exact first)."""
    out = [ref]
    last = ref.rsplit("/", 1)[-1]
    tagged = "@" in ref or ":" in last
    if not tagged:
        out.append(ref + ":latest")
    first = ref.split("/", 1)[0]
    if "/" not in ref or not ("." in first or ":" in first or first == "localhost"):
        for name in list(out):
            out.append("localhost/" + name)
            out.append("docker.io/" + name if "/" in name else "docker.io/library/" + name)
    return out


class ImageStore:
    """Looks images up in buildah's store by exact name (and the ``localhost/`` and ``:latest`` forms)."""

    def __init__(self, buildah: str = "buildah") -> None:
        self.buildah = buildah
        self._names: dict[str, str] = {}
        self._configs: dict[str, dict[str, Any]] = {}
        self._loaded = 0.0
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        for attempt in range(5):  # an image removed while buildah lists them fails the listing: list again
            result = subprocess.run(
                [self.buildah, "images", "--json", "--no-trunc"], capture_output=True, text=True, check=False
            )
            if result.returncode == 0:
                break
            time.sleep(0.2 * (attempt + 1))
        else:
            raise RuntimeError(f"buildah images failed: {result.stderr.strip()}")
        names: dict[str, str] = {}
        for image in json.loads(result.stdout or "[]") or []:
            for name in image.get("names") or []:
                names[name] = str(image["id"]).removeprefix("sha256:")
        self._names = names
        self._loaded = time.monotonic()

    def resolve(self, ref: str) -> Image | None:
        with self._lock:
            for attempt in range(2):
                if attempt or not self._loaded:
                    if attempt and time.monotonic() - self._loaded < 1.0:
                        break
                    self._refresh()
                for name in image_candidates(ref):
                    image_id = self._names.get(name)
                    if image_id:
                        return Image(name, image_id, self._config(image_id))
            return None

    def _config(self, image_id: str) -> dict[str, Any]:
        if image_id not in self._configs:
            result = subprocess.run(
                [self.buildah, "inspect", "--type", "image", image_id], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                raise RuntimeError(f"buildah inspect {image_id} failed: {result.stderr.strip()}")
            data = json.loads(result.stdout)
            self._configs[image_id] = dict((data.get("OCIv1") or {}).get("config") or {})
        return self._configs[image_id]

    def create(self, name: str, image_id: str) -> tuple[str, Path]:
        """A working container of the image: (its ID, its mounted root filesystem)."""
        self.remove(name)
        for args in (["from", "--pull=never", "--quiet", "--name", name, image_id], ["mount", name]):
            result = subprocess.run([self.buildah, *args], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"buildah {args[0]} failed: {result.stderr.strip()}")
        info = subprocess.run([self.buildah, "inspect", name], capture_output=True, text=True, check=False)
        if info.returncode != 0:
            raise RuntimeError(f"buildah inspect failed: {info.stderr.strip()}")
        data = json.loads(info.stdout)
        return str(data.get("ContainerID", "")), Path(data.get("MountPoint") or "/nonexistent")

    def remove(self, name: str) -> None:
        subprocess.run([self.buildah, "rm", name], capture_output=True, check=False)

    def containers(self) -> list[str]:
        result = subprocess.run([self.buildah, "containers", "--json"], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            return []
        return [str(c.get("containername", "")) for c in json.loads(result.stdout or "[]") or []]


def resolve_in_root(root: Path, path: str) -> str:
    """``path`` inside the container with its symlinks resolved within ``root`` (as runc resolves mount
    destinations; buildah's chroot isolation silently drops mounts whose destination crosses a symlink,
    such as /var/run -> /run)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = root.joinpath(*done, part)
        if candidate.is_symlink() and links < 40:
            links += 1
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        done.append(part)
    return "/" + "/".join(done)


def find_executable(root: Path, command: str, path: str) -> bool:
    """Whether ``command`` names an executable file inside ``root`` (searching ``path`` without a slash)."""
    candidates = [command] if "/" in command else [f"{d.rstrip('/')}/{command}" for d in path.split(":") if d]
    for candidate in candidates:
        host = root / resolve_in_root(root, candidate).lstrip("/")
        if host.is_file() and os.access(host, os.X_OK):
            return True
    return False


def run_command(
    buildah: str,
    name: str,
    rootfs: Path,
    argv: list[str],
    env: dict[str, str],
    user: str,
    workdir: str,
    hostname: str,
    mounts: list[tuple[Path, str, bool]],
    log_file: Path,
) -> tuple[list[str], Path | None]:
    """The ``buildah run`` command for a container, and where buildah's own output goes when it is not the log.

    buildah relays the container's output through pipes and may exit before it has relayed the last of it
    (buildah 1.28, chroot/run_common.go). With a shell in the image, the container writes straight to the
    log file instead, bind-mounted at OUTPUT_PATH, and buildah's messages go to a ``.buildah`` file.
    """
    mounts = list(mounts)
    runtime_log = None
    if find_executable(rootfs, "/bin/sh", ""):
        log_file.chmod(0o666)
        mounts.append((log_file, OUTPUT_PATH, False))
        argv = ["/bin/sh", "-c", f'exec "$@" >>{OUTPUT_PATH} 2>&1', "sh", *argv]
        runtime_log = log_file.with_suffix(".buildah")
    command = [buildah, "run", "--isolation", "chroot", "--network", "host", "--hostname", hostname]
    command += ["--user", user, "--workingdir", workdir]
    for key, value in env.items():
        command += ["--env", f"{key}={value}"]
    resolved = [(host, resolve_in_root(rootfs, path), read_only) for host, path, read_only in mounts]
    if any(target == "/etc/hosts" for _, target, _ in resolved):
        # buildah writes its own /etc/hosts over a mounted one when there are other mounts (1.28)
        command.append("--no-hosts")
    for host, target, read_only in sorted(resolved, key=lambda m: len(Path(m[1]).parts)):
        if target == "/dev" or target.startswith("/dev/"):
            continue  # chroot isolation ignores mounts under /dev (the host's /dev/shm is writable)
        command += ["-v", f"{host}:{target}" + (":ro" if read_only else "")]
    return [*command, name, "--", *argv], runtime_log


def new_runner_token() -> str:
    """A token that names this runner's working containers (``<pid>.<n>``), live until released."""
    token = f"{os.getpid()}.{next(_RUNNER_COUNT)}"
    _LIVE_RUNNERS.add(token)
    return token


def release_runner_token(store: ImageStore, token: str) -> None:
    _LIVE_RUNNERS.discard(token)
    remove_leftovers(store, token)


def container_name(runner: str, namespace: str, pod: str, container: str, uid: str) -> str:
    """``kpr-<runner>-<ns>-<pod>-<container>-<hash>``, where runner is ``<pid>.<n>`` (see :func:`remove_leftovers`)."""
    digest = hashlib.sha256(f"{uid}/{container}".encode()).hexdigest()[:8]
    base = f"{CONTAINER_PREFIX}{runner}-{namespace[:20]}-{pod[:40]}-{container[:20]}"
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", base) + f"-{digest}"


#: Runner tokens (``<pid>.<n>``) of the ImageKubelets alive in this process.
_LIVE_RUNNERS: set[str] = set()
_RUNNER_COUNT = iter(range(1, 1 << 30))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_groups_using(names: set[str]) -> set[int]:
    """Process groups of ``buildah run`` processes whose arguments name one of these working containers."""
    groups: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.decode(errors="replace") in names for arg in argv):
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(int(entry.name)))
    return groups


def container_pids(group: int) -> list[int]:
    """The container's own processes in a ``buildah run`` process group (not buildah's helpers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == group:
            continue
        try:
            if os.getpgid(int(entry.name)) != group:
                continue
            comm = (entry / "comm").read_text().strip()
        except (OSError, ProcessLookupError):
            continue
        if not (comm.startswith("buildah") or comm.startswith("memfd:buildah")):
            pids.append(int(entry.name))
    return pids


def remove_leftovers(store: ImageStore, runner: str | None = None) -> list[str]:
    """Kill and remove the working containers of podrunners that are gone (their process died, or they
    stopped), or with ``runner``, that runner's own. Returns the names removed."""
    leftovers = []
    for name in store.containers():
        match = re.match(rf"{re.escape(CONTAINER_PREFIX)}(\d+)\.(\d+)-", name)
        if not match:
            continue
        token, pid = f"{match.group(1)}.{match.group(2)}", int(match.group(1))
        if runner is not None:
            if token != runner:
                continue
        elif pid == os.getpid():
            if token in _LIVE_RUNNERS:
                continue
        elif _pid_alive(pid):
            continue
        leftovers.append(name)
    if leftovers:
        for group in _process_groups_using(set(leftovers)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        for name in leftovers:
            store.remove(name)
        log.info("Removed leftover containers count=%d", len(leftovers))
    return leftovers
