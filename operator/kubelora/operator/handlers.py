"""Thin kopf handlers: parse the body, call the service layer, write `patch.status`, post events."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kopf
from pydantic import ValidationError

from kubelora import storage
from kubelora.api.v1alpha1 import API_VERSION, GROUP, VERSION, LoRAJob
from kubelora.operator import lorajobs, metrics, names, persistence, preflight
from kubelora.operator.conditions import now, set_condition
from kubelora.operator.config import OperatorConfig
from kubelora.operator.events import EventPoster
from kubelora.operator.executors import JobExecutor, LocalExecutor
from kubelora.operator.jobspec import LORAJOB_LABEL
from kubelora.operator.workqueue import WorkQueue

# How soon an unfinished LoRAJob is looked at again when no watch would tell of the change it waits for:
# a preflight blocked on a Secret or an input in S3, a run that has not started. Running ones are polled
# every progressIntervalSeconds (the trainer's report); everything else is driven by watch events.
RECONCILE_INTERVAL = float(os.environ.get("KUBELORA_RECONCILE_INTERVAL", "10"))
#: How often a standby replica re-reads the peering object(s) to learn whether kopf paused it.
PEERING_POLL_SECONDS = 2.0
LORAJOBS = (GROUP, VERSION, "lorajobs")
log = logging.getLogger("kubelora.lorajob")

Key = tuple[str, str]  # (namespace, name) of a LoRAJob


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, logger: Any, **_: Any) -> None:
    from kubernetes import client, config

    persistence.configure(settings)
    settings.execution.max_workers = int(os.environ.get("KUBELORA_WORKERS", "16"))
    settings.batching.worker_limit = 1000
    if os.environ.get("KUBELORA_NAMESPACED"):
        # A namespaced operator may not list namespaces; don't spend a minute learning that.
        settings.scanning.disabled = True
    config_path = os.environ.get("KUBELORA_CONFIG")
    memo.config = OperatorConfig.load(Path(config_path) if config_path else None)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    # the reconcile workers, the event pool's 4 threads, and a few for kopf's own handlers
    configuration.connection_pool_maxsize = (settings.execution.max_workers or 16) + 8
    memo.api_client = client.ApiClient(configuration)
    # Like the AdapterDeployments' shared reads (KUBELORA_ADAPTER_SHARED_READ_SECONDS): 0 reads every time.
    memo.cluster = preflight.Cluster(
        memo.api_client, float(os.environ.get("KUBELORA_SECRET_SHARED_READ_SECONDS") or 2.0)
    )
    memo.objects = preflight.S3Objects(
        connect_timeout=memo.config.s3_connect_timeout_seconds, timeout=memo.config.s3_read_timeout_seconds
    )
    if memo.config.executor == "local":
        memo.executor = LocalExecutor(memo.config)
    else:
        memo.executor = JobExecutor(memo.api_client, memo.config)
    memo.progress_read_at = {}
    memo.started_runs = set()  # uids whose run this process started, until the Job shows in the index
    memo.lorajobs = {}  # (namespace, name) -> the latest slim body, from the watch (and our own status writes)
    memo.lorajob_keys = {}  # LoRAJob uid -> (namespace, name): a Job's or pod's event finds its LoRAJob
    memo.job_owners = {}  # Job uid -> its controlling LoRAJob's uid
    memo.reconciling = {}  # uid -> lock: a timed-out run still in its thread and the next never overlap
    memo.workers = settings.execution.max_workers or 16
    # Reconciles block on the API and S3: they run in their own threads, never in kopf's handler pool.
    memo.pool = ThreadPoolExecutor(max_workers=memo.workers, thread_name_prefix="lorajob")
    memo.event_poster = EventPoster(memo.api_client, "LoRAJob")
    memo.queue = WorkQueue[Key](
        "lorajobs",
        functools.partial(reconcile_key, memo=memo),
        workers=memo.workers,
        timeout=memo.config.reconcile_timeout_seconds,
    )
    memo.queue.resync(functools.partial(unfinished_keys, memo), memo.config.resync_seconds)
    peering_name = os.environ.get("KUBELORA_PEERING_NAME")
    if peering_name:
        # kopf starts paused until it has seen the peering object; so does the queue, and it follows kopf after.
        memo.queue.pause()
        memo.peering_task = asyncio.get_running_loop().create_task(
            follow_peering(
                lambda: [q for q in (memo.queue, getattr(memo, "adapter_queue", None)) if q is not None],
                memo.api_client,
                peering_name,
                json.loads(os.environ.get("KUBELORA_PEERING_PLACES", "[null]")),
                os.environ.get("KUBELORA_PEERING_IDENTITY", ""),
                int(os.environ.get("KUBELORA_PEERING_PRIORITY") or settings.peering.priority or 0),
            )
        )
    memo.queue.start()
    # kopf logs every handler run at INFO; at a thousand objects that drowns the phase changes.
    if not os.environ.get("KUBELORA_VERBOSE"):
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    metrics_port = os.environ.get("KUBELORA_METRICS_PORT")
    if metrics_port:
        metrics.serve(int(metrics_port))
    logger.info(
        "Started kubelora operator executor=%s resyncSeconds=%s reconcileTimeoutSeconds=%s",
        memo.config.executor,
        memo.config.resync_seconds,
        memo.config.reconcile_timeout_seconds,
    )


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    task = getattr(memo, "peering_task", None)
    if task is not None:
        task.cancel()
    queue = getattr(memo, "queue", None)
    if queue is not None:
        await queue.stop()
    pool = getattr(memo, "pool", None)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
    event_poster = getattr(memo, "event_poster", None)
    if event_poster is not None:
        event_poster.shutdown()  # the events already asked for still go out
    api_client = getattr(memo, "api_client", None)
    if api_client is not None:
        api_client.close()


#: What a Job's slim spec keeps besides ``suspend``: a multi-node Job's shape, to count its attempts (not its pods).
_JOB_SPEC = ("parallelism", "completions", "completionMode")


def _slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Job as the reconcile reads it: identity, status, whether it is suspended (queued in Kueue), and its
    parallelism, completions and completion mode (pods per attempt)."""
    meta = {k: v for k, v in body["metadata"].items() if k in ("name", "namespace", "creationTimestamp", "uid")}
    slim: dict[str, Any] = {"metadata": meta, "status": dict(body.get("status") or {})}
    body_spec = body.get("spec") or {}
    spec: dict[str, Any] = {k: body_spec[k] for k in _JOB_SPEC if body_spec.get(k) is not None}
    suspend = body_spec.get("suspend")
    if suspend is not None:
        spec["suspend"] = bool(suspend)
    if spec:
        slim["spec"] = spec
    return slim


