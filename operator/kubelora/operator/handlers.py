"""Thin kopf handlers: parse the body, call the service layer, write `patch.status`, post events."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kopf
from pydantic import ValidationError

from kubelora import storage
from kubelora.api.v1alpha1 import API_VERSION, GROUP, VERSION, LoRAJob
from kubelora.operator import lorajobs, metrics, names, preflight
from kubelora.operator.conditions import now, set_condition
from kubelora.operator.config import OperatorConfig
from kubelora.operator.executors import JobExecutor, LocalExecutor
from kubelora.operator.jobspec import LORAJOB_LABEL

# A safety net and the progress poll; Job and pod changes are seen through kopf's indexes on the next pass.
RECONCILE_INTERVAL = float(os.environ.get("KUBELORA_RECONCILE_INTERVAL", "10"))
LORAJOBS = (GROUP, VERSION, "lorajobs")
log = logging.getLogger("kubelora.lorajob")


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, logger: Any, **_: Any) -> None:
    from kubernetes import client, config

    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubelora.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubelora.dev", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "kubelora.dev/cleanup"
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = int(os.environ.get("KUBELORA_WORKERS", "16"))
    settings.watching.server_timeout = 300
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
    configuration.connection_pool_maxsize = (settings.execution.max_workers or 16) + 4
    memo.api_client = client.ApiClient(configuration)
    memo.cluster = preflight.Cluster(memo.api_client)
    memo.objects = preflight.S3Objects()
    if memo.config.executor == "local":
        memo.executor = LocalExecutor(memo.config)
    else:
        memo.executor = JobExecutor(memo.api_client, memo.config)
    memo.progress_read_at = {}
    memo.started_runs = set()  # uids whose run this process started, until the Job shows in the index
    memo.lorajobs = {}
    memo.reconciling = {}  # uid -> lock: the kopf handler and the resync loop never work on one LoRAJob at once
    memo.workers = settings.execution.max_workers or 16
    memo.resync_task = asyncio.get_running_loop().create_task(resync_loop(memo))
    # kopf logs every handler run at INFO; at a thousand objects that drowns the phase changes.
    if not os.environ.get("KUBELORA_VERBOSE"):
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    metrics_port = os.environ.get("KUBELORA_METRICS_PORT")
    if metrics_port:
        metrics.serve(int(metrics_port))
    logger.info("Started kubelora operator executor=%s", memo.config.executor)


@kopf.on.cleanup()
def cleanup(memo: Any, **_: Any) -> None:
    task = getattr(memo, "resync_task", None)
    if task is not None:
        task.cancel()
    api_client = getattr(memo, "api_client", None)
    if api_client is not None:
        api_client.close()


def _slim(body: kopf.Body) -> dict[str, Any]:
    meta = {k: v for k, v in body.metadata.items() if k in ("name", "namespace", "creationTimestamp", "uid")}
    return {"metadata": meta, "status": dict(body.status)}


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
    return {owner: _slim(body)} if owner else {}


def _parse(body: Mapping[str, Any]) -> LoRAJob:
    """The LoRAJob with its spec validated; status is passed along raw (kopf may add to it)."""
    return LoRAJob.model_validate({"metadata": dict(body["metadata"]), "spec": dict(body["spec"])})


def _post(body: kopf.Body, events: list[lorajobs.Event]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


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
    if new_status.get("phase") != old_status.get("phase"):
        log.info(
            "Phase changed lorajob=%s/%s phase=%s message=%r",
            lorajob.metadata.namespace,
            lorajob.metadata.name,
            new_status.get("phase"),
            new_status.get("message"),
        )
    return _status_patch(old_status, new_status), events


@kopf.on.create(*LORAJOBS)
@kopf.on.update(*LORAJOBS, field="spec")
@kopf.on.resume(*LORAJOBS)
def reconcile_lorajob(body: kopf.Body, patch: kopf.Patch, memo: Any, **kwargs: Any) -> None:
    _bind(memo, kwargs)
    status_patch, events = reconcile_body(body, memo)
    for field, value in (status_patch or {}).items():
        patch.status[field] = value
    _post(body, events)


def _bind(memo: Any, kwargs: Mapping[str, Any]) -> None:
    if isinstance(memo.executor, JobExecutor):
        # kopf passes each index as a keyword named after its function.
        memo.executor.bind(kwargs["training_jobs"], kwargs["training_pods"])


@kopf.on.event(*LORAJOBS)
def remember_lorajob(event: Any, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    """The latest body of every LoRAJob, for the resync loop (no per-object timers: they need finalizers)."""
    _bind(memo, kwargs)  # before the resync loop can see a body, the executor sees the indexes
    key = (body.metadata.get("namespace"), body.metadata.get("name"))
    if event.get("type") == "DELETED":
        memo.lorajobs.pop(key, None)
    else:
        memo.lorajobs[key] = {"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}


def resync_one(body: dict[str, Any], memo: Any) -> None:
    """Reconcile one LoRAJob outside a kopf handler: write status and events through the API."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    status_patch, events = reconcile_body(body, memo)
    meta = body["metadata"]
    try:
        if status_patch:
            # Conditional on the version this pass read: a handler may have written status since (preflight's
            # conditions, say), and a pass over an older copy must not overwrite it. 409: the next pass has it.
            patch: dict[str, Any] = {"status": status_patch}
            if meta.get("resourceVersion"):
                patch["metadata"] = {"resourceVersion": meta["resourceVersion"]}
            client.CustomObjectsApi(memo.api_client).patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], "lorajobs", meta["name"], patch
            )
        for event in events:
            post_event(memo.api_client, body, event)
    except ApiException as exc:
        if exc.status == 409:
            log.debug("Skipped a stale resync lorajob=%s/%s", meta.get("namespace"), meta.get("name"))
            return
        if exc.status != 404:  # deleted meanwhile
            raise


