"""A kubelet for kwok pods that runs their containers from local images with buildah (dev cluster only).

kwok plays the kubelets of the dev cluster's fake nodes: it gives pods IPs and walks them through
phases, but runs nothing. :class:`ImageKubelet` takes over the pods that a
:class:`kubelora.devenv.podrunner.PodRunner` in image mode claims, and plays a real kubelet for them:

- every container runs from its image in buildah's local store (``buildah from --pull=never`` then
  ``buildah run --isolation chroot``), with the command, args, env, user, working directory and
  volume mounts a kubelet would give it, and host networking (the pod IP from kwok is passed through
  ``status.podIP`` field refs; 127.x pod IPs can be bound);
- volumes: emptyDir, hostPath, secret, configMap, downwardAPI, projected (with ServiceAccount tokens
  from the TokenRequest API, bound to the pod), persistentVolumeClaim (the bound PV's ``hostPath`` or
  ``local`` path), and the default ServiceAccount projection at
  ``/var/run/secrets/kubernetes.io/serviceaccount``;
- status goes back through the pod's status subresource as a kubelet writes it: container states
  (waiting with ``CreateContainerConfigError``, ``ErrImageNeverPull``, ``CrashLoopBackOff``; running;
  terminated with the real exit code and termination message), restart counts, readiness from
  ``httpGet``/``tcpSocket`` probes, the Initialized/ContainersReady/Ready conditions and the phase;
- deletion, ``activeDeadlineSeconds`` and a runner-wide maximum per container run kill the container's
  process group (SIGTERM, then SIGKILL after the grace period, capped), remove the working container
  and the pod's emptyDirs.

The runner marks the pods it owns with the annotation :data:`OWNED_ANNOTATION`; the dev cluster's kwok
stages (``stages.yaml``) leave the status of such pods alone, except ``pod-create`` (the pod IP) and
``pod-delete``.

Deviations from a kubelet are listed in docs/standin-server.md ("The podrunner's image mode"). This is
a development tool: it runs images as root's buildah on the host, so use it only on the local dev
cluster.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("kubelora.devenv.kubelet")

#: Set by the runner on every pod it owns; kwok's stages skip such pods (stages.yaml).
OWNED_ANNOTATION = "podrunner.kubelora.dev/owned"
#: Names of buildah working containers: ``kpr-<runner pid>-<ns>-<pod>-<container>-<hash>``.
CONTAINER_PREFIX = "kpr-"
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_SA_VOLUME = "kube-api-access-podrunner"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
#: Where the container's stdout and stderr go, bind-mounted to the host log file (see PodWorker._start).
OUTPUT_PATH = "/.podrunner-output.log"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The kubelet's limits (pkg/kubelet/container): message file bytes, log fallback lines and bytes.
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LINES = 80
FALLBACK_BYTES = 2048
# Go's names of signals, as buildah prints them ("subprocess exited on killed").
_SIGNALS = {
    "hangup": 1,
    "interrupt": 2,
    "quit": 3,
    "illegal instruction": 4,
    "trace/breakpoint trap": 5,
    "aborted": 6,
    "bus error": 7,
    "floating point exception": 8,
    "killed": 9,
    "user defined signal 1": 10,
    "segmentation fault": 11,
    "user defined signal 2": 12,
    "broken pipe": 13,
    "alarm clock": 14,
    "terminated": 15,
}
# What buildah appends to the container's output when the command fails (it shares the output).
_TRAILER = re.compile(
    rb"(?:process failed to start with error: (?P<start>[^\n]*?)(?:process exited with error: [^\n]*?)?)?"
    rb"subprocess exited (?:with status (?P<status>\d+)|on (?P<signal>[a-z0-9 /]+))\n"
    rb"(?:subprocess exited with status \d+\n)*(?:Error: [^\n]*\n)?\Z"
)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------------------------
# The API server, through the kubernetes client's connection (auth and TLS from the kubeconfig)


class ApiError(Exception):
    def __init__(self, status: int, body: bytes | str) -> None:
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        try:
            data = json.loads(text)
        except ValueError:
            data = {}
        self.status = status
        self.reason = str(data.get("reason") or "")
        self.message = str(data.get("message") or text[:500])
        super().__init__(f"{status} {self.reason}: {self.message}")


class Kube:
    """JSON requests to the API server over a ``kubernetes.client.ApiClient``'s connection."""

    def __init__(self, api_client: Any) -> None:
        self.client = api_client
        parsed = urllib.parse.urlparse(api_client.configuration.host)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 443

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        params = self.client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()) or None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.client.call_api(*params, _request_timeout=timeout)
        data = response.read()
        if not 200 <= response.status < 300:
            raise ApiError(response.status, data or b"")
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def ca_pem(self) -> bytes | None:
        """The CA bundle the kubeconfig trusts for the API server."""
        config = self.client.configuration
        if getattr(config, "ssl_ca_cert", None) and Path(config.ssl_ca_cert).is_file():
            return Path(config.ssl_ca_cert).read_bytes()
        return None


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


# ------------------------------------------------------------------------------------------------------------
# Env, command and user, as the kubelet computes them