_POD_STATUS = ("phase", "reason", "conditions", "startTime")
_CONTAINER_STATUS = ("name", "state", "lastState", "restartCount")


def _slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """A pod as the reconcile reads it: phase, conditions, container states (no images, IPs or spec)."""
    slim = _slim(body)
    status = slim["status"]
    kept = {k: v for k, v in status.items() if k in _POD_STATUS}
    kept["containerStatuses"] = [
        {k: v for k, v in c.items() if k in _CONTAINER_STATUS} for c in status.get("containerStatuses") or []
    ]
    slim["status"] = kept
    return slim


_LORAJOB_METADATA = ("name", "namespace", "uid", "generation", "resourceVersion", "creationTimestamp")


def _slim_lorajob(body: Mapping[str, Any]) -> dict[str, Any]:
    """A LoRAJob as the queue keeps it: no annotations (kopf's copy of the spec) and no managedFields."""
    meta = body.get("metadata") or {}
    slim_meta = {k: meta[k] for k in _LORAJOB_METADATA if k in meta}
    if meta.get("deletionTimestamp"):
        slim_meta["deletionTimestamp"] = meta["deletionTimestamp"]
    status = {k: v for k, v in dict(body.get("status") or {}).items() if k != "kopf"}
    return {"metadata": slim_meta, "spec": dict(body.get("spec") or {}), "status": status}


