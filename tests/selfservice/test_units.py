"""The self-service API's pure parts: multipart parsing, row validation and the job object's status; and the
relay of a streamed chat, event by event, with stand-ins for the model server (``fakes.EventSource``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kubelora.selfservice.catalogue import Catalogue
from kubelora.selfservice.jobs import ANN, job_object, manifests
from kubelora.selfservice.kube import ApiError, Caller
from kubelora.selfservice.server import create_app
from kubelora.selfservice.uploads import parse_multipart, validate_upload
from tests.selfservice.fakes import DEADLINE, AsgiCall, EventSource
from tests.selfservice.test_service import TOKEN, Api, deployed, error

CALLER = Caller("system:serviceaccount:team-a:alice", "uid", (), {}, "team-a")


def body(tmp_path: Path, parts: list[tuple[str, str | None, bytes]], boundary: str = "xyz") -> Path:
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    path = tmp_path / "body"
    path.write_bytes(out)
    return path


def test_multipart_finds_fields_and_the_file_part(tmp_path):
    content = b'{"a": 1}\r\n--xy not the boundary\n'
    path = body(tmp_path, [("purpose", None, b"fine-tune"), ("file", "t.jsonl", content)])
    fields, part = parse_multipart(path, "multipart/form-data; boundary=xyz")
    assert fields == {"purpose": "fine-tune"}
    assert part is not None and part[0] == "t.jsonl"
    assert path.read_bytes()[part[1] : part[2]] == content


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data"])
def test_multipart_refuses_other_bodies(tmp_path, content_type):
    path = body(tmp_path, [("purpose", None, b"fine-tune")])
    with pytest.raises(ApiError) as refused:
        parse_multipart(path, content_type)
    assert refused.value.status == 400


def test_rows_are_checked_by_the_trainers_parser(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"x": 1}\n'
    )
    with pytest.raises(ApiError) as refused:
        validate_upload(path, "mine.jsonl", "chat")
    assert refused.value.status == 400 and refused.value.message.startswith("Invalid training file: mine.jsonl:2:")
    assert refused.value.body()["error"]["param"] == "file"


def lorajob(phase: str | None, **status: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {
            "name": "ftjob-abc",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "annotations": {ANN + "model": "m", ANN + "training-file": "file-1", ANN + "serving-pool": "p"},
        },
        "spec": {"training": {"seed": 3}},
    }
    if phase:
        obj["status"] = {"phase": phase, **status}
    return obj


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        (None, "validating_files"),
        ("Pending", "validating_files"),
        ("Queued", "queued"),
        ("Training", "running"),
        ("Evaluating", "running"),
        ("Failed", "failed"),
    ],
)
def test_status_follows_the_lorajob_phase(phase, expected):
    job = job_object(CALLER.namespace, lorajob(phase), None)
    assert job["status"] == expected
    assert job["seed"] == 3 and job["model"] == "m" and job["organization_id"] == "team-a"


def ad(phase: str, ready: bool | None = None) -> dict[str, Any]:
    ready = phase == "Ready" if ready is None else ready
    condition = {"type": "Ready", "status": "True" if ready else "False"}
    return {"spec": {"servedName": "ft/m/x"}, "status": {"phase": phase, "message": "why", "conditions": [condition]}}


def test_succeeded_waits_for_the_deployment_to_serve():
    done = lorajob("Succeeded", completionTime="2026-01-01T01:00:00Z")
    loading = job_object(CALLER.namespace, done, ad("Loading"))
    assert loading["status"] == "running" and loading["fine_tuned_model"] is None and loading["finished_at"] is None
    ready = job_object(CALLER.namespace, done, ad("Ready"), {"training": {"tokensPerSecond": 100.0, "seconds": 2.5}})
    assert ready["status"] == "succeeded" and ready["fine_tuned_model"] == "ft/m/x"
    assert ready["trained_tokens"] == 250 and ready["finished_at"] == ready["created_at"] + 3600
    # Ready with Ready=False (its pods went away): not servable now, so not succeeded
    unserved = job_object(CALLER.namespace, done, ad("Ready", ready=False))
    assert unserved["status"] == "running" and unserved["fine_tuned_model"] is None
    refused = job_object(CALLER.namespace, done, ad("Refused"))
    assert refused["status"] == "failed" and refused["error"]["code"] == "DeploymentRefused"


def test_failed_and_cancelled_jobs():
    failed = lorajob(
        "Failed",
        message="bad.jsonl:3: missing",
        conditions=[{"type": "Ready", "status": "False", "reason": "MalformedDataset"}],
    )
    job = job_object(CALLER.namespace, failed, None)
    assert job["error"] == {"code": "MalformedDataset", "message": "bad.jsonl:3: missing", "param": None}
    failed["metadata"]["annotations"][ANN + "cancelled-at"] = "2026-01-01T00:10:00Z"
    cancelled = job_object(CALLER.namespace, failed, None)
    assert cancelled["status"] == "cancelled" and cancelled["error"] is None
    assert cancelled["finished_at"] == cancelled["created_at"] + 600


def test_estimated_finish_from_progress():
    running = lorajob("Training", progress={"step": 5, "etaSeconds": 120, "updatedAt": "2026-01-01T00:30:00Z"})
    job = job_object(CALLER.namespace, running, None)
    assert job["estimated_finish"] == job["created_at"] + 1800 + 120


# ------------------------------------------------------------------------------------------------ streamed chat


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def delta(text: str) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }


class Streamed:
    """The API in-process (test_service's fakes) with a served model whose upstream is an ``EventSource``."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.api = Api(tmp_path, monkeypatch)
        self.served, _ = deployed(self.api)
        self.requests: list[httpx.Request] = []
        self.source: EventSource | None = None
        self.answer: httpx.Response | None = None  # instead of the stream, when set
        self.api.service.upstream_transport = httpx.MockTransport(self._upstream)

    async def _upstream(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.answer is not None:
            return self.answer
        self.source = EventSource()
        return httpx.Response(200, headers={"content-type": "text/event-stream; charset=utf-8"}, stream=self.source)

    def body(self, **extra: Any) -> dict[str, Any]:
        return {"model": self.served, "messages": [{"role": "user", "content": "hi"}], "stream": True, **extra}

    def call(self, path: str = "/v1/chat/completions") -> AsgiCall:
        headers = {**TOKEN, "content-type": "application/json"}
        return AsgiCall(create_app(self.api.service), path, json.dumps(self.body()).encode(), headers)

    async def upstream_stream(self, call: AsgiCall) -> EventSource:
        """The upstream's stream, once the API has asked for it (the response starts only after that)."""
        status, headers = await call.start()
        assert status == 200 and headers["content-type"].startswith("text/event-stream"), (status, headers)
        assert self.source is not None
        return self.source


@pytest.fixture
def streamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Streamed:
    return Streamed(tmp_path, monkeypatch)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_is_relayed_event_by_event(streamed, path):
    async def scenario() -> None:
        call = streamed.call(path)
        source = await streamed.upstream_stream(call)
        # Each event reaches the caller before the model server has sent the next.
        await source.chunks.put(sse(delta("bill")))
        assert await call.chunk() == sse(delta("bill"))
        await source.chunks.put(sse(delta("ing")))
        assert await call.chunk() == sse(delta("ing"))
        # An event split across reads is relayed whole, once its blank line has come.
        split = sse(delta("!"))
        await source.chunks.put(split[:10])
        await source.chunks.put(split[10:])
        assert await call.chunk() == split
        await source.chunks.put(b"data: [DONE]\n\n")
        assert await call.chunk() == b"data: [DONE]\n\n"
        await source.chunks.put(None)
        assert await call.chunk() is None
        await call.finished()
        assert source.closed.is_set()

    asyncio.run(scenario())
    [request] = streamed.requests
    assert request.url.path == path and json.loads(request.content) == streamed.body()


def test_a_caller_that_goes_away_closes_the_upstream_stream(streamed):
    async def scenario() -> None:
        call = streamed.call()
        source = await streamed.upstream_stream(call)
        await source.chunks.put(sse(delta("bill")))
        assert await call.chunk() == sse(delta("bill"))
        call.gone.set()
        await call.finished()
        await asyncio.wait_for(source.closed.wait(), DEADLINE)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("trouble", "code"),
    [(sse(delta("x" * 600)), "upstream_too_large"), (httpx.ReadError("reset"), "upstream")],
    ids=["over-the-limit", "broken-off"],
)
def test_a_stream_in_trouble_ends_with_an_error_event(streamed, trouble, code):
    streamed.api.service.max_upstream_bytes = 500

    async def scenario() -> list[bytes]:
        call = streamed.call()
        source = await streamed.upstream_stream(call)
        await source.chunks.put(sse(delta("bill")))
        assert await call.chunk() == sse(delta("bill"))
        await source.chunks.put(trouble)
        rest = []
        while (chunk := await call.chunk()) is not None:
            rest.append(chunk)
        await call.finished()
        assert source.closed.is_set()
        return rest

    events = b"".join(asyncio.run(scenario())).split(b"\n\n")
    assert events[1:] == [b"data: [DONE]", b""], events
    body = json.loads(events[0].removeprefix(b"data: "))
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code


def test_an_upstream_error_before_the_stream_keeps_the_openai_shape(streamed):
    vllm_error = {
        "error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": None, "code": 400}
    }
    streamed.answer = httpx.Response(400, json=vllm_error)
    response = streamed.api.client.post("/v1/chat/completions", json=streamed.body(), headers=TOKEN)
    assert response.status_code == 400 and response.json() == vllm_error
    assert response.headers["content-type"] == "application/json"


