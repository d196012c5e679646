"""The self-service API with the real openai client: files, jobs, tenancy, authorization and cancel.

No trainer runs here (tests/selfservice/test_e2e.py trains and serves one job): the API process runs
under the chart's RBAC, the LoRAJobs it creates are checked in the cluster, and for cancel the real
operator creates the training Job that the API then stops.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from kubelora.devenv import cluster
from tests.conftest import kubectl_runner, wait_for
from tests.operator.harness import TINY_CONFIG, OperatorProcess, get
from tests.selfservice.conftest import (
    CHAT_ROW,
    ApiIdentity,
    ApiProcess,
    Tenant,
    client_for,
    drop_tenant,
    empty_bucket,
    jsonl,
    make_tenant,
    sa_kubeconfig,
    token,
)

pytestmark = [pytest.mark.e2e]

MAX_FILE_BYTES = 64 * 1024


def catalogue(bucket: str) -> dict[str, Any]:
    return {
        "maxFileBytes": MAX_FILE_BYTES,
        "models": {
            "tiny-llama": {
                "uri": f"s3://{bucket}/base/",
                "gpus": 1,
                "gpuType": "NVIDIA-A100-SXM4-80GB",
                "training": {"maxSteps": 10, "maxSeqLength": 64},
                "eval": {"metrics": ["exact_match"], "maxNewTokens": 4},
                "retries": 0,
            }
        },
        "servingPools": {
            "support": {
                "target": {
                    "deploymentName": "vllm",
                    "baseModel": f"s3://{bucket}/base",
                    "agentTokenSecretRef": {"name": "agent"},
                },
            }
        },
    }


@pytest.fixture(scope="module")
def shared_bucket(minio_client: Any) -> Iterator[str]:
    name = f"t-ss-{uuid.uuid4().hex[:10]}"
    minio_client.make_bucket(name)
    data = json.dumps(TINY_CONFIG).encode()
    minio_client.put_object(name, "base/config.json", io.BytesIO(data), len(data))
    yield name
    empty_bucket(minio_client, name)


@pytest.fixture(scope="module")
def tenants(devenv: cluster.DevEnv, minio_client: Any, shared_bucket: str) -> Iterator[dict[str, Tenant]]:
    kubectl = kubectl_runner(devenv)
    made: dict[str, Tenant] = {}
    try:
        made["a"] = make_tenant(devenv, kubectl, minio_client, shared_bucket)
        made["b"] = make_tenant(devenv, kubectl, minio_client, shared_bucket)
        yield made
    finally:
        for tenant in made.values():
            drop_tenant(kubectl, tenant)


@pytest.fixture(scope="module")
def api(
    api_identity: ApiIdentity, shared_bucket: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiProcess]:
    proc = ApiProcess(api_identity, catalogue(shared_bucket), tmp_path_factory.mktemp("api"))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def alice(api: ApiProcess, tenants: dict[str, Tenant]) -> Any:
    return client_for(api, tenants["a"].users["alice"])


@pytest.fixture(scope="module")
def bob(api: ApiProcess, tenants: dict[str, Tenant]) -> Any:
    return client_for(api, tenants["b"].users["alice"])


def upload(client: Any, rows: list[Any], name: str = "train.jsonl") -> Any:
    return client.files.create(file=(name, jsonl(rows)), purpose="fine-tune")


def test_files_round_trip_into_the_tenants_prefix(alice, bob, tenants, minio_client):
    tenant = tenants["a"]
    created = upload(alice, [CHAT_ROW] * 3, "tickets.jsonl")
    assert created.id.startswith("file-") and created.purpose == "fine-tune" and created.filename == "tickets.jsonl"
    assert created.bytes == len(jsonl([CHAT_ROW] * 3))
    # Stored under the tenant's own prefix, byte for byte.
    stored = minio_client.get_object(tenant.bucket, f"{tenant.prefix}files/{created.id}.jsonl").read()
    assert stored == jsonl([CHAT_ROW] * 3)
    assert alice.files.retrieve(created.id).bytes == created.bytes
    assert created.id in [f.id for f in alice.files.list()]
    # Another namespace neither lists nor reads it.
    assert created.id not in [f.id for f in bob.files.list()]
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.delete(created.id)
    assert alice.files.delete(created.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(created.id)


def test_a_malformed_upload_is_refused_with_its_line_number(alice, tenants, minio_client):
    rows = [CHAT_ROW, CHAT_ROW, {"msgs": [{"role": "user", "content": "hi"}]}, CHAT_ROW]
    with pytest.raises(openai.BadRequestError) as refused:
        upload(alice, rows, "bad.jsonl")
    assert refused.value.status_code == 400
    message = refused.value.body["message"]
    assert "bad.jsonl:3" in message and "messages" in message, message
    with pytest.raises(openai.BadRequestError) as not_json:
        upload(alice, [CHAT_ROW, "{not json"], "broken.jsonl")
    assert "broken.jsonl:2: invalid JSON" in not_json.value.body["message"]
    # Nothing was stored.
    tenant = tenants["a"]
    names = [o.object_name for o in minio_client.list_objects(tenant.bucket, prefix=f"{tenant.prefix}files/")]
    stored = [json.loads(minio_client.get_object(tenant.bucket, n).read()) for n in names if n.endswith(".json")]
    assert [m["filename"] for m in stored if m["filename"] in ("bad.jsonl", "broken.jsonl")] == []


def test_an_upload_over_the_limit_is_refused(alice, tenants, minio_client):
    rows = [CHAT_ROW] * (MAX_FILE_BYTES // len(json.dumps(CHAT_ROW)) + 10)
    with pytest.raises(openai.APIStatusError) as refused:
        upload(alice, rows, "big.jsonl")
    assert refused.value.status_code == 413
    assert refused.value.body["code"] == "file_too_large"
    # Refused before anything was stored.
    tenant = tenants["a"]
    names = [o.object_name for o in minio_client.list_objects(tenant.bucket, prefix=f"{tenant.prefix}files/")]
    stored = [json.loads(minio_client.get_object(tenant.bucket, n).read()) for n in names if n.endswith(".json")]
    assert [m for m in stored if m["filename"] == "big.jsonl"] == []


def test_bad_tokens_and_missing_rights_are_refused(api, tenants, alice):
    with pytest.raises(openai.AuthenticationError):
        client_for(api, "not-a-kubernetes-token").files.list()
    reader = client_for(api, tenants["a"].users["reader"])
    training = upload(alice, [CHAT_ROW] * 4)
    # A token without `create lorajobs` in its namespace cannot start a job (or upload) ...
    with pytest.raises(openai.PermissionDeniedError) as denied:
        reader.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id)
    assert "may not create lorajobs.kubelora.dev" in denied.value.body["message"]
    assert denied.value.body["type"] == "permission_error"
    with pytest.raises(openai.PermissionDeniedError):
        upload(reader, [CHAT_ROW])
    # ... but may read what its namespace has.
    assert training.id in [f.id for f in reader.files.list()]
    # And a token cannot pick another namespace it has no rights in.
    other = client_for(api, tenants["b"].users["alice"], organization=tenants["a"].namespace)
    with pytest.raises(openai.PermissionDeniedError):
        other.files.list()


def kubectl_with_token(devenv: cluster.DevEnv, bearer: str, path: Path, *args: str) -> Any:
    """kubectl with only ``bearer`` as credentials (the admin kubeconfig's client certificate would win)."""
    kubeconfig = sa_kubeconfig(devenv, bearer, path)
    return subprocess.run(
        [str(devenv.bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_token_for_the_api_server_is_refused(api, tenants, devenv, tmp_path):
    """The API requires its own audience: a token that works against the cluster is not an API key."""
    kubectl = kubectl_runner(devenv)
    namespace = tenants["a"].namespace
    plain = token(kubectl, namespace, "alice", audience=None)
    works = kubectl_with_token(devenv, plain, tmp_path / "plain", "get", "lorajobs", "-n", namespace)
    assert works.returncode == 0, works.stderr
    with pytest.raises(openai.AuthenticationError) as refused:
        client_for(api, plain).files.list()
    assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
    # The same ServiceAccount's token for the API's audience is let in, and the API server refuses that one.
    scoped = token(kubectl, namespace, "alice")
    assert client_for(api, scoped).files.list().data is not None
    denied = kubectl_with_token(devenv, scoped, tmp_path / "scoped", "get", "lorajobs", "-n", namespace)
    assert denied.returncode != 0 and "Unauthorized" in denied.stderr, denied.stderr


def test_a_suffix_that_is_not_a_served_name_is_refused(alice, tenants, devenv):
    training = upload(alice, [CHAT_ROW] * 4)
    with pytest.raises(openai.BadRequestError) as refused:
        alice.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=training.id,
            suffix="no spaces",
            extra_body={"kubelora": {"serving_pool": "support"}},
        )
    assert refused.value.body["param"] == "suffix"


def test_a_job_is_a_lorajob_in_the_callers_namespace(alice, bob, tenants, devenv, shared_bucket):
    tenant = tenants["a"]
    kubectl = kubectl_runner(devenv)
    training = upload(alice, [CHAT_ROW] * 4)
    validation = upload(alice, [CHAT_ROW] * 2, "valid.jsonl")
    job = alice.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=training.id,
        validation_file=validation.id,
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2.0},
        suffix="support",
        metadata={"team": "support"},
        extra_body={"kubelora": {"method": "dora", "rank": 4, "gates": [{"metric": "exact_match", "min": 0.5}]}},
    )
    assert job.id.startswith("ftjob-") and job.status == "validating_files"
    assert job.model == "tiny-llama" and job.training_file == training.id and job.validation_file == validation.id
    assert job.metadata == {"team": "support"} and job.organization_id == tenant.namespace
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    lorajob = get(kubectl, tenant.namespace, "lorajob", job.id)
    spec = lorajob["spec"]
    files = f"s3://{shared_bucket}/{tenant.prefix}files"
    assert spec["dataset"]["train"] == f"{files}/{training.id}.jsonl"
    assert spec["dataset"]["validation"] == spec["eval"]["testSet"] == f"{files}/{validation.id}.jsonl"
    assert spec["dataset"]["secretRef"] == {"name": "kubelora-api-storage"}
    assert spec["baseModel"]["uri"] == f"s3://{shared_bucket}/base/"
    assert spec["method"] == "dora" and spec["lora"]["rank"] == 4
    assert spec["output"]["mergedModel"] is True  # DoRA is evaluated as its merged model
    # n_epochs replaces the catalogue's maxSteps; the multiplier scales its learning rate (default 2e-4).
    assert spec["training"]["epochs"] == 2 and "maxSteps" not in spec["training"]
    assert spec["training"]["batchSize"] == 4 and spec["training"]["learningRate"] == pytest.approx(4e-4)
    assert spec["resources"] == {**spec["resources"], "gpus": 1, "gpuType": "NVIDIA-A100-SXM4-80GB"}
    assert spec["eval"]["gates"] == [{"metric": "exact_match", "min": 0.5}]
    assert spec["output"]["uri"] == f"s3://{shared_bucket}/{tenant.prefix}jobs/{job.id}/"
    assert alice.fine_tuning.jobs.retrieve(job.id).id == job.id
    # Another namespace gets 404 for it, on every call, and never sees it listed.
    for call in (
        lambda: bob.fine_tuning.jobs.retrieve(job.id),
        lambda: bob.fine_tuning.jobs.cancel(job.id),
        lambda: bob.fine_tuning.jobs.list_events(job.id),
        lambda: bob.fine_tuning.jobs.checkpoints.list(job.id),
    ):
        with pytest.raises(openai.NotFoundError) as hidden:
            call()
        assert hidden.value.status_code == 404
    assert job.id not in [j.id for j in bob.fine_tuning.jobs.list()]
    # B's token cannot reach into A's namespace by naming it either: 403 for the namespace, never the job.
    assert get(kubectl, tenant.namespace, "lorajob", job.id)["metadata"]["name"] == job.id
    # A file of another namespace cannot be trained on.
    with pytest.raises(openai.NotFoundError) as foreign:
        bob.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id)
    assert foreign.value.body["param"] == "training_file"


