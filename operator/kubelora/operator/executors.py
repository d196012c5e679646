"""Where training runs: a batch/v1 Job (production) or a local process (development, the demo).

Both give the same Observation, so the LoRAJob state machine does not know which one ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from kubelora import storage
from kubelora.api.v1alpha1 import LoRAJob
from kubelora.operator import names
from kubelora.operator.config import OperatorConfig
from kubelora.operator.jobspec import EXIT_CONFIG_ERROR, build_job, build_service, spec_annotation
from kubelora.operator.observe import (
    Observation,
    RunLedger,
    TrainerReport,
    container_runs,
    running_seconds,
    seconds_between,
)

#: The trainer mirrors its report under ``<output>/_kubelora/<LoRAJob UID>/`` (docs/trainer.md), so a LoRAJob
#: re-created under the same name and output never reads the report of the run before it.
REPORT_PREFIX = "_kubelora/"
# Container waiting reasons that need the user (a wrong Secret key, an image that cannot be pulled).
CONTAINER_ERRORS = frozenset(
    {"CreateContainerConfigError", "CreateContainerError", "ErrImagePull", "ImagePullBackOff", "InvalidImageName"}
)
#: The reason of a pod the kubelet stopped at its activeDeadlineSeconds, and of a LoRAJob whose last attempt it was.
DEADLINE_EXCEEDED = "DeadlineExceeded"
#: The container whose running time is the run's GPU time.
TRAINER_CONTAINER = "trainer"
#: A namespace ResourceQuota refuses the Job or its pods (e.g. requests.nvidia.com/gpu); the run waits for quota.
QUOTA_EXCEEDED = "QuotaExceeded"
#: Kueue has not admitted the suspended Job yet; the reason when its Workload says nothing more.
KUEUE_PENDING = "PendingAdmission"
KUEUE_GROUP = "kueue.x-k8s.io"
#: Served by Kueue v0.17 (v1beta2) and by the releases before it (v1beta1); the first one served is used.
KUEUE_VERSIONS = ("v1beta2", "v1beta1")
KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"


class StartRefusedError(Exception):
    """The run could not be started for a reason the user must see (a condition and an event)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


#: A Job without pods is asked about quota refusals (an events LIST) once it is this old, and then at most this
#: often: a Job controller busy with many Jobs leaves them podless for a while, and a LIST per look per Job
#: would cost more than the refusal message is worth. Three reconcile intervals (30 s by default).
QUOTA_CHECK_SECONDS = 3 * float(os.environ.get("KUBELORA_RECONCILE_INTERVAL", "10"))


def _age_seconds(timestamp: str | None) -> float:
    """Seconds since an RFC 3339 timestamp of the API server; infinite when there is none."""
    import datetime

    if not timestamp:
        return float("inf")
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return (datetime.datetime.now(datetime.UTC) - then).total_seconds()


class Executor(Protocol):
    def start(self, lorajob: LoRAJob, credentials: dict[str, str], estimate: dict[str, Any] | None = None) -> str:
        """Start the run unless it exists; idempotent. Returns the run's name; raises StartRefusedError.
        ``estimate`` is the preflight's (not yet in the status on a first start): it sizes the grace period."""

    def observe(self, lorajob: LoRAJob, credentials: dict[str, str], read_progress: bool) -> Observation: ...

    def read_outcome(self, lorajob: LoRAJob, credentials: dict[str, str]) -> TrainerReport:
        """The terminal report of this LoRAJob's run, for a run whose Job (or process) is gone."""

    def cancel(self, lorajob: LoRAJob) -> None: ...


def report_prefix(lorajob: LoRAJob) -> str:
    uid = lorajob.metadata.uid
    return f"{REPORT_PREFIX}{uid}/" if uid else REPORT_PREFIX


def report_location(lorajob: LoRAJob, name: str) -> storage.S3Location:
    return storage.parse_s3(lorajob.spec.output.uri).child(report_prefix(lorajob) + name)


