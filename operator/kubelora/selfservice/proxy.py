"""Chat and completion requests relayed to the vLLM server that serves the model: whole replies, or Server-Sent
Events passed on as they arrive, both within a size limit, and the model server's stream closed however the
relay ends."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from fastapi.responses import Response, StreamingResponse

from kubelora.selfservice.kube import ApiError

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

#: The largest reply the API relays from a model server: 502 above it.
MAX_UPSTREAM_BYTES = 16 << 20
#: Seconds a model server may take to answer (and between stream chunks).
UPSTREAM_TIMEOUT = 120


def _unreachable(model: str, exc: Exception) -> ApiError:
    log.warning("Model server unreachable model=%s error=%s", model, exc)
    return ApiError(
        502, f"The model server did not answer: {type(exc).__name__}", type_="server_error", code="upstream"
    )


def _upstream_too_large(model: str, limit: int) -> ApiError:
    log.warning("Model server reply over the limit model=%s limit=%d", model, limit)
    return ApiError(
        502,
        f"The model server's reply is larger than the limit of {limit} bytes",
        type_="server_error",
        code="upstream_too_large",
    )


async def _read_reply(upstream: httpx.Response, model: str, limit: int) -> bytes:
    """The whole reply of a model server, at most ``limit`` bytes (502 above)."""
    chunks, size = [], 0
    async for chunk in upstream.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise _upstream_too_large(model, limit)
        chunks.append(chunk)
    return b"".join(chunks)


#: What ends a Server-Sent Event: a blank line (vLLM writes ``\n\n``).
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")


def _events_end(data: bytearray) -> int:
    """The length of the whole events at the start of ``data`` (0: not one event yet)."""
    return max((i + len(end) for end in _EVENT_ENDS if (i := data.rfind(end)) >= 0), default=0)


def _error_event(error: ApiError) -> bytes:
    """An error in the middle of a stream, as vLLM sends one (the openai client raises ``APIError``), then the end."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\ndata: [DONE]\n\n"


async def _relay_events(upstream: httpx.Response, model: str, limit: int) -> AsyncIterator[bytes]:
    """The model server's events as they arrive, whole events only, so that the stream can always end cleanly.

    Past ``limit`` bytes, or when the model server breaks off, the stream ends with an error event and
    ``data: [DONE]`` (the status line has gone, so that is the only way left to say so).
    """
    import httpx

    pending, size = bytearray(), 0
    try:
        async for chunk in upstream.aiter_bytes():
            size += len(chunk)
            if size > limit:
                yield _error_event(_upstream_too_large(model, limit))
                return
            pending += chunk
            end = _events_end(pending)
            if end:
                yield bytes(pending[:end])
                del pending[:end]
    except httpx.HTTPError as exc:
        log.warning("Model server stream broke off model=%s error=%s", model, exc)
        yield _error_event(
            ApiError(
                502,
                f"The model server's stream broke off: {type(exc).__name__}",
                type_="server_error",
                code="upstream",
            )
        )
        return
    if pending:  # the model server's last bytes, even when they are not a whole event
        yield bytes(pending)


class _EventStream(StreamingResponse):
    """A relayed stream that closes the model server's stream however it ends, the caller going away included."""

    def __init__(
        self, content: AsyncIterator[bytes], closers: Sequence[Callable[[], Awaitable[None]]], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self.events = content
        self.closers = closers

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette cancels the relay when the caller disconnects: close upstream all the same.
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.events, "aclose", None)
                if aclose is not None:
                    await aclose()
                for close in self.closers:
                    await close()


async def forward(url: str, body: dict[str, Any], model: str, limit: int, transport: Any = None) -> Response:
    """POST ``body`` to the model server at ``url``; its reply, or (``stream``) its events as they arrive."""
    import httpx

    if body.get("stream"):
        return await _forward_stream(url, body, model, limit, transport)
    try:
        async with (
            httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT, transport=transport) as client,
            client.stream("POST", url, json=body) as upstream,
        ):
            content = await _read_reply(upstream, model, limit)
    except httpx.HTTPError as exc:
        raise _unreachable(model, exc) from None
    return Response(
        content,
        status_code=upstream.status_code,
        media_type=upstream.headers.get("content-type", "application/json"),
    )


async def _forward_stream(url: str, body: dict[str, Any], model: str, limit: int, transport: Any) -> Response:
    """``stream=true``: the model server's Server-Sent Events, relayed as they arrive."""
    import httpx

    client = httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT, transport=transport)
    try:
        upstream = await client.send(client.build_request("POST", url, json=body), stream=True)
    except BaseException as exc:
        await client.aclose()
        if isinstance(exc, httpx.HTTPError):
            raise _unreachable(model, exc) from None
        raise
    content_type = upstream.headers.get("content-type", "application/json")
    if upstream.is_success and content_type.partition(";")[0].strip().lower() == "text/event-stream":
        return _EventStream(
            _relay_events(upstream, model, limit),
            closers=(upstream.aclose, client.aclose),
            status_code=upstream.status_code,
            media_type=content_type,
            # Proxies in front of the API (nginx ingress) must not buffer the events either.
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    # An error before any event (vLLM's own OpenAI-shaped error, say): relayed whole, as without stream.
    try:
        content = await _read_reply(upstream, model, limit)
    except httpx.HTTPError as exc:
        raise _unreachable(model, exc) from None
    finally:
        await upstream.aclose()
        await client.aclose()
    return Response(content, status_code=upstream.status_code, media_type=content_type)