# kopf keeps these in memory from watch streams, so a reconcile reads Jobs and pods without API calls.
# Handlers start only once the indexes are filled, so a restarted operator sees the Jobs it made.
# The label only narrows the watch; a Job belongs to the LoRAJob whose UID its controller ownerReference
# names, and a pod to the Job that controls it. A Job that merely carries the label is nobody's.
@kopf.index("batch", "v1", "jobs", labels={LORAJOB_LABEL: kopf.PRESENT})
def training_jobs(body: kopf.Body, **_: Any) -> dict[Any, Any]:
    owner = names.controller_uid(body.metadata, API_VERSION, "LoRAJob")
    return {owner: _slim(body)} if owner else {}


@kopf.index("", "v1", "pods", labels={LORAJOB_LABEL: kopf.PRESENT})
def training_pods(body: kopf.Body, **_: Any) -> dict[Any, Any]:
    owner = names.controller_uid(body.metadata, "batch/v1", "Job")
    return {owner: _slim_pod(body)} if owner else {}


def _parse(body: Mapping[str, Any]) -> LoRAJob:
    """The LoRAJob with its spec validated; status is passed along raw (kopf may add to it)."""
    return LoRAJob.model_validate({"metadata": dict(body["metadata"]), "spec": dict(body["spec"])})


def _status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch from `old` to `new` status: changed fields, and None for removed ones."""
    patch = {field: value for field, value in new.items() if old.get(field) != value}
    patch.update({field: None for field in old if field not in new and field != "kopf"})
    return patch


def reconcile_body(body: Any, memo: Any) -> tuple[dict[str, Any] | None, list[lorajobs.Event]]:
    """One reconcile of a LoRAJob body: the status merge patch to write (None: nothing) and events."""
    started = time.monotonic()
    old_status = dict(body.get("status") or {})
    metadata = body.get("metadata") or {}
    generation = metadata.get("generation")
    if not lorajobs.needs_reconcile(old_status, generation):
        return None, []  # finished, and this generation is recorded: nothing to parse or check again
    try:
        lorajob = _parse(body)
    except ValidationError as exc:
        # The CRD should have rejected this; never crash-loop on one bad object. Recording the generation
        # ends it: the LoRAJob is Failed with a current observedGeneration, so it is not parsed again.
        message = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())[:1024]
        conditions = set_condition(
            list(old_status.get("conditions", [])), "Ready", False, "InvalidSpec", message, generation
        )
        patch = {"phase": "Failed", "message": message, "conditions": conditions, "observedGeneration": generation}
        if old_status.get("phase") not in lorajobs.TERMINAL_PHASES:
            patch["completionTime"] = now()
        log.warning(
            "Invalid spec lorajob=%s/%s generation=%s message=%r",
            metadata.get("namespace"),
            metadata.get("name"),
            generation,
            message,
        )
        return patch, [lorajobs.Event("Warning", "InvalidSpec", message)]
    key = lorajob.metadata.uid or lorajob.metadata.name
    last_read = memo.progress_read_at.get(key, 0.0)
    read_progress = time.monotonic() - last_read >= memo.config.progress_interval_seconds
    if read_progress:
        memo.progress_read_at[key] = time.monotonic()
    with memo.reconciling.setdefault(key, threading.Lock()):
        new_status, events = lorajobs.reconcile(
            lorajob,
            old_status,
            memo.executor,
            memo.cluster,
            memo.config,
            memo.objects,
            read_progress=read_progress,
            started_runs=memo.started_runs,
        )
    metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
    if new_status is None:
        return None, events
    metrics.observe_phase(key, new_status.get("phase", "Pending"), new_status.get("gpuSeconds"))
    return _status_patch(old_status, new_status), events


def _bind(memo: Any, kwargs: Mapping[str, Any]) -> None:
    if isinstance(memo.executor, JobExecutor):
        # kopf passes each index as a keyword named after its function.
        memo.executor.bind(kwargs["training_jobs"], kwargs["training_pods"])


# Watch events only feed the queue: async handlers, so they run on the event loop that owns the queue, and
# no kopf handler writes anything (no status patch, no progress annotation) nor waits on a tenant's storage.
@kopf.on.event(*LORAJOBS)
async def remember_lorajob(event: Any, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    """Keep the latest body of every LoRAJob and ask for a reconcile of it."""
    _bind(memo, kwargs)  # before the queue can see a body, the executor sees the indexes
    meta = body.metadata
    key: Key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
    uid = meta.get("uid")
    if event.get("type") == "DELETED":
        memo.lorajobs.pop(key, None)
        if uid:
            memo.lorajob_keys.pop(uid, None)
        memo.queue.forget(key)
        forget_lorajob(body, memo)
        return
    slim = _slim_lorajob(body)
    memo.lorajobs[key] = slim
    if uid:
        memo.lorajob_keys[uid] = key
    if _wanted(slim):
        memo.queue.add(key)


@kopf.on.event("batch", "v1", "jobs", labels={LORAJOB_LABEL: kopf.PRESENT})
async def job_changed(event: Any, body: kopf.Body, memo: Any, **_: Any) -> None:
    """A training Job changed (created, progressed, finished, deleted): reconcile its LoRAJob."""
    owner = names.controller_uid(body.metadata, API_VERSION, "LoRAJob")
    job_uid = body.metadata.get("uid")
    if job_uid:
        if event.get("type") == "DELETED" or not owner:
            memo.job_owners.pop(job_uid, None)
        else:
            memo.job_owners[job_uid] = owner
    _add_uid(memo, owner)


@kopf.on.event("", "v1", "pods", labels={LORAJOB_LABEL: kopf.PRESENT})
async def pod_changed(event: Any, body: kopf.Body, memo: Any, **_: Any) -> None:
    """A trainer pod changed (scheduled, running, a container error, ended): reconcile its Job's LoRAJob."""
    job_uid = names.controller_uid(body.metadata, "batch/v1", "Job")
    _add_uid(memo, memo.job_owners.get(job_uid) if job_uid else None)