class StartError(Exception):
    """A container cannot be started (yet); ``reason`` is its waiting reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def config_error(message: str) -> StartError:
    return StartError("CreateContainerConfigError", message)


def expand(text: str, mapping: Callable[[str], str | None]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined vars are replaced, ``$$`` is a literal ``$``, the rest stays."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            rest = text[cursor + 1 :]
            if rest[0] == "$":
                out.append("$")
                advance = 1
            elif rest[0] == "(":
                close = rest.find(")", 1)
                if close == -1:
                    out.append("$(")
                    advance = 1
                else:
                    name = rest[1:close]
                    value = mapping(name)
                    out.append(value if value is not None else f"$({name})")
                    advance = close + 1
            else:
                out.append("$" + rest[0])
                advance = 1
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def pod_field(pod: dict[str, Any], path: str) -> str:
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    match = _FIELD_KEY.match(path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f"{k}={json.dumps(v)}" for k, v in items)
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
        "status.hostIPs": ",".join(i["ip"] for i in status.get("hostIPs") or [] if i.get("ip")) or status.get("hostIP"),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or [] if i.get("ip")) or status.get("podIP"),
    }
    if path not in simple:
        raise config_error(f'unsupported fieldPath: "{path}"')
    return str(simple[path] or "")


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIXES = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def quantity(text: str | int | float) -> float:
    match = _QUANTITY.match(str(text).strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise ValueError(f"bad quantity {text!r}")
    return float(match.group(1)) * _SUFFIXES[match.group(2)]


def resource_field(container: dict[str, Any], ref: dict[str, Any], node_allocatable: dict[str, str]) -> str:
    """resourceFieldRef: limits.* default to the node's allocatable, requests.* to 0 (as the kubelet)."""
    resource = str(ref.get("resource", ""))
    kind, _, name = resource.partition(".")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(name)
    if value is None and kind == "limits":
        value = node_allocatable.get(name)
    if value is None:
        value = 0
    divisor = quantity(ref.get("divisor") or "1")
    number = quantity(value) / divisor
    return str(int(-(-number // 1)))  # ceiling, as the kubelet rounds up


@dataclasses.dataclass
class Lookup:
    """Secrets, ConfigMaps and the node, read from the API (one sync's worth of cache)."""

    kube: Kube
    namespace: str
    node: str | None = None
    _secrets: dict[str, dict[str, str] | None] = dataclasses.field(default_factory=dict)
    _configmaps: dict[str, dict[str, str] | None] = dataclasses.field(default_factory=dict)
    _allocatable: dict[str, str] | None = None

    def secret(self, name: str) -> dict[str, str] | None:
        if name not in self._secrets:
            obj = self.kube.get(f"/api/v1/namespaces/{self.namespace}/secrets/{name}")
            self._secrets[name] = (
                None
                if obj is None
                else {
                    k: base64.b64decode(v).decode("utf-8", "surrogateescape")
                    for k, v in (obj.get("data") or {}).items()
                }
            )
        return self._secrets[name]

    def secret_bytes(self, name: str) -> dict[str, bytes] | None:
        data = self.secret(name)
        return None if data is None else {k: v.encode("utf-8", "surrogateescape") for k, v in data.items()}

    def configmap(self, name: str) -> dict[str, str] | None:
        if name not in self._configmaps:
            obj = self.kube.get(f"/api/v1/namespaces/{self.namespace}/configmaps/{name}")
            if obj is None:
                self._configmaps[name] = None
            else:
                data = dict(obj.get("data") or {})
                for key, value in (obj.get("binaryData") or {}).items():
                    data[key] = base64.b64decode(value).decode("utf-8", "surrogateescape")
                self._configmaps[name] = data
        return self._configmaps[name]

    def configmap_bytes(self, name: str) -> dict[str, bytes] | None:
        data = self.configmap(name)
        return None if data is None else {k: v.encode("utf-8", "surrogateescape") for k, v in data.items()}

    def allocatable(self) -> dict[str, str]:
        if self._allocatable is None:
            node = self.kube.get(f"/api/v1/nodes/{self.node}") if self.node else None
            self._allocatable = dict(((node or {}).get("status") or {}).get("allocatable") or {})
        return self._allocatable


def service_env(host: str, port: int) -> dict[str, str]:
    """The ``kubernetes`` Service's variables, pointing at the API server's real address."""
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": str(port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
        "KUBERNETES_PORT": f"tcp://{host}:{port}",
        f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
        f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
        f"KUBERNETES_PORT_{port}_TCP_PORT": str(port),
        f"KUBERNETES_PORT_{port}_TCP_ADDR": host,
    }


def container_env(
    pod: dict[str, Any], container: dict[str, Any], lookup: Lookup, services: dict[str, str]
) -> dict[str, str]:
    """The kubelet's makeEnvironmentVariables: envFrom, then env (expanded, with valueFrom), then services."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        for kind, getter in (("configMapRef", lookup.configmap), ("secretRef", lookup.secret)):
            ref = source.get(kind)
            if not ref:
                continue
            data = getter(ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise config_error(f'{"configmap" if kind == "configMapRef" else "secret"} "{ref["name"]}" not found')
            for key, value in data.items():
                if "=" not in key:
                    env[prefix + key] = value

    def mapping(name: str) -> str | None:
        return env.get(name, services.get(name))

    for item in container.get("env") or []:
        name = item["name"]
        source = item.get("valueFrom")
        if not source:
            env[name] = expand(str(item.get("value") or ""), mapping)
            continue
        if source.get("fieldRef"):
            env[name] = pod_field(pod, source["fieldRef"]["fieldPath"])
        elif source.get("resourceFieldRef"):
            env[name] = resource_field(container, source["resourceFieldRef"], lookup.allocatable())
        elif source.get("configMapKeyRef") or source.get("secretKeyRef"):
            is_secret = bool(source.get("secretKeyRef"))
            ref = source.get("secretKeyRef") or source.get("configMapKeyRef")
            kind = "Secret" if is_secret else "ConfigMap"
            data = lookup.secret(ref["name"]) if is_secret else lookup.configmap(ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise config_error(f'{kind.lower()} "{ref["name"]}" not found')
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise config_error(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}")
            env[name] = data[ref["key"]]
        else:
            raise config_error(f"unsupported valueFrom for env {name}")
    for key, value in services.items():
        env.setdefault(key, value)
    return env


def container_command(container: dict[str, Any], image_config: dict[str, Any], env: dict[str, str]) -> list[str]:
    """command replaces the image's ENTRYPOINT, args replace its CMD; ``$(VAR)`` expands from the env."""
    command = list(container.get("command") or [])
    args = list(container.get("args") or [])
    if command:
        argv = command + args
    else:
        argv = list(image_config.get("Entrypoint") or []) + (args or list(image_config.get("Cmd") or []))
    return [expand(str(a), env.get) for a in argv]


def _security(pod: dict[str, Any], container: dict[str, Any], field: str) -> Any:
    value = (container.get("securityContext") or {}).get(field)
    if value is None:
        value = (pod["spec"].get("securityContext") or {}).get(field)
    return value


def container_user(pod: dict[str, Any], container: dict[str, Any], image_config: dict[str, Any]) -> str:
    """runAsUser/runAsGroup (container over pod) else the image's USER; checks runAsNonRoot like the kubelet."""
    image_user = str(image_config.get("User") or "")
    image_uid, _, image_gid = image_user.partition(":")
    uid = _security(pod, container, "runAsUser")
    gid = _security(pod, container, "runAsGroup")
    user = str(uid) if uid is not None else image_uid
    group = str(gid) if gid is not None else (image_gid if uid is None else "")
    if _security(pod, container, "runAsNonRoot"):
        meta = pod["metadata"]
        where = f'(pod: "{meta["name"]}_{meta["namespace"]}({meta["uid"]})", container: {container["name"]})'
        if user and not user.isdigit():
            raise config_error(
                f"container has runAsNonRoot and image has non-numeric user ({user}), cannot verify user is non-root "
                + where
            )
        if not user or int(user) == 0:
            raise config_error(f"container has runAsNonRoot and image will run as root {where}")
    if not user:
        user = "0"
    return f"{user}:{group}" if group else user


# ------------------------------------------------------------------------------------------------------------
# Volumes


@dataclasses.dataclass
class Volume:
    name: str
    host: Path
    read_only: bool
    kind: str
    files: bool = False  # written by the runner (secret, configMap, downwardAPI, projected)


def _relative(path: str) -> Path:
    rel = Path(path)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"invalid path {path!r}: must be relative and may not contain '..'")
    return rel


def _mode(value: Any, default: int) -> int:
    return int(value) if value is not None else default


class MountError(Exception):
    pass


@dataclasses.dataclass
class Token:
    token: str
    expires: float  # time.time()
    issued: float


class Volumes:
    """The pod's volumes as host directories under ``root`` (one directory per volume)."""

    def __init__(self, worker: PodWorker) -> None:
        self.worker = worker
        self.root = worker.directory / "volumes"
        self.volumes: dict[str, Volume] = {}
        self.tokens: dict[tuple[str, str, int], Token] = {}
        self.refreshed = 0.0

    def spec_volumes(self, pod: dict[str, Any]) -> list[dict[str, Any]]:
        volumes = list(pod["spec"].get("volumes") or [])
        if self.worker.needs_default_sa_volume(pod):
            volumes.append(
                {
                    "name": DEFAULT_SA_VOLUME,
                    "projected": {
                        "defaultMode": 0o644,
                        "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                            {
                                "downwardAPI": {
                                    "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                                }
                            },
                        ],
                    },
                }
            )
        return volumes

    def setup(self, pod: dict[str, Any], lookup: Lookup) -> None:
        """Create every volume (raises MountError with the kubelet's wording); refreshes file volumes."""
        fs_group = (pod["spec"].get("securityContext") or {}).get("fsGroup")
        for spec in self.spec_volumes(pod):
            name = spec["name"]
            try:
                volume = self._setup_one(pod, spec, lookup, fs_group)
            except MountError as exc:
                raise MountError(f'MountVolume.SetUp failed for volume "{name}" : {exc}') from None
            self.volumes[name] = volume
        self.refreshed = time.monotonic()

    def _setup_one(self, pod: dict[str, Any], spec: dict[str, Any], lookup: Lookup, fs_group: int | None) -> Volume:
        name = spec["name"]
        host = self.root / name
        if "emptyDir" in spec:
            if not host.exists():
                host.mkdir(parents=True)
                host.chmod(0o777)
                if fs_group is not None:
                    os.chown(host, -1, int(fs_group))
                    host.chmod(0o2777)
            return Volume(name, host, False, "emptyDir")
        if "hostPath" in spec:
            source = spec["hostPath"]
            path = Path(source["path"])
            kind = source.get("type") or ""
            if kind == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            elif kind == "FileOrCreate" and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch(0o644)
            elif kind == "Directory" and not path.is_dir():
                raise MountError(f"hostPath type check failed: {path} is not a directory")
            elif kind == "File" and not path.is_file():
                raise MountError(f"hostPath type check failed: {path} is not a file")
            elif not path.exists() and kind not in ("", "DirectoryOrCreate", "FileOrCreate"):
                raise MountError(f"hostPath type check failed: {path} does not exist")
            return Volume(name, path, False, "hostPath")
        if "persistentVolumeClaim" in spec:
            return Volume(name, *self._pvc(pod, spec["persistentVolumeClaim"], lookup.kube), "persistentVolumeClaim")
        for kind in ("secret", "configMap", "downwardAPI", "projected"):
            if kind in spec:
                files = self._files(pod, kind, spec[kind], lookup)
                self._write(host, files, fs_group)
                return Volume(name, host, True, kind, files=True)
        other = next((k for k in spec if k != "name"), "unknown")
        raise MountError(f"podrunner does not support {other} volumes")

    def _pvc(self, pod: dict[str, Any], source: dict[str, Any], kube: Kube) -> tuple[Path, bool]:
        namespace = pod["metadata"]["namespace"]
        claim_name = source["claimName"]
        claim = kube.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim_name}")
        if claim is None:
            raise MountError(f'persistentvolumeclaim "{claim_name}" not found')
        volume_name = (claim.get("spec") or {}).get("volumeName")
        if not volume_name or (claim.get("status") or {}).get("phase") != "Bound":
            raise MountError(f'persistentvolumeclaim "{claim_name}" is not bound')
        pv = kube.get(f"/api/v1/persistentvolumes/{volume_name}")
        if pv is None:
            raise MountError(f'persistentvolume "{volume_name}" not found')
        pv_spec = pv.get("spec") or {}
        path = (pv_spec.get("hostPath") or {}).get("path") or (pv_spec.get("local") or {}).get("path")
        if not path:
            raise MountError(f"persistentvolume {volume_name} has neither spec.hostPath nor spec.local")
        if not Path(path).exists():
            if (pv_spec.get("hostPath") or {}).get("type") == "DirectoryOrCreate":
                Path(path).mkdir(parents=True, exist_ok=True)
            else:
                raise MountError(f"path {path} of persistentvolume {volume_name} does not exist")
        return Path(path), bool(source.get("readOnly"))

    def _items(
        self,
        data: dict[str, bytes] | None,
        source: dict[str, Any],
        kind: str,
        default_mode: int,
    ) -> dict[str, tuple[bytes, int]]:
        name = source.get("name", "")
        if data is None:
            if source.get("optional"):
                return {}
            raise MountError(f'{kind} "{name}" not found')
        out: dict[str, tuple[bytes, int]] = {}
        items = source.get("items")
        if items:
            for item in items:
                if item["key"] not in data:
                    if source.get("optional"):
                        continue
                    word = "config" if kind == "configmap" else "secret"
                    raise MountError(f"{kind} references non-existent {word} key: {item['key']}")
                out[str(_relative(item["path"]))] = (data[item["key"]], _mode(item.get("mode"), default_mode))
        else:
            for key, value in data.items():
                out[key] = (value, default_mode)
        return out

    def _downward(
        self, pod: dict[str, Any], items: Iterable[dict[str, Any]], default_mode: int, lookup: Lookup
    ) -> dict[str, tuple[bytes, int]]:
        out: dict[str, tuple[bytes, int]] = {}
        for item in items:
            if item.get("fieldRef"):
                try:
                    value = pod_field(pod, item["fieldRef"]["fieldPath"])
                except StartError as exc:
                    raise MountError(exc.message) from None
            elif item.get("resourceFieldRef"):
                ref = item["resourceFieldRef"]
                container = next(
                    (c for c in pod["spec"]["containers"] if c["name"] == ref.get("containerName")),
                    pod["spec"]["containers"][0],
                )
                value = resource_field(container, ref, lookup.allocatable())
            else:
                continue
            out[str(_relative(item["path"]))] = (value.encode(), _mode(item.get("mode"), default_mode))
        return out

    def _files(
        self, pod: dict[str, Any], kind: str, source: dict[str, Any], lookup: Lookup
    ) -> dict[str, tuple[bytes, int]]:
        mode = _mode(source.get("defaultMode"), 0o644)
        if kind == "secret":
            src = dict(source, name=source.get("secretName", ""))
            return self._items(lookup.secret_bytes(src["name"]), src, "secret", mode)
        if kind == "configMap":
            return self._items(lookup.configmap_bytes(source["name"]), source, "configmap", mode)
        if kind == "downwardAPI":
            return self._downward(pod, source.get("items") or [], mode, lookup)
        files: dict[str, tuple[bytes, int]] = {}
        for projection in source.get("sources") or []:
            if "secret" in projection:
                ref = projection["secret"]
                files.update(self._items(lookup.secret_bytes(ref["name"]), ref, "secret", mode))
            elif "configMap" in projection:
                ref = projection["configMap"]
                files.update(self._items(lookup.configmap_bytes(ref["name"]), ref, "configmap", mode))
            elif "downwardAPI" in projection:
                files.update(self._downward(pod, projection["downwardAPI"].get("items") or [], mode, lookup))
            elif "serviceAccountToken" in projection:
                token = projection["serviceAccountToken"]
                value = self._token(pod, token.get("audience") or "", int(token.get("expirationSeconds") or 3600))
                files[str(_relative(token["path"]))] = (value.encode(), mode)
            else:
                other = next(iter(projection), "unknown")
                raise MountError(f"podrunner does not support {other} projections")
        return files

    def _token(self, pod: dict[str, Any], audience: str, seconds: int) -> str:
        """A TokenRequest bound to the pod, renewed at 80% of its life as the kubelet does."""
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        key = (account, audience, seconds)
        cached = self.tokens.get(key)
        now = time.time()
        if cached and now < cached.issued + 0.8 * (cached.expires - cached.issued):
            return cached.token
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [audience] if audience else [],
                "expirationSeconds": seconds,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
            },
        }
        try:
            response = self.worker.kube.request(
                "POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token", body
            )
        except ApiError as exc:
            raise MountError(f"failed to fetch token: {exc.message}") from None
        status = response.get("status") or {}
        expires = datetime.datetime.fromisoformat(status["expirationTimestamp"].replace("Z", "+00:00")).timestamp()
        self.tokens[key] = Token(status["token"], expires, now)
        return str(status["token"])

    @staticmethod
    def _write(directory: Path, files: dict[str, tuple[bytes, int]], fs_group: int | None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        wanted = set(files)
        for existing in [p for p in directory.rglob("*") if p.is_file()]:
            rel = str(existing.relative_to(directory))
            if rel not in wanted:
                existing.unlink()
        for rel, (data, mode) in files.items():
            path = directory / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if fs_group is not None:
                mode |= 0o440
            if path.is_file() and path.read_bytes() == data and (path.stat().st_mode & 0o7777) == mode:
                continue
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            tmp.chmod(mode)
            if fs_group is not None:
                os.chown(tmp, -1, int(fs_group))
            tmp.replace(path)

    def mounts(
        self, pod: dict[str, Any], container: dict[str, Any], env: dict[str, str]
    ) -> list[tuple[Path, str, bool]]:
        """(host path, container path, read-only) for a container's volumeMounts, parents first."""
        out: list[tuple[Path, str, bool]] = []
        mounts = list(container.get("volumeMounts") or [])
        if self.worker.needs_default_sa_volume(pod) and not any(
            m.get("mountPath", "").rstrip("/") == SERVICE_ACCOUNT_MOUNT for m in mounts
        ):
            mounts.append({"name": DEFAULT_SA_VOLUME, "mountPath": SERVICE_ACCOUNT_MOUNT, "readOnly": True})
        for mount in mounts:
            volume = self.volumes.get(mount["name"])
            if volume is None:
                raise StartError("CreateContainerConfigError", f'volume "{mount["name"]}" not found in the pod')
            host = volume.host
            sub = mount.get("subPath") or (expand(mount["subPathExpr"], env.get) if mount.get("subPathExpr") else "")
            if sub:
                try:
                    host = host / _relative(sub)
                except ValueError as exc:
                    raise StartError("CreateContainerConfigError", str(exc)) from None
                if not host.exists():
                    if volume.read_only:
                        raise StartError("CreateContainerConfigError", f"subPath {sub} does not exist in volume")
                    host.mkdir(parents=True, exist_ok=True)
                    host.chmod(0o777)
            target = mount["mountPath"]
            if ":" in target or ":" in str(host):
                raise StartError("CreateContainerConfigError", f"podrunner cannot mount paths with ':' ({target})")
            out.append((host, target, bool(mount.get("readOnly")) or volume.read_only))
        out.sort(key=lambda m: len(Path(m[1]).parts))
        return out


# ------------------------------------------------------------------------------------------------------------
# Containers


@dataclasses.dataclass
class Probe:
    spec: dict[str, Any]
    kind: str  # readiness | liveness | startup
    result: bool
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0


@dataclasses.dataclass
class Container:
    spec: dict[str, Any]
    init: bool
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    restart_count: int = 0
    last_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    exit_code: int | None = None
    started_at: str = ""
    finished_at: str = ""
    image_id: str = ""
    container_id: str = ""
    process: subprocess.Popen[bytes] | None = None
    working: str = ""  # buildah working container name
    log_path: Path | None = None
    runtime_log: Path | None = None  # buildah's own output, when the container's goes to log_path directly
    termination_file: Path | None = None
    started_mono: float = 0.0
    next_try: float = 0.0
    failures: int = 0  # consecutive start/config failures, for the retry backoff
    kill_reason: str = ""
    first_output: float | None = None
    probes: dict[str, Probe] = dataclasses.field(default_factory=dict)
    events: set[tuple[str, str]] = dataclasses.field(default_factory=set)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def ready(self) -> bool:
        if self.init and self.state == "terminated":
            return self.exit_code == 0  # a completed init container is ready, as the kubelet reports it
        if self.state != "running":
            return False
        started = self.probes["startup"].result if "startup" in self.probes else True
        readiness = self.probes["readiness"].result if "readiness" in self.probes else True
        return started and readiness

    @property
    def started(self) -> bool:
        if self.state != "running":
            return False
        return self.probes["startup"].result if "startup" in self.probes else True

    def terminated_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "exitCode": self.exit_code if self.exit_code is not None else 0,
            "reason": self.reason,
            "startedAt": self.started_at or None,
            "finishedAt": self.finished_at or None,
        }
        if self.message:
            state["message"] = self.message
        if self.container_id:
            state["containerID"] = self.container_id
        return state

    def status(self) -> dict[str, Any]:
        if self.state == "running":
            state: dict[str, Any] = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated_state()}
        else:
            waiting: dict[str, Any] = {"reason": self.reason}
            if self.message:
                waiting["message"] = self.message
            state = {"waiting": waiting}
        entry: dict[str, Any] = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": self.image_id,
            "ready": self.ready,
            "restartCount": self.restart_count,
            "started": self.started,
            "state": state,
            "lastState": self.last_state,
        }
        if self.container_id and self.state != "waiting":
            entry["containerID"] = self.container_id
        return entry


