"""The pod's /etc/hosts, as the kubelet manages it, plus the cluster DNS names a headless Service gives its pods.

The kubelet writes every pod's /etc/hosts (not for hostNetwork pods): localhost, the pod's own IP under its
hostname (``<hostname>.<subdomain>.<namespace>.svc.cluster.local <hostname>`` with a subdomain), and the pod's
``hostAliases``. Other pods' names come from the cluster DNS, which the dev cluster does not run. So, for a pod
with ``spec.subdomain``, this file also carries what CoreDNS would answer for that headless Service: the
endpoints of the Service named by the subdomain, in the pod's namespace, as the EndpointSlice controller picks
them (pods its selector matches, with an IP, not terminal, ready or with ``publishNotReadyAddresses``; a
hostname for pods whose ``spec.subdomain`` is the Service's name) give ``<hostname>.<service>``,
``...<namespace>``, ``...svc`` and ``...svc.cluster.local`` (the short forms stand in for resolv.conf's search
path), and the Service's own names resolve to its endpoints. They are read from the Service and its pods: the
API refuses loopback addresses in EndpointSlices, so the controller cannot publish the dev cluster's pod IPs.
Without the Service, other pods' names do not resolve, as in a cluster.

The pod's own line carries those short forms too, from its own spec: its name must resolve to its IP as soon
as it runs (torchrun's agent on pod 0 decides whether it serves the rendezvous by resolving the endpoint),
before the endpoints list it (a cluster's DNS has the same delay).

The file is bind-mounted read-only; :func:`write_in_place` rewrites it in place (a bind mount holds the inode)
as endpoints appear, so names resolve once the peer pods have IPs, whichever pod starts first.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from kubelora.devenv.kubelet.api import ApiError, Kube

HOSTS_PATH = "/etc/hosts"
CLUSTER_DOMAIN = "cluster.local"
_HEADER = [
    "# Kubernetes-managed hosts file.",
    "127.0.0.1\tlocalhost",
    "::1\tlocalhost ip6-localhost ip6-loopback",
    "fe00::0\tip6-localnet",
    "fe00::0\tip6-mcastprefix",
    "fe00::1\tip6-allnodes",
    "fe00::2\tip6-allrouters",
]

#: An endpoint of a headless Service: (its hostname or "", its address).
Record = tuple[str, str]


def managed(pod: dict[str, Any]) -> bool:
    """Whether the kubelet manages this pod's /etc/hosts: not for hostNetwork pods, nor when a container mounts
    something at /etc/hosts itself (per container: see :func:`mounts_hosts`)."""
    return not (pod.get("spec") or {}).get("hostNetwork")


def mounts_hosts(container: dict[str, Any]) -> bool:
    return any(str(m.get("mountPath", "")).rstrip("/") == HOSTS_PATH for m in container.get("volumeMounts") or [])


def hostname(pod: dict[str, Any]) -> str:
    """The pod's hostname: ``spec.hostname``, else its name (at most 63 characters), as the kubelet sets it."""
    return str((pod.get("spec") or {}).get("hostname") or pod["metadata"]["name"])[:63]


def name_forms(host: str, service: str, namespace: str) -> list[str]:
    """``<host>.<service>`` under the namespace, fully qualified first (the canonical name)."""
    base = f"{host}.{service}" if host else service
    return [f"{base}.{namespace}.svc.{CLUSTER_DOMAIN}", f"{base}.{namespace}.svc", f"{base}.{namespace}", base]


