"""One pod: runs its containers and writes its status, as a kubelet's pod worker."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubelora.devenv.kubelet import hosts
from kubelora.devenv.kubelet.api import ApiError
from kubelora.devenv.kubelet.containers import Container, Probe, parse_exit, termination_message
from kubelora.devenv.kubelet.spec import Lookup, StartError, container_command, container_env, container_user
from kubelora.devenv.kubelet.store import container_name, container_pids, find_executable, run_command
from kubelora.devenv.kubelet.volumes import MountError, Volumes

if TYPE_CHECKING:
    from kubelora.devenv.kubelet.runner import ImageKubelet

log = logging.getLogger("kubelora.devenv.kubelet")

#: Set by the runner on every pod it owns; kwok's stages skip such pods (stages.yaml).
OWNED_ANNOTATION = "podrunner.kubelora.dev/owned"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        self._write_hosts(pod)
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

    @property
    def hosts_file(self) -> Path:
        return self.directory / "etc-hosts"

    def _write_hosts(self, pod: dict[str, Any]) -> None:
        """The pod's managed /etc/hosts (kubelet.hosts), rewritten in place as its subdomain's endpoints change."""
        if not hosts.managed(pod):
            return
        subdomain = (pod.get("spec") or {}).get("subdomain")
        records = self.kubelet.endpoints.records(self.namespace, subdomain) if subdomain else []
        self.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        if hosts.write_in_place(self.hosts_file, hosts.content(pod, records)) and records:
            log.info("Hosts file updated pod=%s subdomain=%s endpoints=%d", self.key, subdomain, len(records))

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
        if hosts.managed(pod) and not hosts.mounts_hosts(container.spec):
            self._write_hosts(pod)
            mounts.append((self.hosts_file, hosts.HOSTS_PATH, True))
        workdir = container.spec.get("workingDir") or image.config.get("WorkingDir") or "/"
        hostname = hosts.hostname(pod)
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
