"""One reconcile pass with fakes for the cluster, the executor and S3: what starts a run, and what never does."""

from __future__ import annotations

import json
import types
from typing import Any

import kopf
import pytest
from kubernetes.client.exceptions import ApiException

from kubelora import storage
from kubelora.operator import handlers, lorajobs
from kubelora.operator.config import OperatorConfig
from kubelora.operator.executors import JobExecutor, StartRefusedError
from kubelora.operator.jobspec import job_name
from kubelora.operator.observe import Observation, RunLedger, TrainerReport
from kubelora.operator.preflight import Probe
from tests.operator.harness import TINY_CONFIG as LLAMA
from tests.operator.test_jobspec import lorajob
from tests.operator.test_status import ADAPTER

CONFIG = OperatorConfig(default_s3_endpoint="s3.example:9000")


class FakeCluster:
    def __init__(self, secrets: dict[str, dict[str, str]] | None = None) -> None:
        default = {"accessKey": "team-a-key", "secretKey": "team-a-secret"}
        self.secrets = {"minio-creds": default} if secrets is None else secrets

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.secrets.get(name)

    def gpu_nodes(self, product: str) -> list[dict[str, str]]:
        return [{"nvidia.com/gpu.product": product, "nvidia.com/gpu.memory": "81920"}]


class FakeObjects:
    """S3 as seen by one set of credentials per access key; records who asked for what."""

    def __init__(self, objects: dict[str, bytes] | None = None) -> None:
        self.objects = objects if objects is not None else {}
        self.asked: list[tuple[tuple[str, ...], str, str]] = []

    def probe(self, identity, credentials, location: storage.S3Location, read: bool) -> Probe:
        self.asked.append((identity, credentials["AWS_ACCESS_KEY_ID"], str(location)))
        body = self.objects.get(str(location))
        return Probe(body is not None, body if read else None)


def present(*uris: str) -> FakeObjects:
    objects = {"s3://models/llama/config.json": json.dumps(LLAMA).encode()}
    objects.update({uri: b"{}\n" for uri in uris} or {"s3://data/train.jsonl": b"{}\n"})
    return FakeObjects(objects)


class FakeExecutor:
    def __init__(self, observation: Observation | None = None, outcome: TrainerReport | None = None) -> None:
        self.observation = observation or Observation(state="NotStarted")
        self.outcome = outcome or TrainerReport()
        self.started: list[str] = []
        self.refuse: StartRefusedError | None = None

    def start(self, lorajob: Any, credentials: dict[str, str], estimate: dict[str, Any] | None = None) -> str:
        if self.refuse is not None:
            raise self.refuse
        self.started.append(lorajob.metadata.name)
        self.credentials = credentials
        self.estimate = estimate
        return "support-train-1234abcd"

    def observe(self, lorajob: Any, credentials: dict[str, str], read_progress: bool) -> Observation:
        return self.observation

    def read_outcome(self, lorajob: Any, credentials: dict[str, str]) -> TrainerReport:
        return self.outcome

    def cancel(self, lorajob: Any) -> None:
        pass


def run(job, old, executor, objects=None, cluster=None):
    return lorajobs.reconcile(job, old, executor, cluster or FakeCluster(), CONFIG, objects or present())


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_a_lorajob_whose_inputs_exist_starts_once():
    executor = FakeExecutor()
    status, _ = run(lorajob(), {}, executor)
    assert executor.started == ["support"]
    assert status["phase"] == "Pending" and status["jobName"] == "support-train-1234abcd"
    found = conditions(status)
    assert found["InputsFound"]["status"] == "True" and found["MemoryFits"]["status"] == "True"
    assert found["Preflight"]["reason"] == "ChecksPassed"
    # The run gets each role's own Secret (minio-creds for the model and the output; none for the dataset).
    assert executor.credentials["BASE_MODEL_AWS_ACCESS_KEY_ID"] == "team-a-key"
    assert executor.credentials["DATASET_AWS_ACCESS_KEY_ID"] == ""
    # The first start already has the preflight's estimate (status.estimate is written after it), which
    # sizes the pods' grace period.
    assert executor.estimate is not None and executor.estimate == status["estimate"]


@pytest.mark.parametrize(
    ("missing", "reason", "field"),
    [
        ("s3://models/llama/config.json", "BaseModelNotFound", "spec.baseModel.uri"),
        ("s3://data/train.jsonl", "DatasetNotFound", "spec.dataset.train"),
        ("s3://data/test.jsonl", "DatasetNotFound", "spec.eval.testSet"),
    ],
)
def test_a_missing_input_keeps_the_job_pending_with_no_run(missing, reason, field):
    objects = present("s3://data/train.jsonl", "s3://data/test.jsonl")
    del objects.objects[missing]
    executor = FakeExecutor()
    job = lorajob(eval={"testSet": "s3://data/test.jsonl"})
    status, events = run(job, {}, executor, objects)
    assert executor.started == []
    assert status["phase"] == "Pending" and "jobName" not in status
    inputs = conditions(status)["InputsFound"]
    assert inputs["status"] == "False" and inputs["reason"] == reason and inputs["message"].startswith(field)
    assert conditions(status)["Ready"]["reason"] == reason
    assert [(e.type, e.reason) for e in events] == [("Warning", reason)]
    # Uploaded later: the next pass starts the run.
    objects.objects[missing] = json.dumps(LLAMA).encode()
    started, _ = run(job, status, executor, objects)
    assert executor.started == ["support"] and conditions(started)["InputsFound"]["status"] == "True"


