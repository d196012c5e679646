"""Storage URIs: ``s3://`` (MinIO client), ``pvc://`` and ``file://`` (local paths) and ``hf://`` (model hub cache).

S3 endpoint and credentials come from the environment: ``S3_ENDPOINT`` (``host:port`` or a URL),
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``S3_SECURE`` (default false, or true for an
``https://`` endpoint) and ``S3_REGION``. Each can be given per role with a prefix (``BASE_MODEL_``,
``DATASET_``, ``OUTPUT_``), e.g. ``OUTPUT_AWS_ACCESS_KEY_ID``, when the spec uses different
secrets for the base model, the dataset and the output; ``KUBELORA_DEFAULT_S3_ENDPOINT`` is the
endpoint when none is set (the operator sets it when the Secret has no ``endpoint`` key). ``pvc://claim/path`` is
``/mnt/pvc/<claim>/<path>`` (``KUBELORA_PVC_ROOT`` overrides the root).

Every transfer is verified: downloads against the listed size and, for single-part objects, the
ETag (an MD5) or an expected sha256; uploads by stat-ing the object (size, ETag) and, when asked,
by downloading it again and comparing sha256.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from kubelora.trainer.errors import StorageError, VerificationError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
ROLES = ("BASE_MODEL", "DATASET", "OUTPUT")


@dataclasses.dataclass(frozen=True)
class Location:
    """A parsed storage URI. ``key`` is the object key (s3), the path (file/pvc) or repo id (hf)."""

    scheme: str
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}"
        if self.scheme == "pvc":
            return f"pvc://{self.bucket}/{self.key}"
        if self.scheme == "hf":
            return f"hf://{self.key}"
        return f"file://{self.key}"

    def child(self, *parts: str) -> Location:
        rel = "/".join(p.strip("/") for p in parts if p.strip("/"))
        base = self.key.rstrip("/")
        return dataclasses.replace(self, key=f"{base}/{rel}" if base else rel)

    @property
    def name(self) -> str:
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        return self.scheme in ("file", "pvc")


def parse_uri(uri: str) -> Location:
    parsed = urlparse(uri)
    scheme = parsed.scheme
    if scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri}: missing bucket")
        return Location("s3", parsed.netloc, parsed.path.lstrip("/"))
    if scheme == "pvc":
        if not parsed.netloc:
            raise StorageError(f"{uri}: missing claim name")
        return Location("pvc", parsed.netloc, parsed.path.lstrip("/"))
    if scheme == "file":
        path = uri[len("file://") :]
        if not path:
            raise StorageError(f"{uri}: missing path")
        return Location("file", "", path)
    if scheme == "hf":
        repo = uri[len("hf://") :].strip("/")
        if not repo:
            raise StorageError(f"{uri}: missing repository id")
        return Location("hf", "", repo)
    raise StorageError(f"{uri}: unsupported scheme {scheme!r} (use s3, pvc, file or hf)")


def pvc_root() -> Path:
    return Path(os.environ.get("KUBELORA_PVC_ROOT", "/mnt/pvc"))


def local_path(loc: Location) -> Path:
    if loc.scheme == "file":
        return Path(loc.key)
    if loc.scheme == "pvc":
        return pvc_root() / loc.bucket / loc.key
    raise StorageError(f"{loc.uri} is not a local path")


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One stored file: ``name`` is relative to the listed prefix."""

    name: str
    size: int
    etag: str | None = None


class Hashes:
    def __init__(self) -> None:
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes) -> None:
        self.md5.update(data)
        self.sha256.update(data)
        self.size += len(data)


def file_hashes(path: Path) -> Hashes:
    h = Hashes()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h


def sha256_file(path: Path) -> str:
    return file_hashes(path).sha256.hexdigest()


def _single_part_md5(etag: str | None) -> str | None:
    """A single-part S3 ETag is the MD5 of the content; multipart ones end in ``-N``."""
    if not etag:
        return None
    etag = etag.strip('"').lower()
    if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag):
        return etag
    return None


