"""The self-service API over HTTP (FastAPI's TestClient) with a fake Kubernetes and a fake S3: the order of its
checks, its size limits, its rights and routing, with no cluster (tests/selfservice/test_api.py runs it for real)."""

from __future__ import annotations

import json
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from kubelora.selfservice import server
from kubelora.selfservice.catalogue import Catalogue, load
from kubelora.selfservice.kube import ApiError, Kube
from kubelora.selfservice.server import ANN, SelfService, Tenant, create_app
from tests.selfservice.conftest import CHAT_ROW, jsonl
from tests.selfservice.fakes import FakeKube, FakeS3

TOKEN = {"Authorization": "Bearer good-team-a"}
BAD_TOKEN = {"Authorization": "Bearer nope"}
TARGET = {"deploymentName": "vllm", "baseModel": "s3://b/base", "agentTokenSecretRef": {"name": "agent"}}
SECRET = {
    "accessKey": "a",
    "secretKey": "s",
    "endpoint": "minio.storage:9000",
    "bucket": "b",
    "prefix": "tenants/team-a",
}
PREFIX = "tenants/team-a/"


def catalogue(**extra: Any) -> Catalogue:
    return Catalogue.model_validate(
        {
            "maxFileBytes": 64 * 1024,
            "models": {"tiny": {"uri": "s3://b/base/", "gpus": 1, "training": {"maxSteps": 10}}},
            "servingPools": {
                "gateway": {"target": TARGET, "endpoint": "http://gateway.serving:8000"},
                "pods": {"target": {**TARGET, "port": 8001}},
            },
            **extra,
        }
    )


class Api:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **extra: Any) -> None:
        self.kube = FakeKube(dict(SECRET))
        self.s3 = FakeS3()
        monkeypatch.setattr("kubelora.storage.make_client", lambda *a, **k: self.s3)
        self.workdir = tmp_path / "work"
        self.workdir.mkdir()
        self.service = SelfService(self.kube, catalogue(**extra), self.workdir)  # type: ignore[arg-type]
        self.upstream: list[httpx.Request] = []
        self.reply = b'{"choices": [{"message": {"content": "billing"}}]}'
        self.service.upstream_transport = httpx.MockTransport(self._upstream)
        self.client = TestClient(create_app(self.service), raise_server_exceptions=False)

    def _upstream(self, request: httpx.Request) -> httpx.Response:
        self.upstream.append(request)
        return httpx.Response(200, content=self.reply, headers={"content-type": "application/json"})

    def upload(self, rows: list[Any] | bytes, name: str = "train.jsonl", headers: dict[str, str] = TOKEN) -> Any:
        content = rows if isinstance(rows, bytes) else jsonl(rows)
        return self.client.post(
            "/v1/files", files={"file": (name, content)}, data={"purpose": "fine-tune"}, headers=headers
        )

    def file_id(self) -> str:
        response = self.upload([CHAT_ROW] * 3)
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    def create(self, headers: dict[str, str] = TOKEN, **body: Any) -> Any:
        return self.client.post("/v1/fine_tuning/jobs", json=body, headers=headers)

    def lorajobs(self) -> list[str]:
        return [name for plural, name in self.kube.objects if plural == "lorajobs"]


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Api:
    return Api(tmp_path, monkeypatch)