def _add_uid(memo: Any, lorajob_uid: str | None) -> None:
    key = memo.lorajob_keys.get(lorajob_uid) if lorajob_uid else None
    body = memo.lorajobs.get(key) if key else None
    if key is not None and body is not None and _wanted(body):
        memo.queue.add(key)


def _wanted(body: Mapping[str, Any]) -> bool:
    meta = body.get("metadata") or {}
    return not meta.get("deletionTimestamp") and lorajobs.needs_reconcile(body.get("status"), meta.get("generation"))


def unfinished_keys(memo: Any) -> list[Key]:
    """The resync's keys: every LoRAJob that is not finished (a finished one has nothing left to look at)."""
    return [key for key, body in list(memo.lorajobs.items()) if _wanted(body)]


def next_look(status: Mapping[str, Any] | None, config: OperatorConfig) -> float | None:
    """Seconds until a LoRAJob with this status is looked at again without an event; None: only on an event."""
    phase = (status or {}).get("phase")
    if phase in lorajobs.TERMINAL_PHASES:
        return None
    if phase in ("Training", "Evaluating"):
        return config.progress_interval_seconds  # the trainer's report and the GPU time move on
    return RECONCILE_INTERVAL  # a preflight waiting on a Secret or S3, a run starting


#: What `resync_one` returns when the API server refused a status write made from an older copy.
CONFLICT = "conflict"


async def reconcile_key(key: Key, memo: Any) -> float | None:
    """The queue's reconcile of one LoRAJob: the latest body the watch delivered, never a copy of a copy."""
    body = memo.lorajobs.get(key)
    if body is None or not _wanted(body):
        return None
    loop = asyncio.get_running_loop()
    written = await loop.run_in_executor(memo.pool, resync_one, body, memo)
    if written == CONFLICT:
        return 1.0  # the watch brings the newer body (and an add); this is the safety net
    if isinstance(written, dict) and memo.lorajobs.get(key) is body:
        # Our own write is the newest version until the watch says otherwise: the next run starts from it.
        memo.lorajobs[key] = _slim_lorajob(written)
    current = memo.lorajobs.get(key) or body
    return next_look(current.get("status"), memo.config)