def test_list_pages_with_after_and_limit(alice):
    training = upload(alice, [CHAT_ROW] * 4)
    ids = [alice.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id).id for _ in range(3)]
    listed = [j.id for j in alice.fine_tuning.jobs.list(limit=100)]
    assert set(ids) <= set(listed)
    first = alice.fine_tuning.jobs.list(limit=2)
    assert len(first.data) == 2 and first.has_more is True
    second = alice.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert second.data and second.data[0].id == listed[2]
    # The client's auto-pagination walks every page.
    assert [j.id for j in alice.fine_tuning.jobs.list(limit=1)] == listed


def test_unknown_models_and_pools_are_refused(alice):
    training = upload(alice, [CHAT_ROW] * 4)
    with pytest.raises(openai.NotFoundError) as unknown:
        alice.fine_tuning.jobs.create(model="gpt-4o", training_file=training.id)
    assert "tiny-llama" in unknown.value.body["message"] and unknown.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as pool:
        alice.fine_tuning.jobs.create(
            model="tiny-llama", training_file=training.id, extra_body={"kubelora": {"serving_pool": "nope"}}
        )
    assert pool.value.body["code"] == "serving_pool_not_found"


def test_cancel_before_the_run_deletes_the_lorajob_and_keeps_the_job(alice, tenants, devenv, minio_client):
    """No operator runs here: the job has no training Job yet, so cancel deletes its LoRAJob and keeps a record."""
    tenant = tenants["a"]
    kubectl = kubectl_runner(devenv)
    training = upload(alice, [CHAT_ROW] * 4)
    job = alice.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id, metadata={"case": "early"})
    cancelled = alice.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    gone = kubectl("get", "lorajob", job.id, "-n", tenant.namespace, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    record = minio_client.get_object(tenant.bucket, f"{tenant.prefix}jobs/{job.id}/cancelled.json").read()
    assert json.loads(record)["metadata"]["name"] == job.id
    retrieved = alice.fine_tuning.jobs.retrieve(job.id)
    assert retrieved.status == "cancelled" and retrieved.finished_at is not None
    assert [j.id for j in alice.fine_tuning.jobs.list(limit=100, metadata={"case": "early"})] == [job.id]
    with pytest.raises(openai.BadRequestError):
        alice.fine_tuning.jobs.cancel(job.id)


@pytest.fixture
def operator_a(devenv: cluster.DevEnv, tenants: dict[str, Tenant], tmp_path: Path) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(devenv, tenants["a"].namespace, tmp_path)
    proc.start()
    yield proc
    proc.kill(signal.SIGTERM)


def test_cancel_stops_the_job(alice, bob, tenants, devenv, operator_a):
    """The operator starts the training Job; cancel deletes it and the run never starts again."""
    tenant = tenants["a"]
    kubectl = kubectl_runner(devenv)
    training = upload(alice, [CHAT_ROW] * 4)
    job = alice.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id)
    job_name = wait_for(
        "the operator to start the training Job",
        lambda: get(kubectl, tenant.namespace, "lorajob", job.id).get("status", {}).get("jobName"),
        timeout=120,
    )
    assert get(kubectl, tenant.namespace, "job", job_name)
    assert alice.fine_tuning.jobs.retrieve(job.id).status in ("queued", "running", "validating_files")
    # B cannot cancel it.
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.cancel(job.id)
    cancelled = alice.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"

    def job_gone() -> bool:
        result = kubectl("get", "job", job_name, "-n", tenant.namespace, check=False)
        return result.returncode != 0 and "NotFound" in result.stderr

    wait_for("the training Job to be deleted", job_gone, timeout=60)
    # The operator records the run as over and starts no other.
    failed = wait_for(
        "the LoRAJob to record the stopped run",
        lambda: (obj := get(kubectl, tenant.namespace, "lorajob", job.id))["status"].get("phase") == "Failed" and obj,
        timeout=60,
    )
    assert failed["status"]["jobName"] == job_name
    jobs = json.loads(kubectl("get", "jobs", "-n", tenant.namespace, "-o", "json").stdout)["items"]
    assert [j["metadata"]["name"] for j in jobs if j["metadata"]["name"] == job_name] == []
    after = alice.fine_tuning.jobs.retrieve(job.id)
    assert after.status == "cancelled" and after.finished_at is not None
    events = [e.message for e in alice.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert "Cancelled fine-tuning job" in events
    with pytest.raises(openai.BadRequestError):
        alice.fine_tuning.jobs.cancel(job.id)