def test_an_unreachable_model_server_is_a_502_before_the_stream(streamed):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    streamed.api.service.upstream_transport = httpx.MockTransport(refuse)
    response = streamed.api.client.post("/v1/chat/completions", json=streamed.body(), headers=TOKEN)
    assert response.status_code == 502 and error(response)["code"] == "upstream"


def test_the_openai_client_reads_the_relayed_stream(streamed):
    events = [sse(delta("bill")), sse(delta("ing")), b"data: [DONE]\n\n"]

    async def replay() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=replay())

    streamed.api.service.upstream_transport = httpx.MockTransport(upstream)
    client = openai.OpenAI(
        base_url="http://testserver/v1", api_key=TOKEN["Authorization"].split()[1], http_client=streamed.api.client
    )
    stream = client.chat.completions.create(
        model=streamed.served, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == "billing"


class Storage:
    secret_name = "ft-storage"

    def uri(self, *parts: str) -> str:
        return "s3://tenant/p/" + "".join(parts)


POOL_TARGET = {"deploymentName": "vllm", "baseModel": "s3://b/base", "agentTokenSecretRef": {"name": "agent"}}


def test_a_create_request_maps_to_a_lorajob_and_its_deployment_without_io():
    catalogue = Catalogue.model_validate(
        {
            "models": {"tiny": {"uri": "s3://b/base/", "gpus": 2, "training": {"maxSteps": 10, "learningRate": 1e-4}}},
            "servingPools": {"pods": {"target": POOL_TARGET}},
        }
    )
    body = {
        "model": "tiny",
        "training_file": "file-a",
        "validation_file": "file-b",
        "suffix": "tickets",
        "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5},
        "kubelora": {"serving_pool": "pods", "rank": 8, "gates": [{"metric": "exact_match", "min": 0.5}]},
    }
    lorajob, ad = manifests(catalogue, Storage(), body, "ftjob-abc")
    spec = lorajob["spec"]
    assert spec["training"] == {"epochs": 2, "batchSize": 4, "learningRate": 5e-5}, "maxSteps gives way to epochs"
    assert spec["dataset"]["train"] == "s3://tenant/p/files/file-a.jsonl"
    assert spec["eval"]["testSet"] == spec["dataset"]["validation"] == "s3://tenant/p/files/file-b.jsonl"
    assert spec["eval"]["gates"] == [{"metric": "exact_match", "min": 0.5}]
    assert spec["output"]["uri"] == "s3://tenant/p/jobs/ftjob-abc/"
    assert (spec["lora"]["rank"], spec["resources"]["gpus"]) == (8, 2)
    assert ad is not None and ad["spec"]["servedName"] == "ft/tiny/tickets-abc"
    assert ad["spec"]["adapter"] == {"loraJob": "ftjob-abc"} and ad["spec"]["target"] == POOL_TARGET
    assert "ownerReferences" not in ad["metadata"], "the owner is added once the LoRAJob exists"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"kubelora": {"serving_pool": "nope"}}, "kubelora.serving_pool"),
        ({"kubelora": {"method": "dora", "serving_pool": "pods"}}, "kubelora.serving_pool"),
        ({"kubelora": {"gates": []}}, "kubelora.gates"),
        ({"suffix": "no spaces"}, "suffix"),
        ({"metadata": {"k": 1}}, "metadata"),
    ],
)
def test_a_bad_create_request_names_its_parameter(extra, param):
    catalogue = Catalogue.model_validate(
        {"models": {"tiny": {"uri": "s3://b/base/", "gpus": 1}}, "servingPools": {"pods": {"target": POOL_TARGET}}}
    )
    with pytest.raises(ApiError) as refused:
        manifests(catalogue, Storage(), {"model": "tiny", "training_file": "file-a", **extra}, "ftjob-abc")
    assert refused.value.status == 400 and refused.value.body()["error"]["param"] == param