def resync_one(body: dict[str, Any], memo: Any) -> dict[str, Any] | str | None:
    """Reconcile one LoRAJob: write status and events through the API.

    Returns the LoRAJob as written (None: nothing written, or it is gone), or CONFLICT.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    status_patch, events = reconcile_body(body, memo)
    meta = body["metadata"]
    written: dict[str, Any] | None = None
    try:
        if status_patch:
            # Conditional on the version this reconcile read: a newer one (a spec edit, another writer) must
            # not be overwritten from an older copy. 409: the watch delivers the newer one, and a reconcile.
            patch: dict[str, Any] = {"status": status_patch}
            if meta.get("resourceVersion"):
                patch["metadata"] = {"resourceVersion": meta["resourceVersion"]}
            result = client.CustomObjectsApi(memo.api_client).patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], "lorajobs", meta["name"], patch
            )
            written = result if isinstance(result, dict) else None
            if "phase" in status_patch:
                log.info(
                    "Phase changed lorajob=%s/%s phase=%s message=%r",
                    meta.get("namespace"),
                    meta.get("name"),
                    status_patch["phase"],
                    status_patch.get("message", (body.get("status") or {}).get("message")),
                )
        post_events(memo, body, events)
    except ApiException as exc:
        if exc.status == 409:
            retried = _retry_on_metadata_change(body, status_patch or {}, events, memo)
            if retried is not None:
                return retried
            log.debug("Skipped a stale reconcile lorajob=%s/%s", meta.get("namespace"), meta.get("name"))
            return CONFLICT
        if exc.status != 404:  # deleted meanwhile
            raise
    return written


def _retry_on_metadata_change(
    body: dict[str, Any], status_patch: dict[str, Any], events: list[lorajobs.Event], memo: Any
) -> dict[str, Any] | None:
    """After a 409: write again when only metadata moved on (kopf's annotations) and the status is the one read.

    The reconcile that starts a run is the only one that has the preflight's verdict; losing its write to an
    annotation would lose those conditions. A status that changed meanwhile is never overwritten.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    meta = body["metadata"]
    api = client.CustomObjectsApi(memo.api_client)
    try:
        current: Any = api.get_namespaced_custom_object(GROUP, VERSION, meta["namespace"], "lorajobs", meta["name"])
        if not isinstance(current, dict) or current.get("metadata", {}).get("generation") != meta.get("generation"):
            return None
        strip = lambda status: {k: v for k, v in (status or {}).items() if k != "kopf"}  # noqa: E731
        if strip(current.get("status")) != strip(body.get("status")):
            return None
        patch = {"status": status_patch, "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]}}
        result = api.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], "lorajobs", meta["name"], patch
        )
    except ApiException:
        return None
    post_events(memo, body, events)
    return result if isinstance(result, dict) else None


def post_events(memo: Any, body: dict[str, Any], events: list[lorajobs.Event]) -> None:
    """Post a pass's events about a LoRAJob, in order, off the reconcile's worker (:mod:`.events`)."""
    poster = getattr(memo, "event_poster", None)
    if poster is None:
        poster = EventPoster(memo.api_client, "LoRAJob", lanes=0)  # no lanes: inline
    poster.post(body, events)


# --------------------------------------------------------------------------------------------------------------------
# Pause with kopf's peering: kopf keeps its own pause internal, so the queue applies kopf's rule to the same objects.


def peering_paused(status: Mapping[str, Any] | None, identity: str, priority: int, at: datetime | None = None) -> bool:
    """kopf's rule for one peering object's status: paused while another live peer has the same or a higher
    priority (equal priorities pause everyone). A peer is live until its lastseen plus its lifetime."""
    at = at or datetime.now(UTC)
    for peer, info in (status or {}).items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        try:
            lastseen = datetime.fromisoformat(str(info.get("lastseen")))
            if lastseen.tzinfo is None:
                lastseen = lastseen.replace(tzinfo=UTC)
            alive = lastseen + timedelta(seconds=int(info.get("lifetime", 60))) > at
            if alive and int(info.get("priority", 0)) >= priority:
                return True
        except (TypeError, ValueError):
            continue
    return False