def _check(what: str, got: Hashes, *, size: int | None, etag: str | None, sha256: str | None) -> None:
    if size is not None and got.size != size:
        raise VerificationError(f"{what}: size {got.size} does not match the expected {size}")
    md5 = _single_part_md5(etag)
    if md5 is not None and got.md5.hexdigest() != md5:
        raise VerificationError(f"{what}: MD5 {got.md5.hexdigest()} does not match the ETag {md5}")
    if sha256 is not None and got.sha256.hexdigest() != sha256.removeprefix("sha256:"):
        raise VerificationError(f"{what}: sha256 {got.sha256.hexdigest()} does not match the expected {sha256}")


class Store(Protocol):
    def list(self, loc: Location) -> list[ObjectInfo]: ...
    def stat(self, loc: Location) -> ObjectInfo | None: ...
    def download(
        self, loc: Location, dest: Path, *, size: int | None = None, etag: str | None = None, sha256: str | None = None
    ) -> Hashes: ...
    def upload(self, path: Path, loc: Location, *, verify_download: bool = False, content_type: str = "") -> Hashes: ...
    def get_bytes(self, loc: Location) -> bytes | None: ...
    def put_bytes(self, loc: Location, data: bytes, content_type: str = "application/json") -> None: ...
    def delete_prefix(self, loc: Location) -> int: ...
    def delete(self, loc: Location) -> None: ...


def _env(role: str | None, name: str) -> str | None:
    if role:
        v = os.environ.get(f"{role}_{name}")
        if v:
            return v
    return os.environ.get(name)


def minio_client(role: str | None = None) -> Any:
    """A ``minio.Minio`` for the role's endpoint and credentials (see the module doc)."""
    try:
        from minio import Minio
    except ImportError as e:  # pragma: no cover - minio is a trainer dependency
        raise StorageError("s3:// needs the minio package") from e
    endpoint = (
        _env(role, "S3_ENDPOINT") or _env(role, "AWS_ENDPOINT_URL") or os.environ.get("KUBELORA_DEFAULT_S3_ENDPOINT")
    )
    if not endpoint:
        raise StorageError("s3:// needs S3_ENDPOINT (host:port or URL)")
    secure_env = _env(role, "S3_SECURE")
    secure = False
    if "://" in endpoint:
        parsed = urlparse(endpoint)
        secure = parsed.scheme == "https"
        endpoint = parsed.netloc
    if secure_env is not None:
        secure = secure_env.strip().lower() in ("1", "true", "yes", "on")
    return Minio(
        endpoint,
        access_key=_env(role, "AWS_ACCESS_KEY_ID"),
        secret_key=_env(role, "AWS_SECRET_ACCESS_KEY"),
        session_token=_env(role, "AWS_SESSION_TOKEN"),
        region=_env(role, "S3_REGION") or _env(role, "AWS_REGION"),
        secure=secure,
    )