def parse_exit(returncode: int, log_path: Path | None) -> tuple[int, str | None]:
    """The container's exit code from buildah's, and a StartError message when it never started.

    buildah exits with the container's code, but says how the container ended on the shared output
    (``subprocess exited with status N`` / ``on killed``); that trailer is removed from the log.
    """
    if returncode == 0:
        return 0, None
    if returncode < 0:
        return 128 - returncode, None
    if log_path is not None and log_path.is_file():
        with log_path.open("rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = max(0, size - 16384)
            handle.seek(start)
            tail = handle.read()
            match = _TRAILER.search(tail)
            if match:
                handle.truncate(start + match.start())
                if match.group("start") is not None:
                    return 128, match.group("start").decode(errors="replace")
                if match.group("status") is not None:
                    return int(match.group("status")), None
                return 128 + _SIGNALS.get(match.group("signal").decode(), 0), None
    if returncode == 125:
        return 128, _tail_text(log_path, 1, 1024) or "buildah run failed"
    return returncode, None


def _tail_text(path: Path | None, lines: int, limit: int) -> str:
    if path is None or not path.is_file():
        return ""
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - 65536))
        data = handle.read()
    text = b"".join(data.splitlines(keepends=True)[-lines:])
    return text[-limit:].decode(errors="replace").strip("\n") if lines == 1 else text[-limit:].decode(errors="replace")