def _read_peerings(api_client: Any, name: str, places: list[str | None]) -> list[dict[str, Any] | None]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from kubelora.operator import peering

    api = client.CustomObjectsApi(api_client)
    found: list[dict[str, Any] | None] = []
    for namespace in places:
        try:
            if namespace is None:
                body = api.get_cluster_custom_object(peering.GROUP, peering.VERSION, peering.CLUSTER_PLURAL, name)
            else:
                body = api.get_namespaced_custom_object(
                    peering.GROUP, peering.VERSION, namespace, peering.NAMESPACED_PLURAL, name
                )
            found.append(dict(body) if isinstance(body, dict) else None)
        except ApiException as exc:
            if exc.status != 404:
                raise
            found.append(None)
    return found


async def follow_peering(
    queues: Callable[[], list[WorkQueue[Any]]],
    api_client: Any,
    name: str,
    places: list[str | None],
    identity: str,
    priority: int,
) -> None:
    """Pause the controllers' queues while kopf's peering pauses this replica (a standby writes nothing)."""
    while True:
        try:
            bodies = await asyncio.to_thread(_read_peerings, api_client, name, places)
            # A missing object keeps kopf paused too; any paused namespace pauses the operator.
            paused = any(b is None or peering_paused(b.get("status"), identity, priority) for b in bodies)
            for queue in queues():
                if paused and not queue.paused:
                    log.info("Pausing queue=%s peering=%s priority=%s", queue.name, name, priority)
                    queue.pause()
                elif not paused and queue.paused:
                    log.info("Resuming queue=%s peering=%s priority=%s", queue.name, name, priority)
                    queue.resume()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Unknown: keep the last answer; kopf's own keep-alive failing would not change its pause either.
            log.warning("Cannot read the peering object peering=%s error=%r", name, str(exc)[:300])
        await asyncio.sleep(PEERING_POLL_SECONDS)


def _deletes_outputs(spec: Any, **_: Any) -> bool:
    return bool((spec.get("output") or {}).get("deleteOnJobDeletion"))


ADAPTERDEPLOYMENTS = (GROUP, VERSION, "adapterdeployments")
#: Where an AdapterDeployment names a digest. A digest named in any of them is never deleted with its LoRAJob.
DIGEST_REFERENCES = (
    ("spec.adapter.digest", ("spec", "adapter", "digest")),
    ("status.activeDigest", ("status", "activeDigest")),
    ("status.previousDigest", ("status", "previousDigest")),
)
#: The condition a LoRAJob being deleted gets when its adapter is kept because it is in use.
CLEANUP_CONDITION = "AdapterDeleted"


def digest_references(body: Mapping[str, Any]) -> dict[str, tuple[str, str, str]]:
    """The digests an AdapterDeployment names: digest -> (namespace, name, the fields that name it)."""
    meta = body.get("metadata") or {}
    found: dict[str, list[str]] = {}
    for field, path in DIGEST_REFERENCES:
        node: Any = body
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, str) and node:
            found.setdefault(node, []).append(field)
    return {d: (str(meta.get("namespace") or ""), str(meta.get("name") or ""), ", ".join(f)) for d, f in found.items()}


# Read from the watch stream, so the check needs no call and no permission beyond list/watch.
@kopf.index(*ADAPTERDEPLOYMENTS)
def adapterdeployment_digests(body: kopf.Body, **_: Any) -> dict[str, tuple[str, str, str]]:
    return digest_references(body)


@dataclasses.dataclass
class Cleanup:
    """What deleting a LoRAJob removes from its output (only what is this LoRAJob's), and what it keeps."""

    adapter: storage.S3Location | None = None  # its digest directory; None: none published, or it is kept
    digest: str | None = None
    pointer: storage.S3Location | None = None  # removed only while it names `digest`
    prefixes: list[storage.S3Location] = dataclasses.field(default_factory=list)  # report dir, checkpoints
    events: list[lorajobs.Event] = dataclasses.field(default_factory=list)
    in_use: lorajobs.Event | None = None  # set when an AdapterDeployment keeps the adapter


