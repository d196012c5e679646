"""In-memory stand-ins for the self-service API's Kubernetes and S3 clients, for tests that need no cluster.

``FakeKube`` has the methods of ``kubelora.selfservice.kube.Kube`` the API calls; tokens are ``good-<namespace>``
(anything else is a 401), and a review is denied when its ``(verb, resource, group)`` is in ``denied``.
``FakeS3`` is the part of ``minio.Minio`` the API uses, over a dict. ``EventSource`` is a model server's event
stream that the test feeds one event at a time, and ``AsgiCall`` one request to the app whose response the test
reads message by message (FastAPI's TestClient and httpx's ASGITransport only hand back a whole body).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import io
import itertools
from collections.abc import AsyncIterator
from typing import Any

import httpx

from kubelora.selfservice.kube import GROUP, ApiError, Caller


class FakeKube:
    def __init__(self, secret: dict[str, str] | None = None) -> None:
        self.audience: str | None = None
        self.secret = secret
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.denied: set[tuple[str, str, str]] = set()
        self.reviews: list[tuple[str, str, str]] = []
        self.log: list[tuple[str, ...]] = []
        self.fail_create: set[str] = set()
        self.pod_ips: dict[str, str] = {}
        self._uids = itertools.count(1)

    # auth
    def caller(self, token: str, organization: str | None) -> Caller:
        self.log.append(("caller",))
        if not token.startswith("good-"):
            raise ApiError(401, "Invalid token", code="invalid_api_key")
        namespace = token.removeprefix("good-")
        return Caller(f"system:serviceaccount:{namespace}:alice", "uid-alice", (), {}, organization or namespace)

    def authorize(self, caller: Caller, verb: str, resource: str, group: str = GROUP) -> None:
        self.reviews.append((verb, resource, group))
        self.log.append(("authorize", verb, resource, group))
        if (verb, resource, group) in self.denied:
            raise ApiError(403, f"{caller.username} may not {verb} {resource}", type_="permission_error")

    # objects
    def get_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        self.log.append(("get_secret", name))
        return dict(self.secret) if self.secret is not None else None

    def get_custom(self, namespace: str, plural: str, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((plural, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list_custom(self, namespace: str, plural: str, selector: str | None = None) -> list[dict[str, Any]]:
        key, _, value = (selector or "").partition("=")
        return [
            copy.deepcopy(o)
            for (p, _), o in self.objects.items()
            if p == plural and (not key or (o["metadata"].get("labels") or {}).get(key) == value)
        ]

    def create_custom(self, namespace: str, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        self.log.append(("create", plural, body["metadata"]["name"]))
        if plural in self.fail_create:
            raise RuntimeError(f"create {plural} refused")
        obj = copy.deepcopy(body)
        obj["metadata"]["uid"] = f"uid-{next(self._uids)}"
        obj["metadata"]["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.objects[(plural, obj["metadata"]["name"])] = obj
        return copy.deepcopy(obj)

    def patch_custom(self, namespace: str, plural: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.log.append(("patch", plural, name))
        obj = self.objects[(plural, name)]
        obj["metadata"].setdefault("annotations", {}).update(patch["metadata"]["annotations"])
        return copy.deepcopy(obj)

    def delete_custom(self, namespace: str, plural: str, name: str) -> None:
        self.log.append(("delete", plural, name))
        self.objects.pop((plural, name), None)

    def delete_job(self, namespace: str, name: str) -> bool:
        self.log.append(("delete", "jobs", name))
        return True

    def events_for(self, namespace: str, name: str, uid: str | None) -> list[dict[str, Any]]:
        return []

    def pod_ip(self, namespace: str, name: str) -> str | None:
        return self.pod_ips.get(name)

    def mutations(self) -> list[tuple[str, ...]]:
        return [e for e in self.log if e[0] in ("create", "patch", "delete")]


class _Object:
    def __init__(self, name: str) -> None:
        self.object_name = name


class _Response:
    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, *args: Any) -> bytes:
        return self._data.read(*args)

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class FakeS3:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.on_put: list[Any] = []

    def put_object(self, bucket: str, key: str, data: Any, length: int, **_: Any) -> None:
        for hook in self.on_put:
            hook(key)
        chunks = []
        while chunk := data.read(7919):  # odd sizes, as minio reads parts
            chunks.append(chunk)
        payload = b"".join(chunks)
        assert len(payload) == length, (len(payload), length)
        self.objects[(bucket, key)] = payload

    def fput_object(self, bucket: str, key: str, path: str, **_: Any) -> None:
        for hook in self.on_put:
            hook(key)
        with open(path, "rb") as f:
            self.objects[(bucket, key)] = f.read()

    def get_object(self, bucket: str, key: str) -> _Response:
        from minio.error import S3Error

        if (bucket, key) not in self.objects:
            raise S3Error(None, "NoSuchKey", "missing", key, "", "")  # type: ignore[arg-type]
        return _Response(self.objects[(bucket, key)])

    def list_objects(self, bucket: str, prefix: str | None = None, recursive: bool = False) -> list[_Object]:
        prefix = prefix or ""
        names: dict[str, None] = {}
        for b, key in sorted(self.objects):
            if b != bucket or not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if not recursive and "/" in rest:
                names[prefix + rest.split("/", 1)[0] + "/"] = None
            else:
                names[key] = None
        return [_Object(n) for n in names]

    def remove_object(self, bucket: str, key: str) -> None:
        self.objects.pop((bucket, key), None)


class EventSource(httpx.AsyncByteStream):
    """A model server's streamed reply: the bytes the test puts in ``chunks``, each sent only once put (None: the
    end, an exception: raised by the stream); ``closed`` is set when the reader closes it."""

    def __init__(self) -> None:
        self.chunks: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()
        self.closed = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self.chunks.get()) is not None:
            if isinstance(chunk, Exception):
                raise chunk
            yield chunk

    async def aclose(self) -> None:
        self.closed.set()


#: How long a test waits for the app or the stand-in before it fails (a deadline for a hang, never a pause).
DEADLINE = 10


class AsgiCall:
    """One POST to an ASGI app, run as a task of the test's event loop, as uvicorn calls it (ASGI spec 2.3)."""

    def __init__(self, app: Any, path: str, body: bytes, headers: dict[str, str]) -> None:
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.gone = asyncio.Event()  # set: the caller disconnects
        self._body: bytes | None = body
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "client": ("127.0.0.1", 40000),
            "server": ("testserver", 80),
        }
        self.task = asyncio.ensure_future(app(scope, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        await self.messages.put(message)

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.messages.get(), DEADLINE)

    async def start(self) -> tuple[int, dict[str, str]]:
        message = await self.next()
        assert message["type"] == "http.response.start", message
        return message["status"], {k.decode(): v.decode() for k, v in message["headers"]}

    async def chunk(self) -> bytes | None:
        """The next part of the body; None once the response is complete."""
        message = await self.next()
        assert message["type"] == "http.response.body", message
        if not message.get("more_body", False):
            assert message.get("body", b"") == b"", message
            return None
        return bytes(message["body"])

    async def finished(self) -> None:
        await asyncio.wait_for(self.task, DEADLINE)