def termination_message(container: Container, exit_code: int) -> str:
    """The termination message file (up to 4096 bytes), else with FallbackToLogsOnError and a failure, the
    last 80 lines / 2048 bytes of the log."""
    message = ""
    if container.termination_file is not None and container.termination_file.is_file():
        with container.termination_file.open("rb") as handle:
            message = handle.read(MAX_TERMINATION_MESSAGE).decode(errors="replace")
    if not message and exit_code != 0 and container.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        message = _tail_text(container.log_path, FALLBACK_LINES, FALLBACK_BYTES)
    return message


# ------------------------------------------------------------------------------------------------------------
# One pod


@dataclasses.dataclass
class KubeletConfig:
    workdir: Path
    #: Upper bound of one container run when the pod has no activeDeadlineSeconds (None: unbounded).
    max_runtime: float | None = 1800.0
    #: Cap on terminationGracePeriodSeconds when killing containers.
    grace_cap: float = 10.0
    #: Restart back-off of exited containers: base, doubled per restart, capped (the kubelet: 10 s, 300 s).
    restart_backoff: float = 1.0
    restart_backoff_max: float = 60.0
    #: Retry back-off for containers that cannot start yet (missing Secret, image not present ...).
    retry_backoff_max: float = 10.0
    #: How often Secret, ConfigMap, downwardAPI and projected volumes are refreshed.
    volume_refresh: float = 30.0
    buildah: str = "buildah"