def plan_cleanup(
    lorajob: LoRAJob,
    status: Mapping[str, Any],
    references: Any,
    sharing: list[str],
) -> Cleanup:
    """What to delete under an s3:// output with a key prefix (the caller checks that).

    `references` maps a digest to the AdapterDeployments that name it ((namespace, name, fields) each);
    `sharing` names the unfinished LoRAJobs that write to the same output (they need the checkpoints).
    """
    uri = lorajob.spec.output.uri
    output = storage.parse_s3(uri)
    plan = Cleanup()
    adapter = status.get("adapter") or {}
    digest = str(adapter.get("digest") or "")
    if digest:
        try:
            expected = storage.digest_dir(uri, digest)
        except ValueError:
            expected = ""
        users = sorted(set(references.get(digest, ()) or ())) if expected else []
        published = str(adapter.get("uri") or "")
        if not expected or published.rstrip("/") + "/" != expected:
            plan.events.append(
                lorajobs.Event(
                    "Warning",
                    "AdapterLeft",
                    f"Left the adapter {digest} at {published}: not a digest directory of {uri} "
                    "(published by an older trainer?); delete it by hand",
                )
            )
        elif users:
            names = "; ".join(f"AdapterDeployment {ns}/{name} ({fields})" for ns, name, fields in users)
            plan.in_use = lorajobs.Event(
                "Warning",
                "AdapterInUse",
                f"Kept the adapter {digest} at {expected}, in use by {names}; deleted the rest",
            )
            plan.events.append(plan.in_use)
        else:
            plan.adapter = storage.parse_s3(expected)
            plan.digest = digest
            plan.pointer = output.child(storage.POINTER)
    if lorajob.metadata.uid:
        plan.prefixes.append(output.child(f"{storage.REPORTS_DIR}/{lorajob.metadata.uid}"))
    if sharing:
        plan.events.append(
            lorajobs.Event(
                "Normal",
                "CheckpointsKept",
                f"Kept the checkpoints under {uri}: LoRAJob {', '.join(sharing)} writes to the same output",
            )
        )
    else:
        plan.prefixes.append(output.child(storage.CHECKPOINTS_DIR))
    return plan


def run_cleanup(client: Any, plan: Cleanup) -> int:
    """Delete what `plan` names; returns the objects removed (prefixes and the pointer)."""
    count = 0
    if plan.adapter is not None and plan.pointer is not None:
        try:
            pointer = storage.read_json(client, plan.pointer)
        except ValueError:
            pointer = None  # not JSON: not a pointer to this adapter
        if isinstance(pointer, dict) and pointer.get("digest") == plan.digest:
            storage.delete_object(client, plan.pointer)  # first: the pointer never names a half-deleted directory
            count += 1
        # The manifest first: a directory without one is never taken for a complete adapter.
        storage.delete_object(client, plan.adapter.child(storage.MANIFEST))
        count += storage.delete_prefix(client, plan.adapter)
    for prefix in plan.prefixes:
        count += storage.delete_prefix(client, prefix)
    return count


def _sharing(lorajob: LoRAJob, memo: Any) -> list[str]:
    """Unfinished LoRAJobs (other than this one) that write to the same output."""
    out = lorajob.spec.output.uri.rstrip("/")
    found = []
    for body in list(getattr(memo, "lorajobs", {}).values()):
        meta = body.get("metadata") or {}
        if meta.get("uid") == lorajob.metadata.uid or meta.get("deletionTimestamp"):
            continue
        if str(((body.get("spec") or {}).get("output") or {}).get("uri") or "").rstrip("/") != out:
            continue
        if (body.get("status") or {}).get("phase") not in lorajobs.TERMINAL_PHASES:
            found.append(f"{meta.get('namespace')}/{meta.get('name')}")
    return sorted(found)