def test_each_input_is_read_with_its_own_roles_secret_and_no_other():
    cluster = FakeCluster(
        {
            "models": {"accessKey": "model-key", "secretKey": "s"},
            "minio-creds": {"accessKey": "out-key", "secretKey": "s"},
        }
    )
    job = lorajob(baseModel={"uri": "s3://models/llama/", "secretRef": {"name": "models"}})
    objects = present()
    run(job, {}, FakeExecutor(), objects, cluster)
    asked = {uri: (identity, key) for identity, key, uri in objects.asked}
    identity, key = asked["s3://models/llama/config.json"]
    assert identity[:2] == ("team-a", "models") and key == "model-key"
    # The dataset has no secretRef: it is asked anonymously, not with the model's or the output's keys.
    identity, key = asked["s3://data/train.jsonl"]
    assert key == "" and identity[:2] == ("team-a", "")


def test_hf_and_pvc_locations_are_not_read_by_the_operator():
    objects = FakeObjects()
    executor = FakeExecutor()
    job = lorajob(
        baseModel={"uri": "hf://org/model"},
        dataset={"train": "pvc://data/train.jsonl"},
        eval={"testSet": "file:///data/test.jsonl"},
    )
    status, _ = run(job, {}, executor, objects)
    assert objects.asked == [] and executor.started == ["support"]
    inputs = conditions(status)["InputsFound"]
    assert inputs["status"] == "Unknown" and inputs["reason"] == "NotChecked"
    assert "hf://" in inputs["message"] and "pvc://" in inputs["message"]


def test_an_unreadable_model_config_is_a_warning_that_stays_a_warning():
    objects = present()
    objects.objects["s3://models/llama/config.json"] = b'{"model_type": "no-such-architecture"}'
    executor = FakeExecutor()
    status, events = run(lorajob(), {}, executor, objects)
    assert executor.started == ["support"]
    found = conditions(status)
    assert found["MemoryFits"]["reason"] == "EstimateUnavailable"
    assert found["Preflight"]["status"] == "True" and "EstimateUnavailable" in found["Preflight"]["message"]
    assert "EstimateUnavailable" in [e.reason for e in events]


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_finished_lorajob_never_starts_again(phase):
    """Its Job was garbage-collected and its spec touched: the new generation is recorded, nothing runs."""
    old = {"phase": phase, "observedGeneration": 1, "jobName": "support-train-1234abcd", "adapter": ADAPTER}
    job = lorajob()
    job.metadata.generation = 2
    executor = FakeExecutor(Observation(state="NotStarted"))
    status, events = run(job, old, executor)
    assert executor.started == [] and events == []
    assert status == {**old, "observedGeneration": 2}
    assert lorajobs.needs_reconcile(status, 2) is False


def test_a_run_whose_job_vanished_takes_its_own_result_and_never_runs_again():
    old = {"phase": "Evaluating", "observedGeneration": 1, "jobName": "support-train-1234abcd", "attempts": 1}
    published = FakeExecutor(outcome=TrainerReport(result={"adapter": ADAPTER}))
    status, _ = run(lorajob(), old, published)
    assert status["phase"] == "Succeeded" and published.started == []
    nothing = FakeExecutor()
    status, events = run(lorajob(), old, nothing)
    assert status["phase"] == "Failed" and conditions(status)["Ready"]["reason"] == "JobDeleted"
    assert nothing.started == [] and events[0].type == "Warning"


def test_a_refused_job_is_a_condition_and_an_event_not_only_a_log_line():
    executor = FakeExecutor()
    executor.refuse = StartRefusedError("JobRejected", "The API server refused Job team-a/x: metadata.labels: Invalid")
    status, events = run(lorajob(), {}, executor)
    assert status["phase"] == "Pending" and "jobName" not in status
    assert conditions(status)["Ready"]["reason"] == "JobRejected"
    assert ("Warning", "JobRejected") in [(e.type, e.reason) for e in events]


