"""Thin kopf handlers: parse the body, call the service layer, write `patch.status`, post events."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kopf
from pydantic import ValidationError

from kubelora.api.v1alpha1 import GROUP, VERSION, LoRAJob
from kubelora.operator import lorajobs, metrics
from kubelora.operator.conditions import now, set_condition
from kubelora.operator.config import OperatorConfig
from kubelora.operator.estimates import estimate_for_lorajob
from kubelora.operator.executors import JobExecutor, LocalExecutor
from kubelora.operator.jobspec import LORAJOB_LABEL

RECONCILE_INTERVAL = float(os.environ.get("KUBELORA_RECONCILE_INTERVAL", "3"))
LORAJOBS = (GROUP, VERSION, "lorajobs")


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: Any, logger: Any, **_: Any) -> None:
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
    config_path = os.environ.get("KUBELORA_CONFIG")
    memo.config = OperatorConfig.load(Path(config_path) if config_path else None)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    memo.api_client = client.ApiClient()
    memo.api_client.configuration.connection_pool_maxsize = 32
    memo.cluster = lorajobs.Cluster(memo.api_client)
    if memo.config.executor == "local":
        memo.executor = LocalExecutor(memo.config)
    else:
        memo.executor = JobExecutor(memo.api_client, memo.config)
    memo.progress_read_at = {}
    metrics_port = os.environ.get("KUBELORA_METRICS_PORT")
    if metrics_port:
        metrics.serve(int(metrics_port))
    logger.info("Started kubelora operator executor=%s", memo.config.executor)


@kopf.on.cleanup()
def cleanup(memo: Any, **_: Any) -> None:
    api_client = getattr(memo, "api_client", None)
    if api_client is not None:
        api_client.close()


def _slim(body: kopf.Body) -> dict[str, Any]:
    meta = {k: v for k, v in body.metadata.items() if k in ("name", "namespace", "creationTimestamp", "uid")}
    return {"metadata": meta, "status": dict(body.status)}


# kopf keeps these in memory from watch streams, so a reconcile reads Jobs and pods without API calls.
# Handlers start only once the indexes are filled, so a restarted operator sees the Jobs it made.
@kopf.index("batch", "v1", "jobs", labels={LORAJOB_LABEL: kopf.PRESENT})
def training_jobs(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LORAJOB_LABEL]): _slim(body)}


@kopf.index("", "v1", "pods", labels={LORAJOB_LABEL: kopf.PRESENT})
def training_pods(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LORAJOB_LABEL]): _slim(body)}


def _parse(body: kopf.Body) -> LoRAJob:
    """The LoRAJob with its spec validated; status is passed along raw (kopf may add to it)."""
    return LoRAJob.model_validate({"metadata": dict(body.metadata), "spec": dict(body.spec)})


def _post(body: kopf.Body, events: list[lorajobs.Event]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


@kopf.on.create(*LORAJOBS)
@kopf.on.update(*LORAJOBS, field="spec")
@kopf.on.resume(*LORAJOBS)
@kopf.timer(
    *LORAJOBS,
    interval=RECONCILE_INTERVAL,
    initial_delay=RECONCILE_INTERVAL,
    when=lambda status, meta, **_: lorajobs.needs_reconcile(dict(status), meta.get("generation")),
)
def reconcile_lorajob(
    body: kopf.Body,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: Any,
    logger: Any,
    **kwargs: Any,
) -> None:
    started = time.monotonic()
    if isinstance(memo.executor, JobExecutor):
        # kopf passes each index as a keyword named after its function.
        memo.executor.bind(kwargs["training_jobs"], kwargs["training_pods"])
    old_status = dict(status)
    try:
        lorajob = _parse(body)
    except ValidationError as exc:
        # The CRD should have rejected this; never crash-loop on one bad object.
        message = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())[:1024]
        if old_status.get("phase") != "Failed" or old_status.get("message") != message:
            conditions = set_condition(
                list(old_status.get("conditions", [])),
                "Ready",
                False,
                "InvalidSpec",
                message,
                body.metadata.get("generation"),
            )
            patch.status.update(phase="Failed", message=message, conditions=conditions, completionTime=now())
            kopf.event(body, type="Warning", reason="InvalidSpec", message=message)
        return
    key = lorajob.metadata.uid or lorajob.metadata.name
    last_read = memo.progress_read_at.get(key, 0.0)
    read_progress = time.monotonic() - last_read >= memo.config.progress_interval_seconds
    if read_progress:
        memo.progress_read_at[key] = time.monotonic()
    new_status, events = lorajobs.reconcile(
        lorajob, old_status, memo.executor, memo.cluster, memo.config, _cached_estimate, read_progress=read_progress
    )
    if new_status is not None:
        for field, value in new_status.items():
            if old_status.get(field) != value:
                patch.status[field] = value
        for field in old_status:
            if field not in new_status and field != "kopf":
                patch.status[field] = None
        metrics.observe_phase(key, new_status.get("phase", "Pending"), new_status.get("gpuSeconds"))
        if new_status.get("phase") != old_status.get("phase"):
            logger.info(
                "Phase changed lorajob=%s phase=%s reason=%s",
                lorajob.metadata.name,
                new_status.get("phase"),
                new_status.get("message"),
            )
    _post(body, events)
    metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)


@kopf.on.delete(
    *LORAJOBS,
    when=lambda memo, **_: getattr(memo, "executor", None) is not None and isinstance(memo.executor, LocalExecutor),
)
def cancel_local_run(body: kopf.Body, memo: Any, logger: Any, **_: Any) -> None:
    """Jobs go with their owner; a local process is outside the cluster and needs stopping."""
    memo.executor.cancel(_parse(body))
    logger.info("Cancelled local run lorajob=%s", body.metadata.name)


@kopf.on.delete(*LORAJOBS, optional=True)
def forget_lorajob(body: kopf.Body, memo: Any, **_: Any) -> None:
    key = body.metadata.get("uid") or body.metadata.name
    memo.progress_read_at.pop(key, None)
    metrics.forget(key)


_estimate_cache: dict[tuple[str, str], tuple[float, Any]] = {}
ESTIMATE_CACHE_SECONDS = 300.0


def _cached_estimate(lorajob: LoRAJob, credentials: dict[str, str]) -> Any:
    """The memory estimate, cached per base model and job shape: 1,000 jobs on one base read config.json once."""
    spec = lorajob.spec
    key = (spec.base_model.uri, spec.model_dump_json(include={"method", "lora", "training", "resources"}))
    hit = _estimate_cache.get(key)
    if hit is not None and time.monotonic() - hit[0] < ESTIMATE_CACHE_SECONDS:
        if isinstance(hit[1], Exception):
            raise hit[1]
        return hit[1]
    try:
        value: Any = estimate_for_lorajob(lorajob, credentials)
    except Exception as exc:
        _estimate_cache[key] = (time.monotonic(), exc)
        raise
    _estimate_cache[key] = (time.monotonic(), value)
    return value