class PodWorker:
    """Runs one pod's containers and writes its status, until the pod is deleted or finishes (one thread)."""

    def __init__(self, kubelet: ImageKubelet, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        self.thread = threading.Thread(target=self.run, name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.kubelet = kubelet
        self.kube = kubelet.kube
        self.config = kubelet.config
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.pod = pod
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.gone = False  # the API object no longer exists
        self.directory = self.config.workdir / "pods" / self.uid
        self.log_dir = self.config.workdir / "logs" / f"{self.namespace}_{self.pod_name}_{self.uid}"
        spec = pod["spec"]
        self.containers = [Container(c, True) for c in spec.get("initContainers") or []]
        self.containers += [Container(c, False) for c in spec.get("containers") or []]
        for c in self.containers:
            if c.init:
                c.reason = "PodInitializing"
        self.volumes = Volumes(self)
        self.volumes_ready = False
        self.volume_next_try = 0.0
        self.volume_failures = 0
        self.start_mono: float | None = None
        self.start_time: str | None = None
        self.pod_reason = ""
        self.pod_message = ""
        self.terminal = False
        self.finished = threading.Event()  # containers are gone and the final status is written
        self.sent_signature: Any = None
        self.sent_version = 0
        self._automount: bool | None = None

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    # -- inputs from the watch ------------------------------------------------------------------------------

    def update(self, pod: dict[str, Any]) -> None:
        with self.lock:
            if _version(pod) >= _version(self.pod):
                self.pod = pod
        self.wake.set()

    def mark_gone(self) -> None:
        self.gone = True
        self.wake.set()

    def current(self) -> dict[str, Any]:
        with self.lock:
            return self.pod

    # -- helpers --------------------------------------------------------------------------------------------

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.pod_name}"

    def event(self, container: Container | None, kind: str, reason: str, message: str) -> None:
        if container is not None:
            if (reason, message) in container.events:
                return
            container.events.add((reason, message))
        self.kubelet.event(self.current(), container.name if container else None, kind, reason, message)

    def needs_default_sa_volume(self, pod: dict[str, Any]) -> bool:
        """The kubelet's default ServiceAccount projection, when the admission plugin did not add one."""
        spec = pod["spec"]
        if any(v.get("name", "").startswith("kube-api-access-") for v in spec.get("volumes") or []):
            return False
        if self._automount is None:
            automount = spec.get("automountServiceAccountToken")
            if automount is None:
                account = self.kube.get(
                    f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{spec.get('serviceAccountName') or 'default'}"
                )
                automount = (account or {}).get("automountServiceAccountToken")
            self._automount = automount is not False
        return self._automount

    def lookup(self, pod: dict[str, Any]) -> Lookup:
        return Lookup(self.kube, self.namespace, pod["spec"].get("nodeName"))

    def grace(self, pod: dict[str, Any]) -> float:
        meta, spec = pod["metadata"], pod["spec"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", 30)
        return float(min(float(grace or 0), self.config.grace_cap))

    # -- the loop -------------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("Pod worker failed pod=%s", self.key)
            self._kill_all(0.0, "podrunner error")
        finally:
            for container in self.containers:
                if container.working:
                    self.kubelet.store.remove(container.working)
            self.finished.set()
            self.kubelet.worker_done(self)

    def _run(self) -> None:
        if not self._claim():
            return
        self._adopt(self.current())
        while True:
            pod = self.current()
            deleting = bool(pod["metadata"].get("deletionTimestamp"))
            if self.gone or deleting:
                self._kill_all(self.grace(pod), "")
                self.terminal = True
                if not self.gone:
                    self._send_status(pod, force=True)
                    self._delete(pod)
                shutil.rmtree(self.directory, ignore_errors=True)
                log.info("Stopped pod pod=%s", self.key)
                return
            if self.kubelet.stopping.is_set():
                self._shutdown(pod)
                return
            # kwok's pod-create stage gives the pod its IP (and writes its status): wait for it first.
            has_ip = bool((pod.get("status") or {}).get("podIP"))
            if not self.terminal and has_ip:
                try:
                    self._step(pod)
                except Exception:  # one failed sync (buildah, the API) must not orphan the pod: retry
                    log.exception("Pod sync failed pod=%s", self.key)
                    self.wake.wait(1.0)
            sent = self._send_status(self.current()) if has_ip or self.terminal else False
            self._release_containers(exited_only=True)  # after the status: `buildah rm` may wait for a lock
            if self.terminal and sent:
                if any(c.process is not None for c in self.containers):
                    self._kill_all(self.grace(pod), "")  # terminal by someone else's word: stop what runs
                    continue
                self._release_containers()
                # Stay until deletion, to remove the pod's directories then (containers are gone already).
                while not (self.gone or self.kubelet.stopping.is_set()):
                    if self.current()["metadata"].get("deletionTimestamp"):
                        self._delete(self.current())
                        break
                    self.wake.wait(5.0)
                    self.wake.clear()
                    if not self.gone and not self.kubelet.stopping.is_set():
                        self._send_status(self.current())
                shutil.rmtree(self.directory, ignore_errors=True)
                return
            self.wake.wait(0.5 if self._busy() else 1.0)
            self.wake.clear()

    def _busy(self) -> bool:
        return any(c.state != "terminated" for c in self.containers)

    def _claim(self) -> bool:
        """Mark the pod as owned, so kwok's stages leave its status alone."""
        annotations = self.current()["metadata"].get("annotations") or {}
        if annotations.get(OWNED_ANNOTATION):
            return True
        patch = {"metadata": {"uid": self.uid, "annotations": {OWNED_ANNOTATION: self.kubelet.identity}}}
        for attempt in range(20):
            try:
                updated = self.kube.request(
                    "PATCH",
                    f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}",
                    patch,
                    content_type="application/merge-patch+json",
                )
            except Exception as exc:
                log.warning("Cannot claim pod pod=%s error=%s", self.key, exc)
                if (isinstance(exc, ApiError) and exc.status in (404, 409, 422)) or self.gone:
                    return False  # gone, or another pod of that name now
                if self.kubelet.stopping.wait(min(5.0, 0.2 * 2**attempt)):
                    return False
                continue
            self.update(updated)
            return True
        return False

    def _adopt(self, pod: dict[str, Any]) -> None:
        """Containers that an earlier runner ran are lost: ContainerStatusUnknown, as the kubelet says."""
        status = pod.get("status") or {}
        self.start_time = status.get("startTime")
        if self.start_time:
            with contextlib.suppress(ValueError):
                started = datetime.datetime.fromisoformat(self.start_time.replace("Z", "+00:00")).timestamp()
                self.start_mono = time.monotonic() - max(0.0, time.time() - started)
        previous = {
            s["name"]: s for s in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or [])
        }
        for container in self.containers:
            old = previous.get(container.name) or {}
            if not str(old.get("containerID", "")).startswith("buildah://"):
                continue
            container.restart_count = int(old.get("restartCount") or 0)
            state = old.get("state") or {}
            if "terminated" in state:
                term = state["terminated"]
                container.state, container.exit_code = "terminated", int(term.get("exitCode", 0))
                container.reason, container.message = term.get("reason", ""), term.get("message", "")
                container.started_at, container.finished_at = term.get("startedAt", ""), term.get("finishedAt", "")
                container.container_id = str(old.get("containerID", ""))
            elif "running" in state:
                container.state, container.exit_code = "terminated", 137
                container.reason = "ContainerStatusUnknown"
                container.message = "The container could not be located when the pod was terminated"
                container.started_at = state["running"].get("startedAt", "")
                container.finished_at = now_rfc3339()
                self._after_exit(pod, container)

    # -- steps ----------------------------------------------------------------------------------------------

    def _step(self, pod: dict[str, Any]) -> None:
        now = time.monotonic()
        if self.start_mono is None:
            self.start_mono = now
            self.start_time = self.start_time or now_rfc3339()
        for container in self.containers:
            self._poll(pod, container)
        deadline = pod["spec"].get("activeDeadlineSeconds")
        if deadline is not None and now - self.start_mono > float(deadline):
            message = "Pod was active on the node longer than the specified deadline"
            self.event(None, "Normal", "DeadlineExceeded", message)
            self._kill_all(self.grace(pod), "")
            self.pod_reason, self.pod_message = "DeadlineExceeded", message
            self.terminal = True
            return
        if not self._ensure_volumes(pod, now):
            return
        inits = [c for c in self.containers if c.init]
        policy = pod["spec"].get("restartPolicy") or "Always"
        for container in inits:
            if container.state == "terminated" and container.exit_code == 0:
                continue
            if container.state == "running":
                return
            if container.state == "terminated" and policy == "Never":
                self.terminal = True
                return
            if now >= container.next_try:
                self._start(pod, container)
            return
        for container in self.containers:
            if container.init or container.state != "waiting" or now < container.next_try:
                continue
            self._start(pod, container)
        for container in self.containers:
            if container.state == "running":
                self._probe(pod, container, now)
                limit = self.config.max_runtime
                if limit and deadline is None and now - container.started_mono > limit:
                    self._kill([container], self.grace(pod), f"podrunner: container ran longer than {limit:.0f}s")
                    self._poll(pod, container)
        mains = [c for c in self.containers if not c.init]
        if mains and all(c.state == "terminated" for c in mains):
            self.terminal = True

    def _ensure_volumes(self, pod: dict[str, Any], now: float) -> bool:
        if self.volumes_ready and now - self.volumes.refreshed < self.config.volume_refresh:
            return True
        if not self.volumes_ready and now < self.volume_next_try:
            return False
        try:
            self.volumes.setup(pod, self.lookup(pod))
        except (MountError, ApiError, OSError) as exc:
            if self.volumes_ready:
                log.warning("Volume refresh failed pod=%s error=%s", self.key, exc)
                self.volumes.refreshed = now
                return True
            self.volume_failures += 1
            self.volume_next_try = now + min(self.config.retry_backoff_max, 0.5 * 2**self.volume_failures)
            self.event(None, "Warning", "FailedMount", str(exc))
            log.warning("Volume setup failed pod=%s error=%s", self.key, exc)
            return False
        self.volumes_ready = True
        return True

    def _start(self, pod: dict[str, Any], container: Container) -> None:
        now = time.monotonic()
        try:
            try:
                image = self.kubelet.store.resolve(container.spec.get("image", ""))
            except (RuntimeError, ValueError, OSError) as exc:
                raise StartError("ImageInspectError", f"Failed to inspect image: {exc}") from None
            if image is None:
                raise StartError(
                    "ErrImageNeverPull",
                    f'Container image "{container.spec.get("image", "")}" is not present with pull policy of Never',
                )
            lookup = self.lookup(pod)
            env = container_env(pod, container.spec, lookup, self.kubelet.services)
            argv = container_command(container.spec, image.config, env)
            if not argv:
                raise StartError("CreateContainerError", "no command specified")
            user = container_user(pod, container.spec, image.config)
            mounts = self.volumes.mounts(pod, container.spec, env)
        except StartError as exc:
            self._cannot_start(container, exc.reason, exc.message)
            return
        except ApiError as exc:
            self._cannot_start(container, "CreateContainerConfigError", exc.message)
            return
        container.image_id = f"sha256:{image.id}"
        run = container.restart_count
        container.log_path = self.log_dir / container.name / f"{run}.log"
        container.log_path.parent.mkdir(parents=True, exist_ok=True)
        container.log_path.write_bytes(b"")
        term_path = container.spec.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        container.termination_file = None
        if not (term_path == "/dev" or term_path.startswith("/dev/")):
            file = self.directory / "termination" / f"{container.name}-{run}"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(b"")
            file.chmod(0o666)
            container.termination_file = file
            mounts.append((file, term_path, False))
        workdir = container.spec.get("workingDir") or image.config.get("WorkingDir") or "/"
        hostname = (pod["spec"].get("hostname") or self.pod_name)[:63]
        name = container_name(self.kubelet.runner, self.namespace, self.pod_name, container.name, self.uid)
        started = time.monotonic()
        try:
            container_id, rootfs = self.kubelet.store.create(name, image.id)
        except RuntimeError as exc:
            self._cannot_start(container, "CreateContainerError", str(exc))
            return
        container.container_id = "buildah://" + container_id
        container.working = name
        image_path = next((e.split("=", 1)[1] for e in image.config.get("Env") or [] if e.startswith("PATH=")), "")
        if not find_executable(rootfs, argv[0], env.get("PATH") or image_path or DEFAULT_PATH):
            where = "" if "/" in argv[0] else " in $PATH"
            self._start_error(pod, container, f'exec: "{argv[0]}": executable file not found{where}')
            return
        argv_run, container.runtime_log = run_command(
            self.config.buildah, name, rootfs, argv, env, user, workdir, hostname, mounts, container.log_path
        )
        output = container.runtime_log or container.log_path
        with output.open("ab") as out:
            process = subprocess.Popen(
                argv_run, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        container.process = process

        def exited() -> None:
            process.wait()
            self.wake.set()

        threading.Thread(target=exited, name=f"wait-{name}", daemon=True).start()
        container.state, container.reason, container.message = "running", "", ""
        container.started_at = now_rfc3339()
        container.started_mono = started
        container.exit_code, container.kill_reason, container.first_output = None, "", None
        container.failures = 0
        container.probes = {
            kind: Probe(container.spec[f"{kind}Probe"], kind, result=(kind == "liveness"))
            for kind in ("readiness", "liveness", "startup")
            if container.spec.get(f"{kind}Probe")
        }
        for probe in container.probes.values():
            probe.next_at = started + float(probe.spec.get("initialDelaySeconds") or 0)
        self.event(container, "Normal", "Started", f"Started container {container.name}")
        container.events.discard(("Started", f"Started container {container.name}"))
        log.info(
            "Started container pod=%s container=%s image=%s seconds=%.2f",
            self.key,
            container.name,
            image.ref,
            time.monotonic() - now,
        )

    def _start_error(self, pod: dict[str, Any], container: Container, message: str) -> None:
        """The runtime could not start the process: terminated with StartError and exit code 128."""
        now = now_rfc3339()
        container.state, container.reason, container.message = "terminated", "StartError", message
        container.exit_code, container.started_at, container.finished_at = 128, now, now
        container.started_mono = time.monotonic()
        if container.working:
            self.kubelet.store.remove(container.working)
            container.working = ""
        self.event(container, "Warning", "Failed", f"Error: {message}")
        log.warning("Cannot start container pod=%s container=%s message=%s", self.key, container.name, message)
        self._after_exit(pod, container)

    def _cannot_start(self, container: Container, reason: str, message: str) -> None:
        now = time.monotonic()
        container.failures += 1
        container.next_try = now + min(self.config.retry_backoff_max, 0.5 * 2**container.failures)
        if container.reason != reason or container.message != message:
            log.warning(
                "Cannot start container pod=%s container=%s reason=%s message=%s",
                self.key,
                container.name,
                reason,
                message,
            )
        container.state, container.reason, container.message = "waiting", reason, message
        self.event(container, "Warning", "Failed", f"Error: {message}")

    def _poll(self, pod: dict[str, Any], container: Container) -> None:
        process = container.process
        if process is None:
            return
        if container.first_output is None and container.log_path is not None:
            with contextlib.suppress(OSError):
                if container.log_path.stat().st_size > 0:
                    container.first_output = time.monotonic() - container.started_mono
                    log.info(
                        "First output pod=%s container=%s seconds=%.2f",
                        self.key,
                        container.name,
                        container.first_output,
                    )
        returncode = process.poll()
        if returncode is None:
            return
        container.process = None
        exit_code, start_error = parse_exit(returncode, container.runtime_log or container.log_path)
        container.finished_at = now_rfc3339()
        container.exit_code = exit_code
        container.state = "terminated"
        if start_error is not None:
            container.reason, container.message = "StartError", start_error
        else:
            container.reason = "Completed" if exit_code == 0 else "Error"
            container.message = container.kill_reason or termination_message(container, exit_code)
        log.info(
            "Container exited pod=%s container=%s exitCode=%d reason=%s",
            self.key,
            container.name,
            exit_code,
            container.reason,
        )
        self._after_exit(pod, container)

    def _after_exit(self, pod: dict[str, Any], container: Container) -> None:
        """Schedule a restart as the restart policy says (waiting: CrashLoopBackOff, lastState: terminated)."""
        policy = pod["spec"].get("restartPolicy") or "Always"
        if policy == "Never" or (policy == "OnFailure" and container.exit_code == 0) or self.terminal:
            return
        if container.init and container.exit_code == 0:
            return
        ran = time.monotonic() - container.started_mono if container.started_mono else 0.0
        exponent = 0 if ran > 600 else min(container.restart_count, 10)
        delay = min(self.config.restart_backoff_max, self.config.restart_backoff * 2**exponent)
        container.last_state = {"terminated": container.terminated_state()}
        container.state = "waiting"
        container.reason = "CrashLoopBackOff"
        container.message = (
            f"back-off {delay:.0f}s restarting failed container={container.name} "
            f"pod={self.pod_name}_{self.namespace}({self.uid})"
        )
        container.restart_count += 1
        container.next_try = time.monotonic() + delay
        container.exit_code = None

    def _probe(self, pod: dict[str, Any], container: Container, now: float) -> None:
        for probe in container.probes.values():
            if now < probe.next_at:
                continue
            if probe.kind != "startup" and "startup" in container.probes and not container.probes["startup"].result:
                continue
            if probe.kind == "startup" and probe.result:
                continue
            spec = probe.spec
            probe.next_at = now + float(spec.get("periodSeconds") or 10)
            ok = self._check(pod, container, spec)
            if ok:
                probe.successes += 1
                probe.failures = 0
                if probe.successes >= int(spec.get("successThreshold") or 1):
                    probe.result = True
            else:
                probe.failures += 1
                probe.successes = 0
                if probe.failures >= int(spec.get("failureThreshold") or 3):
                    probe.result = False
                    if probe.kind in ("liveness", "startup"):
                        what = "liveness" if probe.kind == "liveness" else "startup"
                        self.event(
                            container,
                            "Normal",
                            "Killing",
                            f"Container {container.name} failed {what} probe, will be restarted",
                        )
                        self._kill([container], self.grace(pod), "")
                        self._poll(pod, container)
                        return

    def _check(self, pod: dict[str, Any], container: Container, spec: dict[str, Any]) -> bool:
        pod_ip = (pod.get("status") or {}).get("podIP") or "127.0.0.1"
        default_host = pod_ip if pod_ip.startswith("127.") else "127.0.0.1"
        timeout = float(spec.get("timeoutSeconds") or 1)

        def port_of(value: Any) -> int:
            if isinstance(value, int) or str(value).isdigit():
                return int(value)
            for port in container.spec.get("ports") or []:
                if port.get("name") == value:
                    return int(port["containerPort"])
            raise ValueError(f"unknown port {value}")

        try:
            if spec.get("httpGet"):
                get = spec["httpGet"]
                scheme = str(get.get("scheme") or "HTTP").lower()
                host = get.get("host") or default_host
                url = f"{scheme}://{host}:{port_of(get['port'])}{get.get('path') or '/'}"
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                request = urllib.request.Request(url, headers=headers)  # noqa: S310 - http(s) to the pod
                context = ssl._create_unverified_context() if scheme == "https" else None  # noqa: S323 - as the kubelet
                try:
                    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310
                        return 200 <= response.status < 400
                except urllib.error.HTTPError as exc:
                    return 200 <= exc.code < 400
            if spec.get("tcpSocket"):
                tcp = spec["tcpSocket"]
                with socket.create_connection((tcp.get("host") or default_host, port_of(tcp["port"])), timeout=timeout):
                    return True
            if spec.get("exec") or spec.get("grpc"):
                self.event(
                    container, "Warning", "Unhealthy", "podrunner does not run exec or grpc probes; counted as success"
                )
                return True
        except (OSError, ValueError):
            return False
        return False

    # -- stopping -------------------------------------------------------------------------------------------

    def _kill(self, containers: Iterable[Container], grace: float, reason: str) -> None:
        """SIGTERM the containers' process groups; SIGKILL the containers' processes left after ``grace``.

        buildah itself gets longer: once the container's process is gone it still takes buildah's storage
        lock (a concurrent ``buildah bud`` can hold it for many seconds) before it reports the exit code.
        """
        running = [c for c in containers if c.process is not None and c.process.poll() is None]
        for container in running:
            assert container.process is not None
            container.kill_reason = reason
            self.event(container, "Normal", "Killing", f"Stopping container {container.name}")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(container.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        pending = list(running)
        while pending:
            pending = [
                c
                for c in pending
                if c.process is not None and c.process.poll() is None and container_pids(c.process.pid)
            ]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        for container in pending:
            assert container.process is not None
            for pid in container_pids(container.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for container in running:
            assert container.process is not None
            try:
                container.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(container.process.pid, signal.SIGKILL)
                container.process.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(container.process.pid, signal.SIGKILL)  # stragglers of the group

    def _kill_all(self, grace: float, reason: str) -> None:
        self.terminal = True
        self._kill(self.containers, grace, reason)
        pod = self.current()
        for container in self.containers:
            self._poll(pod, container)

    def _release_containers(self, exited_only: bool = False) -> None:
        for container in self.containers:
            if exited_only and container.process is not None:
                continue
            if container.working:
                self.kubelet.store.remove(container.working)
                container.working = ""

    def _shutdown(self, pod: dict[str, Any]) -> None:
        """The runner stops: as a kubelet's graceful node shutdown, containers are killed and the pod fails."""
        self._kill_all(min(self.grace(pod), 5.0), "")
        if not _terminal_phase(pod):
            self.pod_reason = "Terminated"
            self.pod_message = "Pod was terminated in response to imminent node shutdown."
            self.terminal = True
            self._send_status(pod, force=True, shutdown=True)
        self._release_containers()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _delete(self, pod: dict[str, Any]) -> None:
        """The kubelet deletes a terminated pod's object with grace period 0 once its containers are gone."""
        with contextlib.suppress(ApiError):
            self.kube.request(
                "DELETE",
                f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
            )

    # -- status ---------------------------------------------------------------------------------------------

    def phase(self, pod: dict[str, Any], shutdown: bool = False) -> str:
        if shutdown:
            return "Failed"
        policy = pod["spec"].get("restartPolicy") or "Always"
        inits = [c for c in self.containers if c.init]
        mains = [c for c in self.containers if not c.init]
        for container in inits:
            if container.state == "terminated" and container.exit_code != 0 and policy == "Never":
                return "Failed"
        if self.pod_reason == "DeadlineExceeded":
            return "Failed"
        if any(not (c.state == "terminated" and c.exit_code == 0) for c in inits):
            return "Pending"
        running = waiting = stopped = succeeded = 0
        for container in mains:
            if container.state == "running":
                running += 1
            elif container.state == "terminated":
                stopped += 1
                succeeded += container.exit_code == 0
            elif container.last_state:
                stopped += 1
            else:
                waiting += 1
        if self.terminal and (running == 0):
            if waiting and not stopped:
                return "Failed"
            return "Succeeded" if stopped == succeeded and not waiting else "Failed"
        if waiting:
            return "Pending"
        if running:
            return "Running"
        if stopped:
            if policy == "Always":
                return "Running"
            if stopped == succeeded:
                return "Succeeded"
            if policy == "Never":
                return "Failed"
            return "Running"
        return "Pending"

    def desired_status(self, pod: dict[str, Any], shutdown: bool = False) -> dict[str, Any]:
        old = pod.get("status") or {}
        previous = {c.get("type"): c for c in old.get("conditions") or []}
        phase = self.phase(pod, shutdown)
        done = phase in ("Succeeded", "Failed")
        inits = [c for c in self.containers if c.init]
        mains = [c for c in self.containers if not c.init]
        now = now_rfc3339()

        def condition(kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
            status = "True" if ok else "False"
            before = previous.get(kind) or {}
            out: dict[str, Any] = {
                "type": kind,
                "status": status,
                "lastProbeTime": None,
                "lastTransitionTime": before.get("lastTransitionTime") if before.get("status") == status else now,
            }
            if reason:
                out["reason"] = reason
            if message:
                out["message"] = message
            return out

        pending_inits = [c.name for c in inits if not (c.state == "terminated" and c.exit_code == 0)]
        unready = [c.name for c in mains if not c.ready]
        gates = [g["conditionType"] for g in pod["spec"].get("readinessGates") or []]
        gates_ok = all((previous.get(g) or {}).get("status") == "True" for g in gates)
        conditions = [
            condition("PodReadyToStartContainers", self.volumes_ready and not done),
            condition(
                "Initialized",
                not pending_inits,
                "" if not pending_inits else "ContainersNotInitialized",
                "" if not pending_inits else f"containers with incomplete status: [{' '.join(pending_inits)}]",
            ),
        ]
        if done:
            conditions.append(condition("Ready", False, "PodCompleted"))
            conditions.append(condition("ContainersReady", False, "PodCompleted"))
        else:
            message = f"containers with unready status: [{' '.join(unready)}]" if unready else ""
            conditions.append(
                condition(
                    "Ready",
                    not unready and gates_ok,
                    "ContainersNotReady" if unready else ("" if gates_ok else "ReadinessGatesNotReady"),
                    message,
                )
            )
            conditions.append(
                condition("ContainersReady", not unready, "ContainersNotReady" if unready else "", message)
            )
        ours = {c["type"] for c in conditions}
        if shutdown:
            conditions.append(condition("DisruptionTarget", True, "TerminationByKubelet", self.pod_message))
            ours.add("DisruptionTarget")
        conditions += [c for c in old.get("conditions") or [] if c.get("type") not in ours]
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": conditions,
            "containerStatuses": [c.status() for c in mains],
        }
        if inits:
            status["initContainerStatuses"] = [c.status() for c in inits]
        if self.start_time:
            status["startTime"] = self.start_time
        if self.pod_reason:
            status["reason"] = self.pod_reason
            status["message"] = self.pod_message
        return status

    def _send_status(self, pod: dict[str, Any], force: bool = False, shutdown: bool = False) -> bool:
        """Patch the status when ours changed, or when someone else (kwok) wrote over it."""
        if _terminal_phase(pod) and not self.terminal:
            # terminal already (an earlier runner, or the API): nothing to run
            self.terminal = True
        status = self.desired_status(pod, shutdown)
        if _terminal_phase(pod) and status["phase"] != (pod.get("status") or {}).get("phase"):
            status["phase"] = pod["status"]["phase"]  # terminal phases are final
        signature = _signature(status)
        observed = _signature(pod.get("status") or {})
        if not force and signature == observed:
            self.sent_signature = signature
            return True
        if not force and signature == self.sent_signature and _version(pod) <= self.sent_version:
            return True
        body = {"metadata": {"uid": self.uid}, "status": status}
        try:
            updated = self.kube.request(
                "PATCH",
                f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}/status",
                body,
                content_type="application/merge-patch+json",
            )
        except ApiError as exc:
            if exc.status == 404:
                self.mark_gone()
                return True
            log.warning("Status update failed pod=%s error=%s", self.key, exc)
            return False
        except Exception as exc:
            log.warning("Status update failed pod=%s error=%s", self.key, exc)
            return False
        self.sent_signature = signature
        self.sent_version = _version(updated)
        self.update(updated)
        return True


def _terminal_phase(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _version(pod: dict[str, Any]) -> int:
    try:
        return int(pod["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


def _signature(status: dict[str, Any]) -> Any:
    def entry(s: dict[str, Any]) -> Any:
        state = s.get("state") or {}
        kind = next(iter(state), "")
        detail = state.get(kind) or {}
        return (
            s.get("name"),
            kind,
            detail.get("reason"),
            detail.get("message"),
            detail.get("exitCode"),
            bool(s.get("ready")),
            bool(s.get("started")),
            int(s.get("restartCount") or 0),
        )

    conditions = tuple(
        sorted(
            (c.get("type"), c.get("status"), c.get("reason") or "")
            for c in status.get("conditions") or []
            if c.get("type") in ("Initialized", "Ready", "ContainersReady", "PodReadyToStartContainers")
        )
    )
    return (
        status.get("phase"),
        status.get("reason") or "",
        tuple(entry(s) for s in status.get("containerStatuses") or []),
        tuple(entry(s) for s in status.get("initContainerStatuses") or []),
        conditions,
        bool(status.get("startTime")),
    )


# ------------------------------------------------------------------------------------------------------------
# The kubelet


class ImageKubelet:
    """Plays the kubelet for the pods a PodRunner in image mode hands it (:meth:`sync`, :meth:`deleted`)."""

    def __init__(self, api_client: Any, config: KubeletConfig) -> None:
        self.config = config
        self.kube = Kube(api_client)
        self.store = ImageStore(config.buildah)
        self.runner = new_runner_token()
        self.identity = f"{socket.gethostname()}/{self.runner}"
        self.services = service_env(self.kube.host, self.kube.port)
        self.workers: dict[str, PodWorker] = {}  # by pod uid
        self.done: set[str] = set()  # uids whose worker finished
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        config.workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        """Remove what earlier runners left behind, in the background: buildah can wait for its storage lock
        (a concurrent build holds it), and meanwhile the runner must claim its pods before kwok runs them."""
        _LIVE_RUNNERS.add(self.runner)  # again, after a stop
        threading.Thread(target=remove_leftovers, args=(self.store,), name="podrunner-cleanup", daemon=True).start()

    def stop(self, timeout: float = 60.0) -> None:
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.wake.set()
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(timeout=max(0.1, deadline - time.monotonic()))
        release_runner_token(self.store, self.runner)

    # -- pods from the watch ------------------------------------------------------------------------------

    def owns(self, uid: str) -> bool:
        with self.lock:
            return uid in self.workers

    def sync(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self.lock:
            worker = self.workers.get(uid)
            if worker is not None:
                worker.update(pod)
                return
            if uid in self.done or self.stopping.is_set():
                return
            owned = OWNED_ANNOTATION in (meta.get("annotations") or {})
            if _terminal_phase(pod) and not meta.get("deletionTimestamp"):
                return
            if meta.get("deletionTimestamp") and not owned:
                return  # kwok runs it, and deletes it
            if not (pod.get("spec") or {}).get("nodeName"):
                return
            for other in [w for w in self.workers.values() if w.key == f"{meta['namespace']}/{meta['name']}"]:
                other.mark_gone()  # a recreated pod of the same name
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
        worker.start()

    def deleted(self, uid: str) -> None:
        with self.lock:
            worker = self.workers.get(uid)
        if worker is not None:
            worker.mark_gone()

    def worker_done(self, worker: PodWorker) -> None:
        with self.lock:
            if self.workers.get(worker.uid) is worker:
                del self.workers[worker.uid]
            self.done.add(worker.uid)

    # -- for tests and tools ------------------------------------------------------------------------------

    def pods(self) -> dict[str, PodWorker]:
        """Active pod workers by ``namespace/name``."""
        with self.lock:
            return {w.key: w for w in self.workers.values()}

    def worker(self, name: str, namespace: str | None = None) -> PodWorker | None:
        with self.lock:
            return next(
                (w for w in self.workers.values() if w.pod_name == name and namespace in (None, w.namespace)), None
            )

    def event(self, pod: dict[str, Any], container: str | None, kind: str, reason: str, message: str) -> None:
        meta = pod["metadata"]
        now = now_rfc3339()
        involved = {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        }
        if container:
            involved["fieldPath"] = f"spec.containers{{{container}}}"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": involved,
            "reason": reason,
            "message": message[:1024],
            "type": kind,
            "source": {"component": "podrunner", "host": (pod.get("spec") or {}).get("nodeName", "")},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.kube.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", body)
        except Exception as exc:
            log.debug("Event not recorded error=%s", exc)