def job_object(name: str, owner_uid: str | None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "team-a", "uid": f"job-{name}", "labels": labels or {}}
    if owner_uid:
        meta["ownerReferences"] = [
            {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRAJob", "uid": owner_uid, "controller": True}
        ]
    return {"metadata": meta, "status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}}


def test_jobs_are_indexed_by_their_controllers_uid_and_a_lookalike_is_nobodys():
    ours = job_object("support-train-1234abcd", "u-1", {"kubelora.dev/lorajob": "support"})
    lookalike = job_object("support-train", None, {"kubelora.dev/lorajob": "support"})
    assert list(handlers.training_jobs(body=kopf.Body(ours))) == ["u-1"]
    assert handlers.training_jobs(body=kopf.Body(lookalike)) == {}
    pod = {"metadata": {"name": "p", "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "uid": "job-x"}]}}
    assert handlers.training_pods(body=kopf.Body(pod)) == {}  # not its controller


class FakeBatch:
    def __init__(self, status: int | None) -> None:
        self.status = status

    def create_namespaced_job(self, namespace: str, body: dict[str, Any], **_: Any) -> Any:
        if self.status is not None:
            error = ApiException(status=self.status, reason="Conflict")
            error.body = json.dumps({"message": f"jobs.batch {body['metadata']['name']} failed"})
            raise error
        return types.SimpleNamespace(drain_conn=lambda: None)  # the raw answer (_preload_content=False)


def executor_with(status: int | None, jobs: dict[str, list[dict[str, Any]]]) -> JobExecutor:
    executor = JobExecutor.__new__(JobExecutor)
    executor.config, executor.batch = OperatorConfig(), FakeBatch(status)
    executor.ledger, executor.ledger_pruned_at = RunLedger(), 0.0
    executor.quota_checked, executor.quota_refused = {}, {}
    executor.bind(jobs, {})
    return executor


def test_a_409_is_ours_only_when_the_existing_job_is_controlled_by_this_lorajob():
    job = lorajob()
    name = job_name(job)
    assert executor_with(409, {"u-1": [job_object(name, "u-1")]}).start(job, {}) == name
    with pytest.raises(StartRefusedError) as refused:
        executor_with(409, {"u-other": [job_object(name, "u-other")]}).start(job, {})
    assert refused.value.reason == "JobNameConflict" and "not controlled by this LoRAJob" in refused.value.message
    with pytest.raises(StartRefusedError) as invalid:
        executor_with(422, {}).start(job, {})
    assert invalid.value.reason == "JobRejected" and name in invalid.value.message


def test_observe_reads_only_the_job_this_lorajob_controls():
    job = lorajob()
    executor = executor_with(None, {"u-other": [job_object("support-train", "u-other")]})
    assert executor.observe(job, {}, read_progress=False).state == "NotStarted"
    executor.bind({"u-1": [job_object("support-train-1234abcd", "u-1")]}, {})
    observed = executor.observe(job, {}, read_progress=False)
    assert observed.run_name == "support-train-1234abcd"


def test_an_invalid_spec_records_its_generation_and_is_not_validated_again():
    memo = types.SimpleNamespace()
    body = {
        "metadata": {"name": "broken", "namespace": "team-a", "uid": "u-9", "generation": 3},
        "spec": {"baseModel": {"uri": "ftp://nowhere"}},
        "status": {},
    }
    patch, events = handlers.reconcile_body(body, memo)
    assert patch is not None and patch["observedGeneration"] == 3 and patch["phase"] == "Failed"
    assert [e.reason for e in events] == ["InvalidSpec"]
    body["status"] = patch
    assert lorajobs.needs_reconcile(body["status"], 3) is False
    assert handlers.reconcile_body(body, memo) == (None, [])


def test_storage_answers_are_cached_per_tenant_identity_never_shared():
    from kubelora.operator.preflight import S3Objects, identity

    objects = S3Objects()
    asked: list[str] = []

    def ask(credentials, location, read):
        asked.append(credentials["AWS_ACCESS_KEY_ID"])
        return Probe(credentials["AWS_ACCESS_KEY_ID"] == "team-a-key")

    objects._ask = ask  # type: ignore[method-assign]
    location = storage.parse_s3("s3://models/llama/config.json")
    team_a = {"S3_ENDPOINT": "s3:9000", "AWS_ACCESS_KEY_ID": "team-a-key", "AWS_SECRET_ACCESS_KEY": "a"}
    team_b = {"S3_ENDPOINT": "s3:9000", "AWS_ACCESS_KEY_ID": "team-b-key", "AWS_SECRET_ACCESS_KEY": "b"}
    ref_a = types.SimpleNamespace(name="creds")
    assert objects.probe(identity("team-a", ref_a, team_a), team_a, location, read=False).found
    assert objects.probe(identity("team-a", ref_a, team_a), team_a, location, read=False).found
    # Team B, even with a Secret of the same name, is asked on its own and gets its own answer.
    assert not objects.probe(identity("team-b", ref_a, team_b), team_b, location, read=False).found
    # A rotated key in the same Secret is a new identity too.
    rotated = {**team_a, "AWS_SECRET_ACCESS_KEY": "rotated"}
    objects.probe(identity("team-a", ref_a, rotated), rotated, location, read=False)
    assert asked == ["team-a-key", "team-b-key", "team-a-key"]
