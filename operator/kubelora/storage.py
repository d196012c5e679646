"""Storage, shared by the operator, the serving agent and the trainer: one URI parser, one S3 client factory.

URIs: ``s3://`` (MinIO client), ``pvc://`` and ``file://`` (local paths) and ``hf://`` (model hub cache), each
parsed into a :class:`Location` (``parse_uri``; ``parse_s3`` for the callers that take object storage only).
``pvc://claim/path`` is ``/mnt/pvc/<claim>/<path>`` (``KUBELORA_PVC_ROOT`` overrides the root).

Clients: ``make_client`` builds every ``minio.Minio`` here, on a urllib3 pool with connect and read timeouts
and retries of connection errors and 5xx answers (``TRANSFER_TIMEOUTS`` by default, for big transfers;
``QUICK_TIMEOUTS`` for the operator's small reads). Its settings come from a Secret's keys (``client_from_env``: the
operator and the agent) or, for the trainer, from the environment (``minio_client``): ``S3_ENDPOINT``
(``host:port`` or a URL), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``S3_SECURE`` (default false, or true
for an ``https://`` endpoint) and ``S3_REGION``. Each can be given per role with a prefix (``BASE_MODEL_``,
``DATASET_``, ``OUTPUT_``), e.g. ``OUTPUT_AWS_ACCESS_KEY_ID``, when the spec uses different secrets for the base
model, the dataset and the output; ``KUBELORA_DEFAULT_S3_ENDPOINT`` is the endpoint when none is set (the operator
sets it when the Secret has no ``endpoint`` key).

Every trainer transfer (``Store``) is verified: downloads against the listed size and, for single-part objects,
the ETag (an MD5) or an expected sha256; uploads by stat-ing the object (size, ETag) and, when asked, by
downloading it again and comparing sha256.

Also the published layout under a LoRAJob's ``spec.output.uri`` (docs/trainer.md), which the trainer writes
and the operator cleans up::

    sha256/<hex>/                 one adapter, content-addressed: its manifest's sha256 is sha256:<hex>
    sha256/<hex>/kubelora-manifest.json
    kubelora-latest.json          the pointer: the digest and directory of the newest adapter published here
    checkpoints/                  resumable checkpoints of the run
    _kubelora/<uid>/              a LoRAJob's report (progress.json, result.json)

No torch here, and minio is imported only when a client is made.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

# Dependency-free, and in every image: the trainer reports these with their reason and exit code
from kubelora.trainer.errors import StorageError, VerificationError

log = logging.getLogger(__name__)

MANIFEST = "kubelora-manifest.json"
POINTER = "kubelora-latest.json"
POINTER_KIND = "AdapterPointer"
DIGEST_DIR = "sha256"
CHECKPOINTS_DIR = "checkpoints"
REPORTS_DIR = "_kubelora"
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")

CHUNK = 1 << 20
ROLES = ("BASE_MODEL", "DATASET", "OUTPUT")


def digest_hex(digest: str) -> str:
    """``sha256:<hex>`` → ``<hex>``; ValueError for anything else (a digest never becomes a path unchecked)."""
    match = _DIGEST.match(digest or "")
    if match is None:
        raise ValueError(f"Not a sha256:<64 hex digits> digest: {digest!r}")
    return match.group(1)


def digest_dir(output_uri: str, digest: str) -> str:
    """Where the adapter with this digest is published under the output URI: ``<output>/sha256/<hex>/``."""
    return f"{output_uri.rstrip('/')}/{DIGEST_DIR}/{digest_hex(digest)}/"


# --------------------------------------------------------------------------------------------------------------------
# URIs


@dataclasses.dataclass(frozen=True)
class Location:
    """A parsed storage URI. ``key`` is the object key (s3), the path (file/pvc) or repo id (hf).

    For ``s3://`` it is the bucket/key view the operator works with: ``str()`` is the URI, ``is_bucket_root``
    says there is no key prefix.
    """

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

    def __str__(self) -> str:
        return self.uri

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

    @property
    def is_bucket_root(self) -> bool:
        """No key prefix (``s3://bucket`` or ``s3://bucket/``): the whole bucket."""
        return not self.key.strip("/")


#: The operator's name for an ``s3://`` Location (what ``parse_s3`` returns).
S3Location = Location


def parse_uri(uri: str) -> Location:
    """Any storage URI → Location; StorageError for an unsupported scheme or a missing bucket, claim or path."""
    parsed = urlparse(uri)
    scheme = parsed.scheme
    if scheme == "s3":
        # Not urlparse's netloc/path: an object key may hold "?" and "#"
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket:
            raise StorageError(f"{uri}: missing bucket")
        return Location("s3", bucket, key.lstrip("/"))
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


def parse_s3(uri: str) -> Location:
    """An ``s3://`` URI → Location; ValueError for any other URI (the operator reads object storage only)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"Not an s3:// URI: {uri!r}")
    try:
        return parse_uri(uri)
    except StorageError as exc:
        raise ValueError(f"No bucket in {uri!r}") from exc


def pvc_root() -> Path:
    return Path(os.environ.get("KUBELORA_PVC_ROOT", "/mnt/pvc"))


def local_path(loc: Location) -> Path:
    if loc.scheme == "file":
        return Path(loc.key)
    if loc.scheme == "pvc":
        return pvc_root() / loc.bucket / loc.key
    raise StorageError(f"{loc.uri} is not a local path")


# --------------------------------------------------------------------------------------------------------------------
# S3 clients


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Seconds to connect, and to wait for each read of a response (not for a whole transfer); how often a
    connection error or a 5xx answer is retried (0.2 s backoff, doubling), and whether a read that timed out is."""

    connect: float
    read: float
    retries: int = 5
    retry_reads: bool = True


#: The default, MinIO's own retries: the trainer's and the agent's big transfers.
TRANSFER_TIMEOUTS = Timeouts(connect=5.0, read=60.0)
#: The operator's small reads (reports, config.json, manifests): a dead endpoint costs seconds, not a worker.
QUICK_TIMEOUTS = Timeouts(connect=3.0, read=15.0, retries=1, retry_reads=False)


def http_client(timeouts: Timeouts = TRANSFER_TIMEOUTS, maxsize: int = 10) -> Any:
    """The urllib3 pool under a client: MinIO's own settings (CA bundle, ``SSL_CERT_FILE``) with these timeouts
    and retries instead of its 5 minutes. One pool may be shared by many clients (``make_client(http=...)``)."""
    import certifi
    import urllib3

    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=timeouts.connect, read=timeouts.read),
        maxsize=maxsize,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(
            total=timeouts.retries,
            read=None if timeouts.retry_reads else 0,
            backoff_factor=0.2,
            status_forcelist=[500, 502, 503, 504],
        ),
    )