def _set_cleanup_condition(memo: Any, body: kopf.Body, event: lorajobs.Event) -> None:
    """Say on the LoRAJob why its adapter stays, while it can still be patched (a finalizer holds it)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    meta = body.metadata
    conditions = set_condition(
        list((body.get("status") or {}).get("conditions") or []),
        CLEANUP_CONDITION,
        False,
        event.reason,
        event.message,
        meta.get("generation"),
    )
    try:
        client.CustomObjectsApi(memo.api_client).patch_namespaced_custom_object_status(
            GROUP, VERSION, meta.namespace or "default", "lorajobs", meta.name, {"status": {"conditions": conditions}}
        )
    except ApiException as exc:
        if exc.status not in (404, 409, 422):  # gone, or changed meanwhile: the event says it anyway
            raise


# The one finalizer a LoRAJob gets, and only when asked: the adapter lives outside the cluster.
@kopf.on.delete(*LORAJOBS, when=_deletes_outputs)
def delete_adapter_files(body: kopf.Body, memo: Any, logger: Any, **kwargs: Any) -> None:
    """Delete this LoRAJob's digest directory, report and checkpoints; never a bucket, another's or one in use."""
    lorajob = _parse(body)
    uri = lorajob.spec.output.uri
    try:
        output = storage.parse_s3(uri)
    except ValueError:
        message = f"Left the files at {uri}: the operator deletes only s3:// outputs"
        kopf.event(body, type="Warning", reason="CleanupSkipped", message=message[:1024])
        return
    if output.is_bucket_root:
        message = f"Deleted nothing: spec.output.uri {uri} is a whole bucket, which the operator never deletes"
        logger.warning("Refused cleanup lorajob=%s uri=%s reason=BucketRoot", body.metadata.name, uri)
        kopf.event(body, type="Warning", reason="CleanupRefused", message=message[:1024])
        return
    try:
        plan = plan_cleanup(
            lorajob,
            dict(body.get("status") or {}),
            kwargs.get("adapterdeployment_digests") or {},
            _sharing(lorajob, memo),
        )
        for event in plan.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1024])
        if plan.in_use is not None:
            _set_cleanup_condition(memo, body, plan.in_use)
        credentials = preflight.role_credentials(lorajob, "OUTPUT", memo.cluster, memo.config)
        count = run_cleanup(storage.client_from_env(credentials), plan)
    except Exception as exc:
        # Never hold the LoRAJob (or its namespace) hostage: say what was left behind and let go.
        message = f"Could not delete the adapter files at {uri}: {exc}"
        logger.warning("Left adapter files lorajob=%s uri=%s error=%r", body.metadata.name, uri, str(exc))
        kopf.event(body, type="Warning", reason="CleanupFailed", message=message[:1024])
        return
    log.info(
        "Deleted adapter files lorajob=%s/%s uri=%s digest=%s kept=%s objects=%d",
        lorajob.metadata.namespace,
        lorajob.metadata.name,
        uri,
        plan.digest,
        plan.in_use.reason if plan.in_use else None,
        count,
    )


def forget_lorajob(body: Mapping[str, Any], memo: Any) -> None:
    """Drop what the operator keeps of a deleted LoRAJob. No finalizer: a Job goes with its owner through
    garbage collection; a local run is a development convenience, stopped when the operator sees the deletion.

    Called from the watch, not an ``on.delete`` handler: any changing handler that matches every LoRAJob makes
    kopf PATCH each new one with its last-handled-configuration annotation, a write per LoRAJob that also
    races the status write that starts its run (a 409, a GET and a second PATCH).
    """
    meta = body.get("metadata") or {}
    if isinstance(memo.executor, LocalExecutor):
        try:
            memo.executor.cancel(_parse(body))
            log.info("Cancelled local run lorajob=%s/%s", meta.get("namespace"), meta.get("name"))
        except ValidationError:
            pass  # never started: a spec the model refuses fails before any run
    key = str(meta.get("uid") or meta.get("name") or "")
    memo.progress_read_at.pop(key, None)
    memo.started_runs.discard(key)
    memo.reconciling.pop(key, None)
    metrics.forget(key)