def error(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


class Watched:
    """A request body that records whether the server read it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.consumed = False

    def __iter__(self) -> Iterator[bytes]:
        self.consumed = True
        yield self.data


# ------------------------------------------------------------------------------------------------ 1. JSON bodies


@pytest.mark.parametrize("path", ["/v1/fine_tuning/jobs", "/v1/chat/completions", "/v1/completions"])
def test_the_caller_is_authenticated_before_the_body_is_read(api, path):
    body = Watched(b"{not json")
    response = api.client.post(path, content=body, headers=BAD_TOKEN)
    assert response.status_code == 401 and error(response)["code"] == "invalid_api_key"
    assert body.consumed is False


@pytest.mark.parametrize("path", ["/v1/fine_tuning/jobs", "/v1/chat/completions"])
def test_a_json_body_over_the_limit_is_refused_with_413(api, path):
    big = json.dumps({"model": "tiny", "pad": "x" * (1 << 20)}).encode()
    declared = api.client.post(path, content=big, headers={**TOKEN, "content-type": "application/json"})
    assert declared.status_code == 413 and error(declared)["code"] == "request_too_large"
    # Without a Content-Length (chunked), the bytes are counted as they come.
    chunked = api.client.post(path, content=Watched(big), headers={**TOKEN, "content-type": "application/json"})
    assert chunked.status_code == 413 and error(chunked)["code"] == "request_too_large"
    assert api.lorajobs() == [] and api.upstream == []


def test_a_body_under_the_limit_is_read(api):
    response = api.create(model="nope", training_file="file-x")
    assert response.status_code == 404 and error(response)["param"] == "model"


# ------------------------------------------------------------------------------------------------ 2. uploads


def test_an_upload_is_authorized_and_its_tenant_found_before_the_body_is_spooled(api, monkeypatch):
    spooled = []
    real = server.tempfile.mkstemp
    monkeypatch.setattr(server.tempfile, "mkstemp", lambda *a, **k: spooled.append(1) or real(*a, **k))
    api.kube.denied.add(("create", "lorajobs", "kubelora.dev"))
    denied = api.upload([CHAT_ROW])
    assert denied.status_code == 403 and spooled == []
    api.kube.denied.clear()
    api.kube.secret = None
    no_storage = api.upload([CHAT_ROW])
    assert no_storage.status_code == 400 and error(no_storage)["code"] == "storage_not_configured"
    assert spooled == []
    api.kube.secret = dict(SECRET)
    not_multipart = api.client.post("/v1/files", content=b"{}", headers={**TOKEN, "content-type": "application/json"})
    assert not_multipart.status_code == 400 and spooled == []
    assert api.upload([CHAT_ROW]).status_code == 200 and spooled == [1]


def test_an_upload_is_stored_from_the_spooled_body_without_a_second_copy(api):
    on_disk = []
    api.s3.on_put.append(lambda key: on_disk.append((key, sorted(os.listdir(api.workdir)))))
    content = jsonl([CHAT_ROW] * 40)
    response = api.upload(content, "tickets.jsonl")
    assert response.status_code == 200, response.text
    file_id = response.json()["id"]
    assert response.json()["bytes"] == len(content)
    assert api.s3.objects[("b", f"{PREFIX}files/{file_id}.jsonl")] == content  # byte for byte, by offset
    # While the file was sent, the spooled request body was the only copy on disk.
    ((_key, files),) = [entry for entry in on_disk if entry[0].endswith(".jsonl")]
    assert len(files) == 1 and files[0].endswith(".upload"), files
    assert os.listdir(api.workdir) == []


def test_a_malformed_upload_names_its_line_and_stores_nothing(api):
    response = api.upload(jsonl([CHAT_ROW, CHAT_ROW]) + b'{"msgs": []}\n', "bad.jsonl")
    assert response.status_code == 400
    assert error(response)["message"].startswith("Invalid training file: bad.jsonl:3:")
    assert api.s3.objects == {}


def test_an_upload_over_the_limit_is_refused(api):
    response = api.upload([CHAT_ROW] * 2000)
    assert response.status_code == 413 and error(response)["code"] == "file_too_large"
    assert api.s3.objects == {}


# ------------------------------------------------------------------------------------------------ 3. audience


class FakeAuthn:
    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status
        self.sent: list[dict[str, Any]] = []

    def create_token_review(self, body: dict[str, Any]) -> dict[str, Any]:
        self.sent.append(body)
        return {"status": self.status}


def kube_with(status: dict[str, Any], audience: str | None) -> tuple[Kube, FakeAuthn]:
    from kubernetes import client

    kube = Kube.__new__(Kube)
    authn = FakeAuthn(status)
    kube.api, kube.authn, kube.audience = client.ApiClient(), authn, audience
    kube._tokens, kube._lock = {}, __import__("threading").Lock()
    return kube, authn


USER = {"username": "system:serviceaccount:team-a:alice", "uid": "u"}


def test_with_an_audience_the_token_review_asks_for_it_and_requires_it():
    kube, authn = kube_with({"authenticated": True, "user": USER, "audiences": ["kubelora-api"]}, "kubelora-api")
    assert kube.caller("t1", None).namespace == "team-a"
    assert authn.sent[0]["spec"] == {"token": "t1", "audiences": ["kubelora-api"]}
    # A token the API server accepts for itself only (the review answers without our audience): 401.
    kube, authn = kube_with({"authenticated": True, "user": USER, "audiences": ["https://kubernetes.default"]}, "a")
    with pytest.raises(ApiError) as refused:
        kube.caller("t2", None)
    assert refused.value.status == 401 and refused.value.code == "invalid_api_key"
    kube, authn = kube_with({"authenticated": True, "user": USER}, "kubelora-api")
    with pytest.raises(ApiError):
        kube.caller("t3", None)


def test_without_an_audience_the_review_is_the_api_servers():
    kube, authn = kube_with({"authenticated": True, "user": USER}, None)
    assert kube.caller("t", None).username == USER["username"]
    assert authn.sent[0]["spec"] == {"token": "t"}


def test_the_catalogue_carries_the_audience(tmp_path):
    path = tmp_path / "catalogue.yaml"
    path.write_text(yaml.safe_dump({"audience": "kubelora-api", "allowedStorageEndpoints": ["minio:9000"]}))
    loaded = load(path)
    assert loaded.audience == "kubelora-api" and loaded.allowed_storage_endpoints == ["minio:9000"]
    assert load(None).audience is None


# ------------------------------------------------------------------------------------------------ 4. cancel


def started(api: Api, job_name: str | None) -> str:
    response = api.create(model="tiny", training_file=api.file_id(), metadata={"team": "support"})
    assert response.status_code == 200, response.text
    job_id = str(response.json()["id"])
    if job_name:
        api.kube.objects[("lorajobs", job_id)]["status"] = {"phase": "Training", "jobName": job_name}
    return job_id


def test_cancelling_a_running_job_needs_delete_jobs(api):
    job_id = started(api, "ftjob-run-1")
    before = len(api.kube.mutations())
    api.kube.denied.add(("delete", "jobs", "batch"))
    denied = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=TOKEN)
    assert denied.status_code == 403
    assert api.kube.mutations()[before:] == []  # not even marked
    api.kube.denied.clear()
    cancelled = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=TOKEN)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert ("delete", "jobs", "batch") in api.kube.reviews
    assert api.kube.mutations()[before:] == [("patch", "lorajobs", job_id), ("delete", "jobs", "ftjob-run-1")]


def test_cancelling_a_job_not_started_needs_delete_lorajobs_and_keeps_the_job_visible(api):
    job_id = started(api, None)
    before = len(api.kube.mutations())
    api.kube.denied.add(("delete", "lorajobs", "kubelora.dev"))
    denied = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=TOKEN)
    assert denied.status_code == 403 and api.kube.mutations()[before:] == []
    api.kube.denied.clear()
    cancelled = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=TOKEN)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert api.lorajobs() == []  # deleted, so the operator never starts it
    assert ("b", f"{PREFIX}jobs/{job_id}/cancelled.json") in api.s3.objects
    # Still retrievable and listed, from its record.
    retrieved = api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=TOKEN).json()
    assert retrieved["status"] == "cancelled" and retrieved["finished_at"] is not None
    assert retrieved["metadata"] == {"team": "support"}
    listed = api.client.get("/v1/fine_tuning/jobs", headers=TOKEN).json()["data"]
    assert [(j["id"], j["status"]) for j in listed] == [(job_id, "cancelled")]
    filtered = api.client.get("/v1/fine_tuning/jobs?metadata[team]=other", headers=TOKEN).json()["data"]
    assert filtered == []
    events = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=TOKEN).json()["data"]
    assert "Cancelled fine-tuning job" in [e["message"] for e in events]
    again = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=TOKEN)
    assert again.status_code == 400 and error(again)["code"] == "job_finished"


def test_a_record_that_is_not_a_cancel_is_ignored(api):
    api.s3.objects[("b", f"{PREFIX}jobs/ftjob-abc/cancelled.json")] = json.dumps({"metadata": {"name": "x"}}).encode()
    assert api.client.get("/v1/fine_tuning/jobs/ftjob-abc", headers=TOKEN).status_code == 404
    assert api.client.get("/v1/fine_tuning/jobs", headers=TOKEN).json()["data"] == []


# ------------------------------------------------------------------------------------------------ 5. suffix


@pytest.mark.parametrize("suffix", ["bad name", "../up", "-x", "x" * 65, "", "a\nb"])
def test_a_suffix_that_cannot_be_a_served_name_is_refused_before_anything_is_created(api, suffix):
    file_id = api.file_id()
    response = api.create(model="tiny", training_file=file_id, suffix=suffix, kubelora={"serving_pool": "gateway"})
    assert response.status_code == 400 and error(response)["param"] == "suffix", response.text
    assert api.kube.mutations() == []


def test_a_served_name_over_128_characters_is_refused(tmp_path, monkeypatch):
    api = Api(tmp_path, monkeypatch)
    api.service.catalogue.models["m" * 64] = api.service.catalogue.models["tiny"]
    response = api.create(
        model="m" * 64, training_file=api.file_id(), suffix="s" * 64, kubelora={"serving_pool": "gateway"}
    )
    assert response.status_code == 400 and error(response)["param"] == "suffix"
    assert api.kube.mutations() == []


def test_a_catalogue_model_name_must_fit_a_served_name(tmp_path):
    path = tmp_path / "catalogue.yaml"
    path.write_text(yaml.safe_dump({"models": {"bad name": {"uri": "s3://m/"}}}))
    with pytest.raises(ValueError, match="bad name"):
        load(path)


def test_an_invalid_deployment_is_refused_before_the_lorajob_is_created(api):
    api.service.catalogue.serving_pools["broken"] = api.service.catalogue.serving_pools["gateway"].model_copy(
        update={"target": {"deploymentName": "vllm", "baseModel": "b"}}  # no agentTokenSecretRef
    )
    response = api.create(model="tiny", training_file=api.file_id(), kubelora={"serving_pool": "broken"})
    assert response.status_code == 400 and "agentTokenSecretRef" in error(response)["message"]
    assert api.kube.mutations() == []


def test_a_failed_deployment_create_removes_the_lorajob(api):
    api.kube.fail_create.add("adapterdeployments")
    response = api.create(model="tiny", training_file=api.file_id(), kubelora={"serving_pool": "gateway"})
    assert response.status_code == 500
    assert error(response)["code"] == "deployment_failed" and "no job was created" in error(response)["message"]
    assert api.lorajobs() == []
    assert [m[:2] for m in api.kube.mutations()] == [
        ("create", "lorajobs"),
        ("create", "adapterdeployments"),
        ("delete", "lorajobs"),
    ]


# ------------------------------------------------------------------------------------------------ 6. chat routing


def deployed(api: Api, pool: str = "gateway", phase: str = "Ready") -> tuple[str, dict[str, Any]]:
    response = api.create(model="tiny", training_file=api.file_id(), kubelora={"serving_pool": pool})
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    ad = api.kube.objects[("adapterdeployments", job_id)]
    ad["status"] = {
        "phase": phase,
        "replicas": [{"pod": "vllm-0", "state": "Loaded"}],
        "conditions": [{"type": "Ready", "status": "True" if phase == "Ready" else "False"}],
    }
    api.kube.pod_ips["vllm-0"] = "10.0.0.5"
    return str(ad["spec"]["servedName"]), ad


def chat(api: Api, model: str) -> Any:
    return api.client.post(
        "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}, headers=TOKEN
    )


def test_chat_goes_to_the_pool_endpoint_of_a_ready_deployment(api):
    served, ad = deployed(api)
    assert ad["metadata"]["ownerReferences"][0]["controller"] is True
    response = chat(api, served)
    assert response.status_code == 200 and response.json() == json.loads(api.reply)
    assert str(api.upstream[-1].url) == "http://gateway.serving:8000/v1/chat/completions"
    ad["status"]["phase"] = "Loading"
    assert chat(api, served).status_code == 503


@pytest.mark.parametrize(
    "tamper",
    [
        lambda ad, job: ad["spec"]["target"].update(deploymentName="elsewhere"),
        lambda ad, job: ad["spec"]["target"].update(port=9999),
        lambda ad, job: ad["metadata"]["ownerReferences"][0].update(uid="uid-other"),
        lambda ad, job: ad["metadata"]["ownerReferences"][0].pop("controller"),
        lambda ad, job: job["metadata"]["annotations"].update({ANN + "serving-pool": "nope"}),
    ],
    ids=["target", "port", "owner-uid", "not-controller", "pool"],
)
@pytest.mark.parametrize("pool", ["gateway", "pods"])
def test_chat_refuses_a_tampered_deployment(api, tamper, pool):
    served, ad = deployed(api, pool)
    tamper(ad, api.kube.objects[("lorajobs", ad["metadata"]["name"])])
    response = chat(api, served)
    assert response.status_code == 404, response.text
    assert api.upstream == []


def test_chat_follows_a_target_the_api_server_filled_with_defaults(api):
    served, ad = deployed(api)
    ad["spec"]["target"].update(port=8000, maxLoras=4)  # CRD defaults: the same target
    assert chat(api, served).status_code == 200


def test_chat_to_pods_uses_the_pools_port(api):
    served, _ = deployed(api, "pods", phase="Progressing")
    response = chat(api, served)
    assert response.status_code == 200
    assert str(api.upstream[-1].url) == "http://10.0.0.5:8001/v1/chat/completions"


def test_a_model_servers_reply_over_the_limit_is_a_502(api):
    served, _ = deployed(api)
    api.service.max_upstream_bytes = 1000
    api.reply = b'{"pad": "' + b"x" * 2000 + b'"}'
    response = chat(api, served)
    assert response.status_code == 502 and error(response)["code"] == "upstream_too_large"


# ------------------------------------------------------------------------------------------------ 7. storage endpoints


@pytest.mark.parametrize(
    ("endpoint", "allowed"),
    [
        ("minio.storage:9000", True),
        ("http://minio.storage:9000", True),
        ("https://MINIO.storage:9000/", True),
        ("minio.storage:9001", False),
        ("http://user@minio.storage:9000", False),
        ("169.254.169.254", False),
        ("kubernetes.default:443", False),
    ],
)
def test_the_storage_endpoint_must_be_allowed(endpoint, allowed, monkeypatch):
    monkeypatch.setattr("kubelora.storage.make_client", lambda *a, **k: FakeS3())
    values = {**SECRET, "endpoint": endpoint}
    if allowed:
        assert Tenant("s", values, ["minio.storage:9000"]).bucket == "b"
    else:
        with pytest.raises(ApiError) as refused:
            Tenant("s", values, ["minio.storage:9000"])
        assert refused.value.status == 403 and refused.value.code == "storage_endpoint_not_allowed"
    assert Tenant("s", values, []).bucket == "b"  # no list: any


def test_a_tenant_secret_pointing_elsewhere_is_refused_through_the_api(tmp_path, monkeypatch):
    api = Api(tmp_path, monkeypatch, allowedStorageEndpoints=["minio.storage:9000"])
    assert api.client.get("/v1/files", headers=TOKEN).status_code == 200
    api.kube.secret = {**SECRET, "endpoint": "http://10.0.0.1:6443"}
    refused = api.client.get("/v1/files", headers=TOKEN)
    assert refused.status_code == 403 and error(refused)["code"] == "storage_endpoint_not_allowed"
    assert "10.0.0.1" not in error(refused)["message"]


# ------------------------------------------------------------------------------------------------ 8. list and retrieve


@pytest.mark.parametrize(
    ("phase", "status", "model"),
    [("Loading", "running", None), ("Ready", "succeeded", True), ("Refused", "failed", None)],
)
def test_list_and_retrieve_agree_for_pool_jobs(api, phase, status, model):
    served, ad = deployed(api, phase=phase)
    job_id = ad["metadata"]["name"]
    api.kube.objects[("lorajobs", job_id)]["status"] = {"phase": "Succeeded"}
    retrieved = api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=TOKEN).json()
    (listed,) = api.client.get("/v1/fine_tuning/jobs", headers=TOKEN).json()["data"]
    assert retrieved["status"] == listed["status"] == status
    assert retrieved["fine_tuned_model"] == listed["fine_tuned_model"] == (served if model else None)
    # A LoRAJob labelled by the API but not this AdapterDeployment's controller does not borrow its state.
    ad["metadata"]["ownerReferences"][0]["uid"] = "uid-other"
    (listed,) = api.client.get("/v1/fine_tuning/jobs", headers=TOKEN).json()["data"]
    assert listed["status"] == "succeeded" and listed["fine_tuned_model"] is None


# ------------------------------------------------------------------------------------------------ trainer checks


def test_validate_jsonl_checks_a_byte_range_row_by_row(tmp_path):
    from kubelora.trainer.data import read_jsonl, validate_jsonl
    from kubelora.trainer.errors import MalformedDatasetError

    rows = jsonl([CHAT_ROW] * 3)
    path = tmp_path / "body"
    path.write_bytes(b"--head\r\n" + rows + b"\r\n--tail")
    assert validate_jsonl(path, "chat", name="t.jsonl", start=8, end=8 + len(rows)) == 3
    clean = tmp_path / "t.jsonl"
    clean.write_bytes(rows + b"\n")
    assert validate_jsonl(clean, "chat") == len(read_jsonl(clean, "chat").examples) == 3
    clean.write_bytes(rows + b'{"x": 1}\n')
    with pytest.raises(MalformedDatasetError) as bad:
        validate_jsonl(clean, "chat", name="mine.jsonl")
    with pytest.raises(MalformedDatasetError) as same:
        read_jsonl(clean, "chat", name="mine.jsonl")
    assert str(bad.value) == str(same.value) == 'mine.jsonl:4: missing "messages"'
    clean.write_bytes(b"\n\n")
    with pytest.raises(MalformedDatasetError, match="no usable rows"):
        validate_jsonl(clean, "chat")


def test_validate_jsonl_does_not_hold_the_file_in_memory(tmp_path):
    from kubelora.trainer.data import validate_jsonl

    row = json.dumps({"messages": [{"role": "user", "content": "q" * 200}, {"role": "assistant", "content": "a"}]})
    path = tmp_path / "big.jsonl"
    path.write_text((row + "\n") * 8000)  # ~2 MB
    tracemalloc.start()
    try:
        assert validate_jsonl(path, "chat") == 8000
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < path.stat().st_size // 4, peak
