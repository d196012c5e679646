"""The pod's volumes as host directories (emptyDir, hostPath, PVC, secret, configMap, downwardAPI, projected)."""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubelora.devenv.kubelet.api import ApiError, Kube
from kubelora.devenv.kubelet.spec import Lookup, StartError, expand, pod_field, resource_field

if TYPE_CHECKING:
    from kubelora.devenv.kubelet.worker import PodWorker

SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_SA_VOLUME = "kube-api-access-podrunner"


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