def make_client(
    endpoint: str,
    access_key: str | None,
    secret_key: str | None,
    secure: bool = False,
    *,
    session_token: str | None = None,
    region: str | None = None,
    timeouts: Timeouts = TRANSFER_TIMEOUTS,
    http: Any | None = None,
) -> Any:
    """A ``minio.Minio`` for ``endpoint`` (``host:port`` or a URL; an ``https://`` one is always secure).

    ``timeouts`` defaults to ``TRANSFER_TIMEOUTS``; pass ``QUICK_TIMEOUTS`` (or your own) for small reads, or
    ``http``, a pool from ``http_client`` shared by several clients (then ``timeouts`` is not used).
    """
    try:
        from minio import Minio
    except ImportError as e:  # pragma: no cover - minio is an operator and trainer dependency
        raise StorageError("s3:// needs the minio package") from e
    host = urlparse(endpoint).netloc if "://" in endpoint else endpoint
    return Minio(
        host,
        access_key=access_key,
        secret_key=secret_key,
        session_token=session_token,
        region=region,
        secure=secure or endpoint.startswith("https://"),
        http_client=http if http is not None else http_client(timeouts),
    )


def client_from_env(
    env: dict[str, str] | None = None, *, timeouts: Timeouts = TRANSFER_TIMEOUTS, http: Any | None = None
) -> Any:
    """A client from a Secret's keys in env form (``S3_ENDPOINT``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``S3_SECURE``); KeyError names a missing one. The operator's and the agent's form."""
    source = os.environ if env is None else env
    return make_client(
        source["S3_ENDPOINT"],
        source["AWS_ACCESS_KEY_ID"],
        source["AWS_SECRET_ACCESS_KEY"],
        source.get("S3_SECURE", "false").lower() == "true",
        timeouts=timeouts,
        http=http,
    )


def _env(role: str | None, name: str) -> str | None:
    if role:
        v = os.environ.get(f"{role}_{name}")
        if v:
            return v
    return os.environ.get(name)


def minio_client(role: str | None = None, *, timeouts: Timeouts = TRANSFER_TIMEOUTS) -> Any:
    """A client for the role's endpoint and credentials in the process environment (see the module doc): the
    trainer's form. StorageError when there is no endpoint; no keys is an anonymous client."""
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
    return make_client(
        endpoint,
        _env(role, "AWS_ACCESS_KEY_ID"),
        _env(role, "AWS_SECRET_ACCESS_KEY"),
        secure,
        session_token=_env(role, "AWS_SESSION_TOKEN"),
        region=_env(role, "S3_REGION") or _env(role, "AWS_REGION"),
        timeouts=timeouts,
    )


# --------------------------------------------------------------------------------------------------------------------
# The operator's helpers: a client and a bucket/key Location


def read_json(client: Any, location: Location) -> Any | None:
    """The JSON object at `location`, or None when it does not exist."""
    from minio.error import S3Error

    try:
        response = client.get_object(location.bucket, location.key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchBucket"):
            return None
        raise
    try:
        return json.loads(response.read())
    finally:
        response.close()
        response.release_conn()


def delete_object(client: Any, location: Location) -> None:
    """Remove one object; an absent one is no error (S3 answers a delete of a missing key with success)."""
    client.remove_object(location.bucket, location.key)


def delete_prefix(client: Any, location: Location) -> int:
    """Remove every object under `location` (a prefix); returns how many there were. An empty key is the bucket."""
    from minio.deleteobjects import DeleteObject

    prefix = location.key if not location.key or location.key.endswith("/") else location.key + "/"
    names = [obj.object_name for obj in client.list_objects(location.bucket, prefix=prefix, recursive=True)]
    errors = list(client.remove_objects(location.bucket, [DeleteObject(name) for name in names]))
    if errors:
        raise RuntimeError(f"Could not delete {len(errors)} objects under {location}: {errors[0]}")
    return len(names)


# --------------------------------------------------------------------------------------------------------------------
# Stores: verified transfers (the trainer's)


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


def _commit(
    tmp: Path, dest: Path, loc: Location, got: Hashes, *, size: int | None, etag: str | None, sha256: str | None
) -> Hashes:
    """Move a finished download into place once it matches what was expected; otherwise drop it."""
    try:
        _check(loc.uri, got, size=size, etag=etag, sha256=sha256)
    except VerificationError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dest)
    return got


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
        return _commit(tmp, dest, loc, h, size=size, etag=etag, sha256=sha256)

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
        return _commit(tmp, dest, loc, h, size=size, etag=None, sha256=sha256)

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
