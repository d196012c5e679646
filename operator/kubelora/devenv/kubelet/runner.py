"""The kubelet: hands the pods a PodRunner in image mode claims to one PodWorker each."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from kubelora.devenv.kubelet.api import Kube
from kubelora.devenv.kubelet.hosts import Endpoints
from kubelora.devenv.kubelet.spec import service_env
from kubelora.devenv.kubelet.store import (
    _LIVE_RUNNERS,
    ImageStore,
    new_runner_token,
    release_runner_token,
    remove_leftovers,
)
from kubelora.devenv.kubelet.worker import OWNED_ANNOTATION, KubeletConfig, PodWorker, _terminal_phase, now_rfc3339

log = logging.getLogger("kubelora.devenv.kubelet")


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
        self.endpoints = Endpoints(self.kube)  # the cluster DNS of headless Services, for pods' /etc/hosts
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
