"""The self-service API's pure parts: multipart parsing, row validation and the job object's status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubelora.selfservice.catalogue import Catalogue
from kubelora.selfservice.kube import ApiError, Caller
from kubelora.selfservice.server import ANN, SelfService, _multipart, _validate_jsonl

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
    fields, part = _multipart(path, "multipart/form-data; boundary=xyz")
    assert fields == {"purpose": "fine-tune"}
    assert part is not None and part[0] == "t.jsonl"
    assert path.read_bytes()[part[1] : part[2]] == content


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data"])
def test_multipart_refuses_other_bodies(tmp_path, content_type):
    path = body(tmp_path, [("purpose", None, b"fine-tune")])
    with pytest.raises(ApiError) as refused:
        _multipart(path, content_type)
    assert refused.value.status == 400


def test_rows_are_checked_by_the_trainers_parser(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"x": 1}\n'
    )
    with pytest.raises(ApiError) as refused:
        _validate_jsonl(path, "mine.jsonl", "chat")
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
    job = SelfService(None, Catalogue()).job_object(CALLER, lorajob(phase), None)  # type: ignore[arg-type]
    assert job["status"] == expected
    assert job["seed"] == 3 and job["model"] == "m" and job["organization_id"] == "team-a"


def ad(phase: str, ready: bool | None = None) -> dict[str, Any]:
    ready = phase == "Ready" if ready is None else ready
    condition = {"type": "Ready", "status": "True" if ready else "False"}
    return {"spec": {"servedName": "ft/m/x"}, "status": {"phase": phase, "message": "why", "conditions": [condition]}}


def test_succeeded_waits_for_the_deployment_to_serve():
    service = SelfService(None, Catalogue())  # type: ignore[arg-type]
    done = lorajob("Succeeded", completionTime="2026-01-01T01:00:00Z")
    loading = service.job_object(CALLER, done, ad("Loading"))
    assert loading["status"] == "running" and loading["fine_tuned_model"] is None and loading["finished_at"] is None
    ready = service.job_object(CALLER, done, ad("Ready"), {"training": {"tokensPerSecond": 100.0, "seconds": 2.5}})
    assert ready["status"] == "succeeded" and ready["fine_tuned_model"] == "ft/m/x"
    assert ready["trained_tokens"] == 250 and ready["finished_at"] == ready["created_at"] + 3600
    # Ready with Ready=False (its pods went away): not servable now, so not succeeded
    unserved = service.job_object(CALLER, done, ad("Ready", ready=False))
    assert unserved["status"] == "running" and unserved["fine_tuned_model"] is None
    refused = service.job_object(CALLER, done, ad("Refused"))
    assert refused["status"] == "failed" and refused["error"]["code"] == "DeploymentRefused"


def test_failed_and_cancelled_jobs():
    service = SelfService(None, Catalogue())  # type: ignore[arg-type]
    failed = lorajob(
        "Failed",
        message="bad.jsonl:3: missing",
        conditions=[{"type": "Ready", "status": "False", "reason": "MalformedDataset"}],
    )
    job = service.job_object(CALLER, failed, None)
    assert job["error"] == {"code": "MalformedDataset", "message": "bad.jsonl:3: missing", "param": None}
    failed["metadata"]["annotations"][ANN + "cancelled-at"] = "2026-01-01T00:10:00Z"
    cancelled = service.job_object(CALLER, failed, None)
    assert cancelled["status"] == "cancelled" and cancelled["error"] is None
    assert cancelled["finished_at"] == cancelled["created_at"] + 600


def test_estimated_finish_from_progress():
    running = lorajob("Training", progress={"step": 5, "etaSeconds": 120, "updatedAt": "2026-01-01T00:30:00Z"})
    job = SelfService(None, Catalogue()).job_object(CALLER, running, None)  # type: ignore[arg-type]
    assert job["estimated_finish"] == job["created_at"] + 1800 + 120