def http_pool(connect: float = 3.0, read: float = 15.0, maxsize: int = 16) -> Any:
    """An urllib3 pool for the operator's own S3 calls: tight timeouts, a connect retried once, a read never.

    minio's default waits five minutes for a read; a tenant's dead endpoint must cost seconds, not a worker.
    """
    import urllib3

    return urllib3.PoolManager(
        timeout=urllib3.util.Timeout(connect=connect, read=read),
        retries=urllib3.Retry(total=1, read=0, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        maxsize=maxsize,
    )


def s3_client(credentials: dict[str, str], http: Any | None = None) -> Any:
    """A minio client for one role's credentials (env form) on the shared pool `http`."""
    from minio import Minio

    endpoint = credentials["S3_ENDPOINT"]
    return Minio(
        endpoint.removeprefix("http://").removeprefix("https://"),
        access_key=credentials.get("AWS_ACCESS_KEY_ID") or None,
        secret_key=credentials.get("AWS_SECRET_ACCESS_KEY") or None,
        secure=credentials.get("S3_SECURE", "false").lower() == "true" or endpoint.startswith("https://"),
        http_client=http if http is not None else _default_http(),
    )


_HTTP: Any = None


def _default_http() -> Any:
    global _HTTP
    if _HTTP is None:
        _HTTP = http_pool()
    return _HTTP


def read_s3_report(
    lorajob: LoRAJob, credentials: dict[str, str], files: tuple[str, ...], http: Any | None = None
) -> TrainerReport:
    """The trainer's progress snapshot and final result, from next to the adapter."""
    if not lorajob.spec.output.uri.startswith("s3://") or "S3_ENDPOINT" not in credentials:
        return TrainerReport()
    client = s3_client(credentials, http)
    report = TrainerReport()
    for name in files:
        snapshot = storage.read_json(client, report_location(lorajob, name))
        if snapshot:
            loaded = TrainerReport.from_snapshot(snapshot)
            for field in ("phase", "progress", "result", "error", "estimate"):
                value = getattr(loaded, field)
                if value is not None:
                    setattr(report, field, value)
    return report


def _pod_observation(pods: list[dict[str, Any]]) -> tuple[str, str, str] | None:
    """(state, reason, message) from the newest pod, when it says more than the Job does."""
    pod = _newest(pods)
    if pod is None:
        return None
    status = pod.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return "Queued", condition.get("reason") or "Unschedulable", condition.get("message") or ""
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in CONTAINER_ERRORS:
            # The kubelet keeps retrying (the Secret or image may appear), so this is not terminal,
            # but the user must see it: "couldn't find key accessKey in Secret team-a/s3-creds".
            detail = waiting.get("message") or waiting["reason"]
            return "Pending", str(waiting["reason"]), f"Container {container.get('name')}: {detail}"
    if status.get("phase") in ("Running", "Succeeded", "Failed"):
        # A pod that has just ended is still the run in progress until the Job controller records
        # it (Complete, Failed, or a retry); without this the phase would flap back to Pending.
        return "Running", "", ""  # the reason is the phase: Training or Evaluating
    return None


def _termination_message(pods: list[dict[str, Any]]) -> tuple[str, str]:
    """(reason, message) from the newest pod's terminated container.

    The trainer writes a JSON summary ({"reason", "message", ...}) to its termination log; anything
    else (a kubelet's FallbackToLogsOnError tail, another image) is passed on as text.
    """
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True):
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated") or {}
            text = str(terminated.get("message") or "").strip()
            if not text:
                continue
            try:
                summary = json.loads(text)
            except ValueError:
                return "", text[-1024:]
            if isinstance(summary, dict) and summary.get("message"):
                return str(summary.get("reason") or ""), str(summary["message"])[:1024]
            return "", text[-1024:]
    return "", ""