class S3Store:
    def __init__(self, client: Any) -> None:
        self.client = client

    def _err(self, what: str, loc: Location, e: Exception) -> StorageError:
        return StorageError(f"{what} {loc.uri}: {e}")

    def list(self, loc: Location) -> list[ObjectInfo]:
        prefix = loc.key.rstrip("/") + "/" if loc.key else ""
        try:
            objs = list(self.client.list_objects(loc.bucket, prefix=prefix, recursive=True))
        except Exception as e:
            raise self._err("Listing", loc, e) from e
        out = []
        for o in objs:
            if o.is_dir:
                continue
            out.append(ObjectInfo(o.object_name[len(prefix) :], int(o.size or 0), o.etag))
        return out

    def stat(self, loc: Location) -> ObjectInfo | None:
        from minio.error import S3Error

        try:
            st = self.client.stat_object(loc.bucket, loc.key)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound"):
                return None
            raise self._err("Stat", loc, e) from e
        except Exception as e:
            raise self._err("Stat", loc, e) from e
        return ObjectInfo(loc.name, int(st.size or 0), st.etag)

    def download(
        self, loc: Location, dest: Path, *, size: int | None = None, etag: str | None = None, sha256: str | None = None
    ) -> Hashes:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        h = Hashes()
        try:
            resp = self.client.get_object(loc.bucket, loc.key)
            try:
                with tmp.open("wb") as f:
                    for chunk in resp.stream(CHUNK):
                        h.update(chunk)
                        f.write(chunk)
            finally:
                resp.close()
                resp.release_conn()
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise self._err("Downloading", loc, e) from e
        try:
            _check(loc.uri, h, size=size, etag=etag, sha256=sha256)
        except VerificationError:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(dest)
        return h

    def upload(self, path: Path, loc: Location, *, verify_download: bool = False, content_type: str = "") -> Hashes:
        local = file_hashes(path)
        try:
            self.client.fput_object(
                loc.bucket, loc.key, str(path), content_type=content_type or "application/octet-stream"
            )
        except Exception as e:
            raise self._err("Uploading to", loc, e) from e
        st = self.stat(loc)
        if st is None:
            raise VerificationError(f"{loc.uri}: missing right after upload")
        if st.size != local.size:
            raise VerificationError(f"{loc.uri}: stored size {st.size} differs from the local {local.size}")
        md5 = _single_part_md5(st.etag)
        if md5 is not None and md5 != local.md5.hexdigest():
            raise VerificationError(f"{loc.uri}: stored ETag {md5} differs from the local MD5")
        if verify_download:
            with tempfile.TemporaryDirectory(prefix="kubelora-verify-") as d:
                self.download(loc, Path(d) / "blob", size=local.size, sha256=local.sha256.hexdigest())
        return local

    def get_bytes(self, loc: Location) -> bytes | None:
        from minio.error import S3Error

        try:
            resp = self.client.get_object(loc.bucket, loc.key)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject"):
                return None
            raise self._err("Reading", loc, e) from e
        except Exception as e:
            raise self._err("Reading", loc, e) from e
        try:
            return bytes(resp.read())
        finally:
            resp.close()
            resp.release_conn()

    def put_bytes(self, loc: Location, data: bytes, content_type: str = "application/json") -> None:
        try:
            self.client.put_object(loc.bucket, loc.key, io.BytesIO(data), len(data), content_type=content_type)
        except Exception as e:
            raise self._err("Writing", loc, e) from e

    def delete(self, loc: Location) -> None:
        try:
            self.client.remove_object(loc.bucket, loc.key)
        except Exception as e:
            raise self._err("Deleting", loc, e) from e

    def delete_prefix(self, loc: Location) -> int:
        from minio.deleteobjects import DeleteObject

        names = [loc.key.rstrip("/") + "/" + o.name for o in self.list(loc)]
        if not names:
            return 0
        try:
            errors = list(self.client.remove_objects(loc.bucket, [DeleteObject(n) for n in names]))
        except Exception as e:
            raise self._err("Deleting", loc, e) from e
        if errors:
            raise StorageError(f"Deleting {loc.uri}: {errors[0]}")
        return len(names)