def post_event(api_client: Any, body: dict[str, Any], event: lorajobs.Event) -> None:
    from kubernetes import client

    meta = body["metadata"]
    timestamp = now()
    manifest: Any = {
        "metadata": {"generateName": f"{meta['name']}."},
        "involvedObject": {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "LoRAJob",
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:1024],
        "source": {"component": "kubelora"},
        "reportingComponent": "kubelora",
        "firstTimestamp": timestamp,
        "lastTimestamp": timestamp,
        "count": 1,
    }
    client.CoreV1Api(api_client).create_namespaced_event(meta["namespace"], manifest)


async def resync_loop(memo: Any) -> None:
    """Every RECONCILE_INTERVAL, reconcile each unfinished LoRAJob: Job and pod changes, progress, cost."""
    limit = asyncio.Semaphore(memo.workers)

    async def one(body: dict[str, Any]) -> None:
        async with limit:
            try:
                await asyncio.to_thread(resync_one, body, memo)
            except Exception:
                log.exception(
                    "Resync failed lorajob=%s/%s", body["metadata"].get("namespace"), body["metadata"].get("name")
                )

    while True:
        await asyncio.sleep(RECONCILE_INTERVAL)
        due = [
            body
            for body in list(memo.lorajobs.values())
            if lorajobs.needs_reconcile(body.get("status"), body["metadata"].get("generation"))
            and not body["metadata"].get("deletionTimestamp")
        ]
        await asyncio.gather(*(one(body) for body in due))


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


# optional: no finalizer. A Job goes with its owner through garbage collection; a local run is a
# development convenience, stopped when the operator sees the deletion.
@kopf.on.delete(*LORAJOBS, optional=True)
def forget_lorajob(body: kopf.Body, memo: Any, logger: Any, **_: Any) -> None:
    if isinstance(memo.executor, LocalExecutor):
        memo.executor.cancel(_parse(body))
        logger.info("Cancelled local run lorajob=%s", body.metadata.name)
    key = body.metadata.get("uid") or body.metadata.name
    memo.progress_read_at.pop(key, None)
    memo.started_runs.discard(key)
    memo.reconciling.pop(key, None)
    metrics.forget(key)