def _newest(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", default=None)


def quota_refusal(events: list[dict[str, Any]]) -> str | None:
    """The message of the newest FailedCreate event that says a ResourceQuota refused the Job's pods (pure)."""
    refused = [
        e for e in events if e.get("reason") == "FailedCreate" and "exceeded quota" in str(e.get("message") or "")
    ]
    if not refused:
        return None
    newest = max(refused, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    return str(newest.get("message") or "")


def workload_state(workload: dict[str, Any] | None) -> tuple[str, str]:
    """(reason, message) of a Kueue Workload that has not been admitted (pure).

    Kueue says why in the QuotaReserved condition (reason Pending, "couldn't assign flavors to pod set ...:
    insufficient quota ..."), and the position in the queue in status.requeueState / the message.
    """
    if workload is None:
        return KUEUE_PENDING, "Waiting for Kueue to create the Workload of the Job"
    status = workload.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    for kind in ("QuotaReserved", "Admitted"):
        condition = conditions.get(kind)
        if condition is not None and condition.get("status") == "False":
            reason = str(condition.get("reason") or "Pending")
            message = str(condition.get("message") or "")
            return f"Kueue{reason}" if not reason.startswith("Kueue") else reason, message
    evicted = conditions.get("Evicted")
    if evicted is not None and evicted.get("status") == "True":
        return "KueueEvicted", str(evicted.get("message") or "")
    quota = conditions.get("QuotaReserved")
    if quota is not None and quota.get("status") == "True":
        return "KueueAdmitting", str(quota.get("message") or "Quota reserved; waiting for admission checks")
    return KUEUE_PENDING, "Waiting for Kueue to admit the Workload"


def pods_per_attempt(job: Mapping[str, Any]) -> int:
    """Pods of one attempt: a multi-node Job (Indexed, parallelism = completions = nodes) runs all its nodes' pods
    at once, and an attempt that fails ends all of them; otherwise one."""
    spec = job.get("spec") or {}
    if spec.get("completionMode") not in (None, "Indexed"):
        return 1
    nodes = spec.get("parallelism") or spec.get("completions") or 1
    try:
        return max(1, int(nodes))
    except (TypeError, ValueError):
        return 1


def observe_job(
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    deadline_seconds: int | None = None,
    quota_message: str | None = None,
) -> Observation:
    """Map a Job and its pods to an Observation (pure; unit-tested without a cluster).

    `deadline_seconds` is the pods' activeDeadlineSeconds, only for the message of an attempt that exceeded it.
    `quota_message` is what a ResourceQuota said when it refused the Job's pods (a FailedCreate event).
    """
    if job is None:
        return Observation(state="NotStarted")
    status = job.get("status") or {}
    name = job["metadata"]["name"]
    # Every pod the Job made: counted (failed, succeeded), running (active), and those between, which a watch
    # can see first: terminating, or terminated but not yet counted (the Job controller's pod finalizers).
    uncounted = status.get("uncountedTerminatedPods") or {}
    pods_made = sum(int(status.get(k) or 0) for k in ("failed", "active", "succeeded", "terminating")) + sum(
        len(uncounted.get(k) or []) for k in ("failed", "succeeded")
    )
    attempts = -(-pods_made // pods_per_attempt(job))
    conditions = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
    base = Observation(state="Pending", attempts=attempts, started_at=status.get("startTime"), run_name=name)
    base.running_seconds = running_seconds(pods, TRAINER_CONTAINER)
    if "Complete" in conditions:
        base.state = "Succeeded"
        base.finished_at = status.get("completionTime") or conditions["Complete"].get("lastTransitionTime")
        return base
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed is not None:
        base.state = "Failed"
        trainer_reason, detail = _termination_message(pods)
        base.reason = trainer_reason or failed.get("reason") or "JobFailed"
        base.message = "; ".join(m for m in (detail, failed.get("message") or "") if m)
        base.finished_at = failed.get("lastTransitionTime")
        newest = _newest(pods)
        if newest is not None and (newest.get("status") or {}).get("reason") == DEADLINE_EXCEEDED:
            # The kubelet stopped the last attempt at its deadline; the trainer only saw a SIGTERM ("Interrupted").
            limit = f" of {deadline_seconds}s" if deadline_seconds else ""
            stopped = (
                f"Attempt {attempts or 1} exceeded its deadline{limit} (spec.activeDeadlineSeconds, which applies "
                "to each attempt) and was stopped"
            )
            base.reason = DEADLINE_EXCEEDED
            base.message = "; ".join(m for m in (stopped, detail, failed.get("message") or "") if m)
        return base
    pod_state = _pod_observation(pods)
    if pod_state is not None:
        base.state, base.reason, base.message = pod_state  # type: ignore[assignment]
    elif quota_message and not int(status.get("active") or 0):
        base.reason = QUOTA_EXCEEDED
        base.message = (
            f"A ResourceQuota of the namespace refuses the training pods; the Job retries when quota frees up: "
            f"{quota_message}"
        )
    return base


def job_suspended(job: dict[str, Any] | None) -> bool:
    """A Job that has not finished and is held suspended (by its spec, e.g. until Kueue admits it)."""
    if job is None or not (job.get("spec") or {}).get("suspend"):
        return False
    finished = {"Complete", "Failed", "FailureTarget"}
    return not any(
        c.get("type") in finished and c.get("status") == "True"
        for c in (job.get("status") or {}).get("conditions") or []
    )


class JobExecutor:
    """Runs the trainer as a batch/v1 Job. Job and pod state come from kopf's in-memory indexes.

    Jobs are indexed by the UID of their controlling LoRAJob and pods by the UID of their controlling Job
    (ownerReferences), never by name or label: a Job that only looks like ours is not ours.
    """

    #: How often the run ledger forgets the Jobs that are gone, in seconds.
    LEDGER_PRUNE_INTERVAL = 300.0

    def __init__(self, api_client: Any, config: OperatorConfig) -> None:
        from kubernetes import client

        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.config = config
        self.jobs: Any = {}
        self.pods: Any = {}
        self.ledger = RunLedger()
        self.ledger_pruned_at = time.monotonic()
        # Job UID -> when its quota refusals were last listed, and the refusal found (kept only while it holds).
        self.quota_checked: dict[str, float] = {}
        self.quota_refused: dict[str, str] = {}
        self.http = http_pool(config.s3_connect_timeout_seconds, config.s3_read_timeout_seconds)

    def bind(self, jobs: Any, pods: Any) -> None:
        """Read Jobs (by LoRAJob UID) and pods (by Job UID) from these mappings (kopf indexes)."""
        self.jobs, self.pods = jobs, pods

    def _job(self, lorajob: LoRAJob) -> dict[str, Any] | None:
        jobs = list(self.jobs.get(lorajob.metadata.uid, [])) if lorajob.metadata.uid else []
        # One Job per LoRAJob; the newest, should an older operator version have named it otherwise.
        return max(jobs, key=lambda j: j["metadata"].get("creationTimestamp") or "", default=None)

    def start(self, lorajob: LoRAJob, credentials: dict[str, str], estimate: dict[str, Any] | None = None) -> str:
        from kubernetes.client.exceptions import ApiException

        body: Any = build_job(lorajob, self.config, estimate)
        namespace, name = lorajob.metadata.namespace or "default", str(body["metadata"]["name"])
        service: Any = build_service(lorajob)
        if service is not None:
            # First, so pod 0's hostname resolves when the pods start. Owned by the LoRAJob like the Job.
            try:
                self.core.create_namespaced_service(namespace, service)
            except ApiException as exc:
                if exc.status != 409:
                    if exc.status is not None and 400 <= exc.status < 500:
                        raise StartRefusedError(
                            _refusal_reason(exc),
                            f"The API server refused Service {namespace}/{service['metadata']['name']}: "
                            f"{api_message(exc)}",
                        ) from None
                    raise
        try:
            # The created Job comes back through the watch; decoding the answer into V1Job models is wasted CPU.
            response: Any = self.batch.create_namespaced_job(namespace, body, _preload_content=False)
            response.drain_conn()
        except ApiException as exc:
            if exc.status == 409:
                jobs = self.jobs.get(lorajob.metadata.uid, []) if lorajob.metadata.uid else []
                if any(job["metadata"]["name"] == name for job in jobs):
                    return name  # an earlier pass made it
                raise StartRefusedError(
                    "JobNameConflict",
                    f"Job {namespace}/{name} exists but is not controlled by this LoRAJob; it is neither adopted "
                    "nor read. Delete that Job, or re-create the LoRAJob (its new UID gives another Job name)",
                ) from None
            if exc.status is not None and 400 <= exc.status < 500:
                raise StartRefusedError(
                    _refusal_reason(exc), f"The API server refused Job {namespace}/{name}: {api_message(exc)}"
                ) from None
            raise
        return name

    def observe(self, lorajob: LoRAJob, credentials: dict[str, str], read_progress: bool) -> Observation:
        job = self._job(lorajob)
        pods = list(self.pods.get(job["metadata"].get("uid"), [])) if job is not None else []
        if job_suspended(job):
            assert job is not None
            reason, message = workload_state(self._workload(job))
            # A Job suspended again (Kueue evicted it) keeps the GPU time its earlier runs used.
            seconds = self.ledger.record(str(job["metadata"].get("uid")), container_runs(pods, TRAINER_CONTAINER))
            return Observation(
                state="Queued",
                reason=reason,
                message=message,
                run_name=job["metadata"]["name"],
                running_seconds=seconds,
            )
        quota = self._quota_refusal(job) if job is not None and not pods else None
        observation = observe_job(job, pods, lorajob.spec.active_deadline_seconds, quota)
        if job is not None:
            # Every run seen of this Job, including those whose pods are gone since.
            job_uid = str(job["metadata"].get("uid") or job["metadata"]["name"])
            observation.running_seconds = self.ledger.record(job_uid, container_runs(pods, TRAINER_CONTAINER))
        self._prune_ledger()
        if observation.state == "Succeeded":
            observation.report = read_s3_report(lorajob, credentials, ("progress.json", "result.json"), self.http)
        elif observation.state == "Failed":
            # The trainer mirrors its error (reason, file:line message) next to the output; it says more
            # than a termination message, which a kubelet may have cut to the log's last 2 KiB.
            observation.report = read_s3_report(lorajob, credentials, ("result.json",), self.http)
        elif observation.state == "Running" and read_progress:
            observation.report = read_s3_report(lorajob, credentials, ("progress.json",), self.http)
        return observation

    def _workload(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """The Kueue Workload of this Job: the one whose controller ownerReference is the Job (by UID)."""
        from kubernetes.client.exceptions import ApiException

        meta = job["metadata"]
        listed: Any = {}
        for version in KUEUE_VERSIONS:
            try:
                # Kueue labels each Workload with its Job's UID: one small LIST, not every Workload in the namespace
                listed = self.custom.list_namespaced_custom_object(
                    KUEUE_GROUP,
                    version,
                    meta["namespace"],
                    "workloads",
                    label_selector=f"{KUEUE_JOB_UID}={meta.get('uid')}",
                )
                break
            except ApiException as exc:
                if exc.status == 404:
                    continue  # this Kueue does not serve that version (or Kueue is not installed)
                if exc.status == 403:
                    return None  # not readable: the generic message
                raise
        for workload in listed.get("items") or []:
            if names.controller_uid(workload.get("metadata") or {}, "batch/v1", "Job") == meta.get("uid"):
                return dict(workload)
        return None

    def _quota_refusal(self, job: dict[str, Any]) -> str | None:
        """What a ResourceQuota said when it refused this Job's pods: the Job controller's FailedCreate events."""
        from kubernetes.client.exceptions import ApiException

        meta = job["metadata"]
        if int((job.get("status") or {}).get("active") or 0):
            return None
        uid = str(meta.get("uid"))
        now = time.monotonic()
        if (
            _age_seconds(meta.get("creationTimestamp")) < QUOTA_CHECK_SECONDS
            or now - self.quota_checked.get(uid, -QUOTA_CHECK_SECONDS) < QUOTA_CHECK_SECONDS
        ):
            # Every Job is podless for its first moments; a Pending LoRAJob is looked at again every
            # reconcile interval, so a later look checks. The last answer stands until then.
            return self.quota_refused.get(uid)
        self.quota_checked[uid] = now
        try:
            listed = self.core.list_namespaced_event(
                meta["namespace"], field_selector=f"involvedObject.uid={meta.get('uid')},reason=FailedCreate"
            )
        except ApiException as exc:
            if exc.status == 403:
                return None
            raise
        events = [
            {
                "reason": e.reason,
                "message": e.message,
                "lastTimestamp": str(e.last_timestamp or e.event_time or ""),
            }
            for e in listed.items or []
        ]
        refused = quota_refusal(events)
        if refused is None:
            self.quota_refused.pop(uid, None)
        else:
            self.quota_refused[uid] = refused
        return refused

    def _prune_ledger(self) -> None:
        if time.monotonic() - self.ledger_pruned_at < self.LEDGER_PRUNE_INTERVAL:
            return
        self.ledger_pruned_at = time.monotonic()
        live = {
            str(job["metadata"].get("uid") or job["metadata"]["name"])
            for store in list(self.jobs.values())
            for job in list(store)
        }
        self.ledger.retain(live)
        for seen in (self.quota_checked, self.quota_refused):
            for uid in [u for u in seen if u not in live]:
                del seen[uid]

    def read_outcome(self, lorajob: LoRAJob, credentials: dict[str, str]) -> TrainerReport:
        """The run's own terminal report, for a run whose Job is gone."""
        return read_s3_report(lorajob, credentials, ("result.json",), self.http)

    def cancel(self, lorajob: LoRAJob) -> None:
        """Deleting the LoRAJob deletes the Job through its owner reference; nothing else to do."""


def _refusal_reason(exc: Any) -> str:
    """QuotaExceeded when a ResourceQuota refused the object (403, "exceeded quota"), else JobRejected."""
    return QUOTA_EXCEEDED if exc.status == 403 and "exceeded quota" in api_message(exc) else "JobRejected"


def api_message(exc: Any) -> str:
    """The API server's own message from an ApiException (its Status body), else its reason."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or exc.reason or exc.status)[:900]


class LocalExecutor:
    """Runs the trainer as a local process: the same state machine on a machine with no kubelet."""

    def __init__(self, config: OperatorConfig, python: str = sys.executable) -> None:
        self.root = Path(config.local_workdir)
        self.python = python

    def _dir(self, lorajob: LoRAJob) -> Path:
        run = names.run_directory(lorajob.metadata.name, lorajob.metadata.uid)
        return self.root / (lorajob.metadata.namespace or "default") / run

    def _pid(self, run_dir: Path) -> int | None:
        try:
            pid = int((run_dir / "pid").read_text())
        except (OSError, ValueError):
            return None
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)  # reap our own child so it does not linger as a zombie
            if waited == pid:
                return None
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def _exit_code(self, run_dir: Path) -> int | None:
        try:
            return int((run_dir / "exit-code").read_text().strip())
        except (OSError, ValueError):
            return None

    def _attempts(self, run_dir: Path) -> int:
        try:
            return int((run_dir / "attempts").read_text())
        except (OSError, ValueError):
            return 0

    def _spawn(self, lorajob: LoRAJob, run_dir: Path, credentials: dict[str, str]) -> None:
        attempts = self._attempts(run_dir) + 1
        (run_dir / "attempts").write_text(str(attempts))
        (run_dir / "exit-code").unlink(missing_ok=True)
        command = [self.python, "-m", "kubelora.trainer", "--spec", str(run_dir / "lorajob.json")]
        command += ["--report-file", str(run_dir / "report.jsonl"), "--workdir", str(run_dir / "work")]
        # The shell records the exit code, so a restarted operator still learns how the run ended.
        script = 'exec 1>>"$RUN_DIR/trainer.log" 2>&1; "$@"; echo $? > "$RUN_DIR/exit-code.tmp"; '
        script += 'mv "$RUN_DIR/exit-code.tmp" "$RUN_DIR/exit-code"'
        # The run gets its roles' credentials (BASE_MODEL_AWS_ACCESS_KEY_ID, ...) and none of this process's own.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env = {**inherited, **credentials, "RUN_DIR": str(run_dir), "KUBELORA_LOCAL_ATTEMPT": str(attempts)}
        env["KUBELORA_LORAJOB_UID"] = lorajob.metadata.uid or ""
        process = subprocess.Popen(
            ["/bin/sh", "-c", script, "kubelora-trainer", *command], env=env, start_new_session=True, cwd=run_dir
        )
        (run_dir / "pid").write_text(str(process.pid))

    def start(self, lorajob: LoRAJob, credentials: dict[str, str], estimate: dict[str, Any] | None = None) -> str:
        run_dir = self._dir(lorajob)
        if (run_dir / "pid").is_file():
            return run_dir.name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "lorajob.json").write_text(spec_annotation(lorajob))
        self._spawn(lorajob, run_dir, credentials)
        return run_dir.name

    def observe(self, lorajob: LoRAJob, credentials: dict[str, str], read_progress: bool) -> Observation:
        run_dir = self._dir(lorajob)
        if not (run_dir / "pid").is_file():
            return Observation(state="NotStarted")
        report = TrainerReport.from_jsonl(run_dir / "report.jsonl")
        attempts = self._attempts(run_dir)
        observation = Observation(state="Running", attempts=attempts, run_name=run_dir.name, report=report)
        observation.started_at = _iso_mtime(run_dir / "lorajob.json")
        # Attempts run back to back with no queue in between: the run time is the time since the first started.
        observation.running_seconds = seconds_between(observation.started_at, None)
        code = self._exit_code(run_dir)
        if code is None:
            if self._pid(run_dir) is None:
                # The process died without recording an exit code (killed with the operator): run again.
                code = 137
            else:
                return observation
        if code == 0:
            observation.state = "Succeeded"
            observation.finished_at = _iso_mtime(run_dir / "exit-code")
            observation.running_seconds = seconds_between(observation.started_at, observation.finished_at)
            return observation
        retryable = code != EXIT_CONFIG_ERROR and attempts <= lorajob.spec.retries
        if retryable:
            self._spawn(lorajob, run_dir, credentials)
            observation.attempts = attempts + 1
            observation.reason, observation.message = "Retrying", f"Attempt {attempts} exited with code {code}"
            return observation
        observation.state = "Failed"
        observation.reason = (report.error or {}).get("reason") or (
            "ConfigError" if code == EXIT_CONFIG_ERROR else "BackoffLimitExceeded"
        )
        observation.message = (report.error or {}).get(
            "message"
        ) or f"Trainer exited with code {code} after {attempts} attempt(s)"
        observation.finished_at = _iso_mtime(run_dir / "exit-code") if (run_dir / "exit-code").exists() else None
        observation.running_seconds = seconds_between(observation.started_at, observation.finished_at)
        return observation

    def read_outcome(self, lorajob: LoRAJob, credentials: dict[str, str]) -> TrainerReport:
        return TrainerReport.from_jsonl(self._dir(lorajob) / "report.jsonl")

    def cancel(self, lorajob: LoRAJob) -> None:
        pid = self._pid(self._dir(lorajob))
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)


def _iso_mtime(path: Path) -> str | None:
    import datetime

    try:
        stamp = path.stat().st_mtime
    except OSError:
        return None
    return (
        datetime.datetime.fromtimestamp(stamp, datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    )