def content(pod: dict[str, Any], records: list[Record]) -> str:
    """The hosts file of ``pod``, with ``records`` (the endpoints of the Service its subdomain names)."""
    meta, spec = pod["metadata"], pod.get("spec") or {}
    namespace = meta["namespace"]
    ip = (pod.get("status") or {}).get("podIP") or ""
    host = hostname(pod)
    subdomain = spec.get("subdomain") or ""
    lines = list(_HEADER)
    if ip:
        names = [*name_forms(host, subdomain, namespace), host] if subdomain else [host]
        lines.append(f"{ip}\t" + "\t".join(names))
    aliases = spec.get("hostAliases") or []
    if aliases:
        lines.append("")
        lines.append("# Entries added by HostAliases.")
        for alias in aliases:
            if alias.get("ip") and alias.get("hostnames"):
                lines.append(f"{alias['ip']}\t" + "\t".join(alias["hostnames"]))
    if subdomain and records:
        lines.append("")
        lines.append(f"# podrunner: what cluster DNS answers for headless Service {namespace}/{subdomain}")
        for name, address in records:
            if name:
                lines.append(f"{address}\t" + "\t".join(name_forms(name, subdomain, namespace)))
        for _, address in records:
            lines.append(f"{address}\t" + "\t".join(name_forms("", subdomain, namespace)))
    return "\n".join(lines) + "\n"


def write_in_place(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` keeping its inode (a bind mount of the file sees it); True when it changed.

    New lines are appended when the old text is a prefix of the new, so a reader never sees a half-written line
    it had read whole before."""
    data = text.encode()
    if not path.exists():
        path.write_bytes(data)
        path.chmod(0o644)
        return True
    with path.open("r+b") as handle:
        old = handle.read()
        if old == data:
            return False
        if data.startswith(old):
            handle.write(data[len(old) :])
        else:
            handle.seek(0)
            handle.write(data)
            handle.truncate()
    return True


class Endpoints:
    """The endpoints of headless Services, as the EndpointSlice controller would list them and CoreDNS serve them,
    cached briefly.

    Read from the Service and its pods rather than from its EndpointSlices: the dev cluster's pod IPs are on
    loopback, which the API refuses in an EndpointSlice, so the controller cannot publish them there.
    """

    def __init__(self, kube: Kube, ttl: float = 1.0) -> None:
        self.kube = kube
        self.ttl = ttl
        self._cache: dict[tuple[str, str], tuple[float, list[Record]]] = {}
        self._lock = threading.Lock()

    def records(self, namespace: str, service: str) -> list[Record]:
        key = (namespace, service)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and time.monotonic() - cached[0] < self.ttl:
                return cached[1]
        found = self._read(namespace, service)
        with self._lock:
            self._cache[key] = (time.monotonic(), found)
        return found

    def _read(self, namespace: str, service: str) -> list[Record]:
        try:
            svc = self.kube.get(f"/api/v1/namespaces/{namespace}/services/{service}")
            selector = ((svc or {}).get("spec") or {}).get("selector") or {}
            if not selector:
                return []  # no Service, or one without a selector: no endpoints from pods
            pods = self.kube.request(
                "GET",
                f"/api/v1/namespaces/{namespace}/pods",
                query={"labelSelector": ",".join(f"{k}={v}" for k, v in sorted(selector.items()))},
            )
        except ApiError:
            return []
        return service_records(svc, pods.get("items") or [])


def service_records(service: dict[str, Any], pods: list[dict[str, Any]]) -> list[Record]:
    """(hostname, address) of a Service's endpoints among ``pods`` (those its selector matches), sorted: pods with
    an IP that are not terminal, ready or with ``publishNotReadyAddresses``; the hostname when the pod's
    ``spec.subdomain`` names the Service (the EndpointSlice controller's rules)."""
    meta, spec = service["metadata"], service.get("spec") or {}
    publish_not_ready = bool(spec.get("publishNotReadyAddresses"))
    out: dict[str, str] = {}
    for pod in pods:
        status, pod_spec = pod.get("status") or {}, pod.get("spec") or {}
        if pod["metadata"].get("namespace", meta.get("namespace")) != meta.get("namespace"):
            continue
        if not status.get("podIP") or status.get("phase") in ("Succeeded", "Failed"):
            continue
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if pod["metadata"].get("deletionTimestamp") and not publish_not_ready:
            continue
        if not (ready or publish_not_ready):
            continue
        name = ""
        if pod_spec.get("hostname") and pod_spec.get("subdomain") == meta["name"]:
            name = str(pod_spec["hostname"])
        out[str(status["podIP"])] = name
    return sorted(((name, address) for address, name in out.items()), key=lambda r: (r[0], r[1]))