class LocalStore:
    """``file://`` and ``pvc://``: plain files, written atomically (temp file + rename)."""

    def list(self, loc: Location) -> list[ObjectInfo]:
        root = local_path(loc)
        if not root.is_dir():
            return []
        return [
            ObjectInfo(p.relative_to(root).as_posix(), p.stat().st_size)
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".part")
        ]

    def stat(self, loc: Location) -> ObjectInfo | None:
        p = local_path(loc)
        return ObjectInfo(loc.name, p.stat().st_size) if p.is_file() else None

    def download(
        self, loc: Location, dest: Path, *, size: int | None = None, etag: str | None = None, sha256: str | None = None
    ) -> Hashes:
        src = local_path(loc)
        if not src.is_file():
            raise StorageError(f"{loc.uri}: no such file ({src})")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        h = Hashes()
        with src.open("rb") as fi, tmp.open("wb") as fo:
            while chunk := fi.read(CHUNK):
                h.update(chunk)
                fo.write(chunk)
        try:
            _check(loc.uri, h, size=size, etag=None, sha256=sha256)
        except VerificationError:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(dest)
        return h

    def upload(self, path: Path, loc: Location, *, verify_download: bool = False, content_type: str = "") -> Hashes:
        dest = local_path(loc)
        local = file_hashes(path)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        except OSError as e:
            raise StorageError(f"Writing {loc.uri}: {e.strerror or e}") from e
        stored = file_hashes(dest)
        _check(loc.uri, stored, size=local.size, etag=None, sha256=local.sha256.hexdigest())
        return local

    def get_bytes(self, loc: Location) -> bytes | None:
        p = local_path(loc)
        try:
            return p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"Reading {loc.uri}: {e.strerror or e}") from e

    def put_bytes(self, loc: Location, data: bytes, content_type: str = "application/json") -> None:
        dest = local_path(loc)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        except OSError as e:
            raise StorageError(f"Writing {loc.uri}: {e.strerror or e}") from e

    def delete(self, loc: Location) -> None:
        try:
            local_path(loc).unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"Deleting {loc.uri}: {e.strerror or e}") from e

    def delete_prefix(self, loc: Location) -> int:
        root = local_path(loc)
        if not root.exists():
            return 0
        n = sum(1 for p in root.rglob("*") if p.is_file())
        shutil.rmtree(root, ignore_errors=True)
        return n


_clients: dict[str | None, S3Store] = {}
_clients_lock = threading.Lock()


def store_for(loc: Location, role: str | None = None) -> Store:
    """The store for a location; ``role`` picks role-prefixed S3 credentials when set."""
    if loc.is_local:
        return LocalStore()
    if loc.scheme == "s3":
        with _clients_lock:
            if role not in _clients:
                _clients[role] = S3Store(minio_client(role))
            return _clients[role]
    raise StorageError(f"{loc.uri}: {loc.scheme}:// cannot be read or written as objects here")


def matches(name: str, patterns: Iterable[str]) -> bool:
    base = name.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(base, p) for p in patterns)


def download_tree(
    loc: Location,
    dest: Path,
    *,
    role: str | None = None,
    include: Callable[[str], bool] = lambda _n: True,
    workers: int | None = None,
) -> list[ObjectInfo]:
    """Download every object under ``loc`` into ``dest`` in parallel, each verified. Returns what was fetched.

    A file already in ``dest`` with the right size (and MD5, for single-part objects) is kept.
    """
    store = store_for(loc, role)
    objects = [o for o in store.list(loc) if include(o.name)]
    workers = workers or int(os.environ.get("KUBELORA_DOWNLOAD_WORKERS", "8"))

    def one(obj: ObjectInfo) -> None:
        target = dest / obj.name
        if target.is_file() and target.stat().st_size == obj.size:
            md5 = _single_part_md5(obj.etag)
            if md5 is None or file_hashes(target).md5.hexdigest() == md5:
                return
        store.download(loc.child(obj.name), target, size=obj.size, etag=obj.etag)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(one, o) for o in objects]
        for f in concurrent.futures.as_completed(futures):
            f.result()
    return objects


def upload_tree(src: Path, loc: Location, *, role: str | None = None, workers: int | None = None) -> list[str]:
    """Upload every file under ``src`` to ``loc`` in parallel (each verified). Returns relative names."""
    store = store_for(loc, role)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    names = [p.relative_to(src).as_posix() for p in files]
    workers = workers or int(os.environ.get("KUBELORA_UPLOAD_WORKERS", "4"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(store.upload, p, loc.child(n)) for p, n in zip(files, names, strict=True)]
        for f in concurrent.futures.as_completed(futures):
            f.result()
    return names
