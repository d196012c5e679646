"""kubelora adapter agent: the sidecar that puts verified adapter files next to a vLLM server.

vLLM's ``/v1/load_lora_adapter`` reads an adapter from a local directory. The agent runs in the
same pod and shares that directory (an emptyDir mounted at ``/adapters`` in both containers). The
operator asks the agent for an adapter by URI and digest, then tells vLLM to load the path the agent
answers. API (JSON)::

    POST   /v1/adapters          {"uri": "s3://bucket/prefix/", "digest": "sha256:<hex>"}
                                 -> 200 {"digest", "path", "uri", "files", "sizeBytes", "cached"}
    GET    /v1/adapters          -> 200 {"adapters": [{"digest", "path", "uri", "files", "sizeBytes"}, ...]}
    GET    /v1/adapters/<hex>    -> 200 one entry, or 404
    DELETE /v1/adapters/<hex>    -> 200 {"deleted": bool}
    GET    /health               -> 200 (no token: kubelet probes)
    GET    /ready                -> 200 once every adapter of the preload file was in place, else 503 (no token)

Every ``/v1`` call needs ``Authorization: Bearer <token>``, the token in ``KUBELORA_AGENT_TOKEN``: the
operator keeps it in a Secret (generated per AdapterDeployment for managed servers, named by
``spec.target.agentTokenSecretRef`` otherwise), and the agent refuses to start without one. Anything else
that reaches the pod could otherwise make the agent fetch, list or delete adapters.

A download reads ``kubelora-manifest.json`` at the URI, checks that its sha256 is the digest, then
fetches every file the manifest lists (except ``merged/``, a full merged model vLLM does not need for
LoRA serving) into a temporary directory, checks each file's size and sha256, and renames the
directory to ``<dir>/<hex>``: a directory named by a digest is always complete and verified.
Errors answer ``{"error": {"reason", "message"}}``: 400 bad request, 404 manifest or file missing,
422 verification failed, 502 storage unreachable.

Preload (``--preload FILE``, a ConfigMap the operator keeps with what the pods should serve after the last
completed rollout, ``{"<servedName>": {"uri": ..., "digest": ...}}``): on start and whenever the file changes
(the kubelet updates ConfigMap volumes in place; the agent reads it every ``--preload-interval`` seconds) the agent
downloads each entry, verified as above, and points ``<names-dir>/<servedName>`` at it with a relative symlink
swapped by rename. vLLM's filesystem LoRA resolver (``VLLM_PLUGINS=lora_filesystem_resolver``,
``VLLM_LORA_RESOLVER_CACHE_DIR=<names-dir>``) then serves ``servedName`` on its first request, with no call from
the operator. The link goes to ``views/<hex>-<base>``: the adapter's files, linked, and an ``adapter_config.json``
whose ``base_model_name_or_path`` is ``--base-model`` (vLLM's ``--model``; the resolver loads only an adapter
that names it). A name the file no longer lists loses its link. ``/ready`` is the agent container's
readinessProbe: the pod takes no traffic until what it should serve is in place.

S3 settings come from the environment, as for the trainer: ``S3_ENDPOINT`` (else
``KUBELORA_DEFAULT_S3_ENDPOINT``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``S3_SECURE``. Only
``s3://`` URIs are read: a ``file://`` path would let a caller copy any file the pod can read (its
ServiceAccount token, say) into the adapter directory.

Usage::

    python -m kubelora.serving.agent --host 0.0.0.0 --port 8001 --dir /adapters
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from aiohttp import web

log = logging.getLogger("kubelora.serving.agent")

#: The agent's port in a server pod; the operator reaches it at podIP:AGENT_PORT.
AGENT_PORT = 8001
#: Name of the agent container in a pod (the operator adds it to managed servers; podrunner looks for it).
AGENT_CONTAINER = "kubelora-agent"
#: Where the agent and vLLM share adapter files.
DEFAULT_DIR = "/adapters"
#: The environment variable the agent reads its bearer token from.
TOKEN_ENV = "KUBELORA_AGENT_TOKEN"  # noqa: S105 - a variable name
MANIFEST = "kubelora-manifest.json"
SKIPPED_PREFIXES = ("merged/",)
DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
HEX_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20
#: Under the adapter directory: per digest, the adapter as vLLM's filesystem resolver reads it.
VIEWS = "views"
#: A servedName the agent links (the API's pattern): path components, none of them ``.`` or ``..``.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


class AgentError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message

    def response(self) -> web.Response:
        return web.json_response({"error": {"reason": self.reason, "message": self.message}}, status=self.status)


class Source(Protocol):
    """Reads files under an adapter URI."""

    def read(self, uri: str, path: str) -> bytes: ...

    def download(self, uri: str, path: str, dest: Path) -> None: ...


def _child(uri: str, path: str) -> str:
    return uri if not path else uri.rstrip("/") + "/" + path


class StorageSource:
    """s3:// through MinIO's client, with the credentials from the environment."""

    def __init__(self) -> None:
        self._s3: Any = None

    def _client(self) -> Any:
        if self._s3 is None:
            from kubelora.storage import client_from_env

            env = dict(os.environ)
            if not env.get("S3_ENDPOINT") and env.get("KUBELORA_DEFAULT_S3_ENDPOINT"):
                env["S3_ENDPOINT"] = env["KUBELORA_DEFAULT_S3_ENDPOINT"]
            try:
                self._s3 = client_from_env(env)
            except KeyError as exc:
                raise AgentError(502, "StorageUnavailable", f"S3 is not configured: {exc.args[0]} is unset") from exc
        return self._s3

    def _s3_object(self, uri: str, path: str) -> tuple[str, str]:
        from kubelora.storage import parse_s3

        location = parse_s3(uri)
        key = location.child(path).key if path else location.key
        return location.bucket, key

    def read(self, uri: str, path: str) -> bytes:
        if not uri.startswith("s3://"):
            raise AgentError(400, "UnsupportedURI", f"{uri}: only s3:// URIs are supported")
        response = self._open_s3(uri, path)
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()

    def _open_s3(self, uri: str, path: str) -> Any:
        """The object's response stream, with storage errors turned into the agent's HTTP errors."""
        from minio.error import S3Error

        bucket, key = self._s3_object(uri, path)
        try:
            return self._client().get_object(bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                raise AgentError(404, "NotFound", f"{_child(uri, path)} does not exist") from exc
            raise AgentError(502, "StorageUnavailable", f"{_child(uri, path)}: {exc.code}: {exc.message}") from exc
        except Exception as exc:
            raise AgentError(502, "StorageUnavailable", f"{_child(uri, path)}: {exc}") from exc

    def download(self, uri: str, path: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        response = self._open_s3(uri, path)
        try:
            with dest.open("wb") as f:
                for chunk in response.stream(CHUNK):
                    f.write(chunk)
        except Exception as exc:
            raise AgentError(502, "StorageUnavailable", f"{_child(uri, path)}: download failed: {exc}") from exc
        finally:
            response.close()
            response.release_conn()


@dataclass
class Entry:
    digest: str
    path: Path
    uri: str
    files: int
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "path": str(self.path),
            "uri": self.uri,
            "files": self.files,
            "sizeBytes": self.size_bytes,
        }


def _file_sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _safe_relative(path: str) -> str:
    parts = PurePosixPath(path)
    if not path or parts.is_absolute() or ".." in parts.parts or path.startswith("\\"):
        raise AgentError(422, "InvalidManifest", f"the manifest lists an unsafe path {path!r}")
    return parts.as_posix()


class AdapterStore:
    """Adapter directories named by digest under ``root``."""

    def __init__(self, root: Path, source: Source | None = None) -> None:
        self.root = root
        self.source: Source = source or StorageSource()
        self._locks: dict[str, asyncio.Lock] = {}
        #: Digests the preload file names: DELETE refuses them (vLLM may resolve them at any time).
        self.pinned: Callable[[str], bool] = lambda _hex: False
        root.mkdir(parents=True, exist_ok=True)
        for partial in root.glob(".partial-*"):
            shutil.rmtree(partial, ignore_errors=True)

    def _entry(self, hex_digest: str) -> Entry | None:
        directory = self.root / hex_digest
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_bytes())
        except (OSError, ValueError):
            return None
        origin = directory / ".uri"
        files = [f for f in manifest.get("files", []) if not str(f.get("path", "")).startswith(SKIPPED_PREFIXES)]
        return Entry(
            digest=f"sha256:{hex_digest}",
            path=directory,
            uri=origin.read_text().strip() if origin.is_file() else "",
            files=len(files),
            size_bytes=sum(int(f.get("sizeBytes", 0)) for f in files),
        )

    def list(self) -> list[Entry]:
        entries = []
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and HEX_RE.match(child.name):
                entry = self._entry(child.name)
                if entry is not None:
                    entries.append(entry)
        return entries

    def get(self, hex_digest: str) -> Entry | None:
        return self._entry(hex_digest) if HEX_RE.match(hex_digest) else None

    def delete(self, hex_digest: str) -> bool:
        if not HEX_RE.match(hex_digest):
            raise AgentError(400, "InvalidDigest", f"{hex_digest!r} is not 64 lower-case hex digits")
        if self.pinned(hex_digest):
            raise AgentError(409, "InUse", f"sha256:{hex_digest} is in the preload file: it stays while listed")
        directory = self.root / hex_digest
        if not directory.exists():
            return False
        shutil.rmtree(directory)
        for view in (self.root / VIEWS).glob(f"{hex_digest}-*"):
            shutil.rmtree(view, ignore_errors=True)
        log.info("Deleted adapter digest=sha256:%s", hex_digest)
        return True

    async def ensure(self, uri: str, digest: str) -> tuple[Entry, bool]:
        """The verified adapter directory for ``digest`` (downloaded from ``uri`` if needed); True if cached."""
        match = DIGEST_RE.match(digest or "")
        if match is None:
            raise AgentError(400, "InvalidDigest", f"digest {digest!r} is not sha256:<64 lower-case hex digits>")
        if not uri or not uri.startswith("s3://"):
            raise AgentError(400, "UnsupportedURI", f"uri {uri!r}: only s3:// URIs are supported")
        hex_digest = match.group(1)
        lock = self._locks.setdefault(hex_digest, asyncio.Lock())
        async with lock:
            existing = self._entry(hex_digest)
            if existing is not None:
                return existing, True
            started = time.monotonic()
            entry = await asyncio.to_thread(self._download, uri, hex_digest)
            log.info(
                "Downloaded adapter digest=%s uri=%s files=%d bytes=%d seconds=%.2f",
                digest,
                uri,
                entry.files,
                entry.size_bytes,
                time.monotonic() - started,
            )
            return entry, False

    def _download(self, uri: str, hex_digest: str) -> Entry:
        manifest_bytes = self.source.read(uri, MANIFEST)
        if hashlib.sha256(manifest_bytes).hexdigest() != hex_digest:
            # The manifest's own digest stays unsaid: it would let a tenant probe digests it cannot read.
            raise AgentError(
                422, "DigestMismatch", f"{_child(uri, MANIFEST)} does not have the digest sha256:{hex_digest}"
            )
        try:
            manifest = json.loads(manifest_bytes)
            listed = list(manifest["files"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AgentError(422, "InvalidManifest", f"{_child(uri, MANIFEST)}: no files list ({exc})") from exc
        files = []
        for item in listed:
            path = _safe_relative(str(item.get("path", "")))
            if path.startswith(SKIPPED_PREFIXES) or path == MANIFEST:
                continue
            files.append((path, str(item.get("sha256", "")), int(item.get("sizeBytes", -1))))
        if not any(path == "adapter_config.json" for path, _, _ in files):
            raise AgentError(422, "InvalidManifest", f"{_child(uri, MANIFEST)} lists no adapter_config.json")
        partial = self.root / f".partial-{hex_digest[:16]}-{uuid.uuid4().hex[:8]}"
        partial.mkdir(parents=True)
        try:
            total = 0
            for path, expected_sha, expected_size in files:
                dest = partial / path
                self.source.download(uri, path, dest)
                sha, size = _file_sha256(dest)
                if expected_size >= 0 and size != expected_size:
                    raise AgentError(
                        422,
                        "FileSizeMismatch",
                        f"{_child(uri, path)} has {size} bytes, the manifest says {expected_size}",
                    )
                if sha != expected_sha:
                    raise AgentError(
                        422,
                        "FileDigestMismatch",
                        f"{_child(uri, path)} has sha256 {sha}, the manifest says {expected_sha}",
                    )
                total += size
            (partial / MANIFEST).write_bytes(manifest_bytes)
            (partial / ".uri").write_text(uri + "\n")
            target = self.root / hex_digest
            try:
                partial.rename(target)
            except OSError:
                if self._entry(hex_digest) is None:
                    raise
                shutil.rmtree(partial, ignore_errors=True)  # another writer finished first
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return Entry(f"sha256:{hex_digest}", target, uri, len(files), total)


class PreloadError(Exception):
    pass


def _reserved(top: str) -> bool:
    """A top-level name of the adapter directory the agent uses itself."""
    return bool(HEX_RE.match(top)) or top == VIEWS or top.startswith(".")


def read_preload(path: Path) -> dict[str, tuple[str, str]]:
    """``{servedName: (uri, digest)}`` from the preload file; a missing or empty file lists nothing."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise PreloadError(f"{path}: {exc}") from exc
    if not text.strip():
        return {}
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise PreloadError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise PreloadError(f"{path} is not a JSON object")
    out: dict[str, tuple[str, str]] = {}
    for name, item in doc.items():
        if not isinstance(item, dict):
            raise PreloadError(f"{path}: {name!r} is not an object with uri and digest")
        parts = name.split("/")
        if not NAME_RE.match(name) or any(p in ("", ".", "..") for p in parts) or _reserved(parts[0]):
            raise PreloadError(f"{path}: {name!r} cannot be a file name in the adapter directory")
        out[name] = (str(item.get("uri") or ""), str(item.get("digest") or ""))
    return out


class Preloader:
    """Keeps ``names_dir/<servedName>`` pointing at the verified adapter the preload file names."""

    def __init__(self, store: AdapterStore, file: Path, names_dir: Path, base_model: str | None = None) -> None:
        self.store = store
        self.file = file
        self.names_dir = names_dir
        self.base_model = base_model
        self.wanted: dict[str, tuple[str, str]] = {}
        self.last_error: str | None = None
        self._seen: bytes | None = None
        #: Every listed adapter was in place at least once since this container started. From then on the pod
        #: stays Ready while it catches up with a changed file: the operator rewrites the file when a rollout
        #: completes, after every pod already serves the new version at runtime, and every pod reads the same
        #: file at the same moment, so gating Ready on each change would take the whole Deployment out of
        #: service at once. Readiness gates a pod's start, not its updates.
        self.was_ready = False
        names_dir.mkdir(parents=True, exist_ok=True)
        for partial in [*(store.root / VIEWS).glob(".partial-*"), *names_dir.glob(".link-*")]:
            if partial.is_symlink():
                partial.unlink()
            else:
                shutil.rmtree(partial, ignore_errors=True)
        store.pinned = self._pinned

    def _pinned(self, hex_digest: str) -> bool:
        try:
            wanted = read_preload(self.file)
        except PreloadError:
            wanted = self.wanted
        return any(digest == f"sha256:{hex_digest}" for _, digest in wanted.values())

    def _view_name(self, hex_digest: str) -> str:
        suffix = hashlib.sha256((self.base_model or "").encode()).hexdigest()[:8]
        return f"{hex_digest}-{suffix}"

    def _link_target(self, name: str, hex_digest: str) -> str:
        views = self.store.root / VIEWS / self._view_name(hex_digest)
        return os.path.relpath(views, (self.names_dir / name).parent)

    def _links(self) -> list[str]:
        """The servedNames linked now (symlinks under names_dir, outside the agent's own entries)."""
        out = []
        for top in self.names_dir.iterdir():
            if _reserved(top.name):
                continue
            if top.is_symlink():
                out.append(top.name)
            elif top.is_dir():
                for path in top.rglob("*"):
                    if path.is_symlink():
                        out.append(path.relative_to(self.names_dir).as_posix())
        return out

    def _view(self, hex_digest: str) -> Path:
        """``views/<hex>-<base>``: links to the digest's files and an adapter_config.json naming ``base_model``."""
        views = self.store.root / VIEWS
        view = views / self._view_name(hex_digest)
        if (view / "adapter_config.json").is_file():
            return view
        views.mkdir(parents=True, exist_ok=True)
        source = self.store.root / hex_digest
        partial = views / f".partial-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        try:
            for child in source.iterdir():
                if child.name in ("adapter_config.json", ".uri"):
                    continue
                (partial / child.name).symlink_to(os.path.relpath(child, partial))
            config = json.loads((source / "adapter_config.json").read_text())
            if self.base_model:
                config["base_model_name_or_path"] = self.base_model
            (partial / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            try:
                partial.rename(view)
            except OSError:
                if not (view / "adapter_config.json").is_file():
                    raise
                shutil.rmtree(partial, ignore_errors=True)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return view

    def _link(self, name: str, hex_digest: str) -> bool:
        """Point ``name`` at the digest's view (atomically); True if it changed."""
        link = self.names_dir / name
        target = self._link_target(name, hex_digest)
        with contextlib.suppress(OSError):
            if os.readlink(link) == target:
                return False
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.parent / f".link-{uuid.uuid4().hex[:8]}"
        tmp.symlink_to(target)
        os.replace(tmp, link)
        return True

    def in_place(self, wanted: dict[str, tuple[str, str]]) -> list[str]:
        """The names of ``wanted`` that are not (yet) linked to their verified digest."""
        missing = []
        for name, (_, digest) in wanted.items():
            match = DIGEST_RE.match(digest)
            link = self.names_dir / name
            try:
                ok = match is not None and os.readlink(link) == self._link_target(name, match.group(1))
            except OSError:
                ok = False
            if not ok or not (link / "adapter_config.json").is_file():
                missing.append(name)
        return missing

    def ready(self) -> tuple[bool, str]:
        try:
            wanted = read_preload(self.file)
        except PreloadError as exc:
            return False, str(exc)
        missing = self.in_place(wanted)
        if missing:
            detail = f": {self.last_error}" if self.last_error else ""
            if self.was_ready:
                return True, f"serving; catching up, not in place yet: {', '.join(sorted(missing))}{detail}"
            return False, f"not in place yet: {', '.join(sorted(missing))}{detail}"
        self.was_ready = True
        return True, f"{len(wanted)} adapter(s) in place"

    async def sync(self) -> bool:
        """Make the links match the file; True when every entry is in place."""
        try:
            wanted = read_preload(self.file)
        except PreloadError as exc:
            self.last_error = str(exc)
            log.warning("Cannot read the preload file file=%s error=%s", self.file, exc)
            return False
        self.wanted = wanted
        errors = []
        for name, (uri, digest) in sorted(wanted.items()):
            try:
                entry, _ = await self.store.ensure(uri, digest)
                hex_digest = entry.digest.split(":", 1)[1]
                await asyncio.to_thread(self._view, hex_digest)
                if self._link(name, hex_digest):
                    log.info("Linked adapter servedName=%s digest=%s uri=%s", name, digest, uri)
            except AgentError as exc:
                errors.append(f"{name}: {exc.message}")
                log.warning(
                    "Preload failed servedName=%s digest=%s reason=%s message=%s", name, digest, exc.reason, exc
                )
            except OSError as exc:
                errors.append(f"{name}: {exc}")
                log.warning("Preload failed servedName=%s digest=%s error=%s", name, digest, exc)
        for name in self._links():
            if name not in wanted:
                (self.names_dir / name).unlink()
                log.info("Unlinked adapter servedName=%s", name)
        self.last_error = "; ".join(errors) or None
        return not errors

    def changed(self) -> bool:
        try:
            content = self.file.read_bytes()
        except OSError:
            content = b""
        if content == self._seen:
            return False
        self._seen = content
        return True

    async def run(self, interval: float = 2.0) -> None:
        """Sync at start, when the file changes, and (backing off) until a failed sync succeeds."""
        failures = 0
        next_retry = 0.0
        while True:
            now = time.monotonic()
            if self.changed() or (failures and now >= next_retry):
                if await self.sync():
                    failures = 0
                else:
                    failures += 1
                    next_retry = time.monotonic() + min(60.0, interval * 2 ** min(failures, 5))
            await asyncio.sleep(interval)


def preload() -> None:
    """Import the S3 client now, so the first download does not pay for it."""
    with contextlib.suppress(ImportError):
        import minio  # noqa: F401

        import kubelora.storage  # noqa: F401


def _authorized(request: web.Request, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def build_app(
    store: AdapterStore, token: str, preloader: Preloader | None = None, interval: float = 2.0
) -> web.Application:
    """The agent's HTTP API; every route but /health and /ready needs ``token`` as a bearer token.

    With a ``preloader``, the app keeps its links in step with the preload file while it runs."""
    if not token:
        raise ValueError(f"the agent needs a token: set {TOKEN_ENV}")

    @web.middleware
    async def require_token(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in ("/health", "/ready") and not _authorized(request, token):
            log.warning(
                "Refused unauthenticated call method=%s path=%s peer=%s", request.method, request.path, request.remote
            )
            response = AgentError(
                401, "Unauthorized", "send the agent token as Authorization: Bearer <token>"
            ).response()
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        result: web.StreamResponse = await handler(request)
        return result

    app = web.Application(middlewares=[require_token])

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200, text="ok")

    async def ready(_: web.Request) -> web.Response:
        if preloader is None:
            return web.Response(status=200, text="ok: no preload file")
        ok, message = await asyncio.to_thread(preloader.ready)
        return web.Response(status=200 if ok else 503, text=message)

    async def list_adapters(_: web.Request) -> web.Response:
        entries = await asyncio.to_thread(store.list)
        return web.json_response({"adapters": [e.to_json() for e in entries]})

    async def get_adapter(request: web.Request) -> web.Response:
        entry = await asyncio.to_thread(store.get, request.match_info["hex"])
        if entry is None:
            return AgentError(404, "NotFound", f"no adapter {request.match_info['hex']}").response()
        return web.json_response(entry.to_json())

    async def delete_adapter(request: web.Request) -> web.Response:
        try:
            deleted = await asyncio.to_thread(store.delete, request.match_info["hex"])
        except AgentError as exc:
            return exc.response()
        return web.json_response({"deleted": deleted})

    async def fetch_adapter(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return AgentError(400, "InvalidRequest", "the body is not JSON").response()
        if not isinstance(body, dict):
            return AgentError(400, "InvalidRequest", "the body must be a JSON object").response()
        uri, digest = str(body.get("uri") or ""), str(body.get("digest") or "")
        try:
            entry, cached = await store.ensure(uri, digest)
        except AgentError as exc:
            log.warning("Adapter fetch failed uri=%s digest=%s reason=%s message=%s", uri, digest, exc.reason, exc)
            return exc.response()
        return web.json_response({**entry.to_json(), "cached": cached})

    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    if preloader is not None:

        async def keep_preloaded(_: web.Application) -> Any:
            task = asyncio.create_task(preloader.run(interval))
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        app.cleanup_ctx.append(keep_preloaded)
    app.router.add_get("/v1/adapters", list_adapters)
    app.router.add_post("/v1/adapters", fetch_adapter)
    app.router.add_get("/v1/adapters/{hex}", get_adapter)
    app.router.add_delete("/v1/adapters/{hex}", delete_adapter)
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kubelora.serving.agent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="0.0.0.0", help="Address to bind (default 0.0.0.0)")  # noqa: S104
    parser.add_argument("--port", type=int, default=int(os.environ.get("KUBELORA_AGENT_PORT", AGENT_PORT)))
    parser.add_argument(
        "--dir", default=DEFAULT_DIR, help=f"Adapter directory shared with vLLM (default {DEFAULT_DIR})"
    )
    parser.add_argument(
        "--preload",
        default=os.environ.get("KUBELORA_AGENT_PRELOAD") or None,
        help="JSON file {servedName: {uri, digest}} to keep downloaded and linked (a ConfigMap volume)",
    )
    parser.add_argument(
        "--names-dir",
        default=None,
        help="Where the preloaded adapters are linked by servedName: vLLM's VLLM_LORA_RESOLVER_CACHE_DIR "
        "(default: --dir)",
    )
    parser.add_argument(
        "--base-model",
        default=None,
        help="vLLM's --model: the base_model_name_or_path its filesystem resolver wants in adapter_config.json",
    )
    parser.add_argument("--preload-interval", type=float, default=2.0, help="Seconds between reads of the file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        print(
            f"kubelora-agent: {TOKEN_ENV} is not set. The agent serves only callers that present its token; "
            "managed servers get it from the Secret the operator generates, other pods from the Secret named by "
            "spec.target.agentTokenSecretRef.",
            file=sys.stderr,
        )
        return 2
    store = AdapterStore(Path(args.dir))
    preloader = None
    if args.preload:
        preloader = Preloader(store, Path(args.preload), Path(args.names_dir or args.dir), args.base_model)
    preload()
    log.info("Starting adapter agent host=%s port=%d dir=%s preload=%s", args.host, args.port, args.dir, args.preload)
    app = build_app(store, token, preloader, args.preload_interval)
    with contextlib.suppress(KeyboardInterrupt):
        web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
