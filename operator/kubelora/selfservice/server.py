"""``kubelora api``: the OpenAI Files and Fine-tuning API over LoRAJobs, for the standard ``openai`` client.

Files live in the tenant's bucket (the Secret named by the catalogue's ``storageSecret`` in the caller's
namespace): ``<prefix>files/<id>.jsonl`` with ``<prefix>files/<id>.json`` beside it. A fine-tuning job is a LoRAJob
named after the job id (``ftjob-...``) in the caller's namespace, labelled ``kubelora.dev/api=fine-tuning``;
deployment onto a catalogue serving pool is an AdapterDeployment of the same name, owned by the LoRAJob.
See docs/self-service.md.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from kubelora.api.v1alpha1 import ServingTarget
from kubelora.selfservice import jobs
from kubelora.selfservice.catalogue import Catalogue, endpoint_host
from kubelora.selfservice.jobs import ANN, FILES_DIR, JOB_ID, JOBS_DIR, LABEL, LABEL_VALUE, epoch, new_id
from kubelora.selfservice.kube import ApiError, Caller, Kube, not_found
from kubelora.selfservice.proxy import MAX_UPSTREAM_BYTES, forward
from kubelora.selfservice.uploads import (
    MULTIPART_SLACK,
    FileRange,
    boundary,
    parse_multipart,
    too_large,
    validate_upload,
)

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
#: The largest JSON request body (job creation, chat completions): 413 above it.
MAX_BODY_BYTES = 1 << 20


# ------------------------------------------------------------------------------------------------------------- helpers


class Tenant:
    """The caller's storage: bucket, prefix and a client, from the namespace's storage Secret."""

    def __init__(self, secret_name: str, values: dict[str, str], allowed_endpoints: Sequence[str] = ()) -> None:
        from kubelora.storage import QUICK_TIMEOUTS, make_client

        missing = [k for k in ("accessKey", "secretKey", "endpoint", "bucket") if not values.get(k)]
        if missing:
            raise ApiError(
                500, f"Storage Secret {secret_name} lacks {', '.join(missing)}", type_="server_error", code="storage"
            )
        # The API connects to this endpoint from inside the cluster: a tenant who may edit its Secret must not
        # point it at anything else the API can reach.
        if allowed_endpoints and endpoint_host(values["endpoint"]) not in {endpoint_host(e) for e in allowed_endpoints}:
            raise ApiError(
                403,
                f"Storage Secret {secret_name} names an endpoint the platform catalogue does not allow "
                "(allowedStorageEndpoints)",
                type_="permission_error",
                code="storage_endpoint_not_allowed",
            )
        self.secret_name = secret_name
        self.bucket = values["bucket"]
        prefix = values.get("prefix", "").strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.client = make_client(
            values["endpoint"],
            values["accessKey"],
            values["secretKey"],
            values.get("secure", "false").lower() == "true",
            timeouts=QUICK_TIMEOUTS,
        )

    def key(self, *parts: str) -> str:
        return self.prefix + "".join(parts)

    def uri(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}"

    def get_json(self, key: str) -> Any | None:
        from kubelora.storage import Location, read_json

        return read_json(self.client, Location("s3", self.bucket, key))

    def put_json(self, key: str, value: Any) -> None:
        data = json.dumps(value).encode()
        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type="application/json")


# ------------------------------------------------------------------------------------------------------------- app


class SelfService:
    def __init__(self, kube: Kube, catalogue: Catalogue, workdir: Path | None = None) -> None:
        self.kube = kube
        self.catalogue = catalogue
        self.workdir = workdir
        self.max_body_bytes = MAX_BODY_BYTES
        self.max_upstream_bytes = MAX_UPSTREAM_BYTES
        #: httpx transport to the model servers (tests put a mock here); None: the network.
        self.upstream_transport: Any = None

    # -------------------------------------------------------------------------------- auth and tenancy

    def caller(self, request: Request) -> Caller:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "Missing bearer token: send a Kubernetes token as the API key", code="invalid_api_key")
        organization = request.headers.get("openai-organization") or None
        return self.kube.caller(token.strip(), organization)

    def tenant(self, caller: Caller) -> Tenant:
        name = self.catalogue.storage_secret
        values = self.kube.get_secret(caller.namespace, name)
        if values is None:
            raise ApiError(
                400,
                f"Namespace {caller.namespace} has no fine-tuning storage: the platform team creates Secret {name} "
                "there (accessKey, secretKey, endpoint, bucket, prefix)",
                code="storage_not_configured",
            )
        return Tenant(name, values, self.catalogue.allowed_storage_endpoints)

    # -------------------------------------------------------------------------------- files

    def file_object(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": meta["id"],
            "object": "file",
            "bytes": meta["bytes"],
            "created_at": meta["created_at"],
            "filename": meta["filename"],
            "purpose": meta["purpose"],
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }

    def file_meta(self, tenant: Tenant, file_id: str, param: str | None = None) -> dict[str, Any]:
        if not file_id.startswith("file-") or "/" in file_id:
            raise not_found("file", file_id, param)
        meta = tenant.get_json(tenant.key(FILES_DIR, f"{file_id}.json"))
        if meta is None:
            raise not_found("file", file_id, param)
        return dict(meta)

    def upload_tenant(self, caller: Caller) -> Tenant:
        """Who may upload and where the file goes: checked before the API reads a byte of the upload."""
        self.kube.authorize(caller, "create", "lorajobs")
        return self.tenant(caller)

    def store_upload(self, caller: Caller, tenant: Tenant, body: Path, content_type: str) -> dict[str, Any]:
        """Check and store the file part of an upload spooled to ``body`` (checked and sent by offset, no copy)."""
        fields, part = parse_multipart(body, content_type)
        if fields.get("purpose") != "fine-tune":
            raise ApiError(400, "Only purpose=fine-tune is supported", param="purpose", code="invalid_purpose")
        if part is None:
            raise ApiError(400, "Missing the file part", param="file", code="invalid_upload")
        filename, start, end = part
        size = end - start
        if size > self.catalogue.max_file_bytes:
            raise too_large(self.catalogue.max_file_bytes, "The file", "file", "file_too_large")
        rows = validate_upload(body, filename, "chat", start, end)
        file_id = new_id("file")
        with body.open("rb") as src:
            tenant.client.put_object(
                tenant.bucket,
                tenant.key(FILES_DIR, f"{file_id}.jsonl"),
                FileRange(src, start, end),
                size,
                content_type="application/jsonl",
            )
        meta = {
            "id": file_id,
            "bytes": size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": "fine-tune",
            "namespace": caller.namespace,
        }
        tenant.put_json(tenant.key(FILES_DIR, f"{file_id}.json"), meta)
        log.info("Stored file namespace=%s file=%s bytes=%d rows=%d", caller.namespace, file_id, size, rows)
        return self.file_object(meta)

    def get_file(self, caller: Caller, file_id: str) -> dict[str, Any]:
        self.kube.authorize(caller, "get", "lorajobs")
        return self.file_object(self.file_meta(self.tenant(caller), file_id))

    def list_files(self, caller: Caller, purpose: str | None) -> dict[str, Any]:
        self.kube.authorize(caller, "list", "lorajobs")
        tenant = self.tenant(caller)
        out = []
        for obj in tenant.client.list_objects(tenant.bucket, prefix=tenant.key(FILES_DIR)):
            if obj.object_name.endswith(".json"):
                meta = tenant.get_json(obj.object_name)
                if meta and (purpose is None or meta.get("purpose") == purpose):
                    out.append(self.file_object(meta))
        out.sort(key=lambda f: (f["created_at"], f["id"]), reverse=True)
        return {"object": "list", "data": out, "has_more": False}

    def delete_file(self, caller: Caller, file_id: str) -> dict[str, Any]:
        self.kube.authorize(caller, "create", "lorajobs")
        tenant = self.tenant(caller)
        self.file_meta(tenant, file_id)
        tenant.client.remove_object(tenant.bucket, tenant.key(FILES_DIR, f"{file_id}.jsonl"))
        tenant.client.remove_object(tenant.bucket, tenant.key(FILES_DIR, f"{file_id}.json"))
        return {"id": file_id, "object": "file", "deleted": True}

    # -------------------------------------------------------------------------------- jobs

    def create_job(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        self.kube.authorize(caller, "create", "lorajobs")
        jobs.catalogue_model(self.catalogue, body)
        tenant = self.tenant(caller)
        training_file = body.get("training_file")
        if not isinstance(training_file, str):
            raise ApiError(400, "training_file is required", param="training_file", code="missing_required_parameter")
        self.file_meta(tenant, training_file, "training_file")
        validation_file = body.get("validation_file")
        if validation_file is not None:
            self.file_meta(tenant, str(validation_file), "validation_file")
        name = new_id("ftjob")
        manifest, ad_manifest = jobs.manifests(self.catalogue, tenant, body, name)
        if ad_manifest is not None:
            self.kube.authorize(caller, "create", "adapterdeployments")
        created = self.kube.create_custom(caller.namespace, "lorajobs", manifest)
        ad = None
        if ad_manifest is not None:
            ad_manifest["metadata"]["ownerReferences"] = [
                {
                    "apiVersion": "kubelora.dev/v1alpha1",
                    "kind": "LoRAJob",
                    "name": name,
                    "uid": created["metadata"]["uid"],
                    "controller": True,
                }
            ]
            try:
                ad = self.kube.create_custom(caller.namespace, "adapterdeployments", ad_manifest)
            except Exception as exc:
                reason = getattr(exc, "reason", None) or type(exc).__name__
                log.error("Cannot create the AdapterDeployment, deleting the job job=%s error=%s", name, exc)
                try:
                    self.kube.delete_custom(caller.namespace, "lorajobs", name)
                except Exception as cleanup:
                    log.error("Cannot delete the LoRAJob job=%s error=%s", name, cleanup)
                    raise ApiError(
                        500,
                        f"Could not create the AdapterDeployment for {name} ({reason}); LoRAJob {name} could not "
                        "be deleted either and will train without being deployed: cancel it",
                        type_="server_error",
                        code="deployment_failed",
                    ) from None
                raise ApiError(
                    500,
                    f"Could not create the AdapterDeployment for the job ({reason}); no job was created",
                    type_="server_error",
                    code="deployment_failed",
                ) from None
        log.info(
            "Created fine-tuning job namespace=%s job=%s model=%s pool=%s",
            caller.namespace,
            name,
            body["model"],
            (body.get("kubelora") or {}).get("serving_pool"),
        )
        return jobs.job_object(caller.namespace, created, ad)

    def lorajob(self, caller: Caller, job_id: str) -> dict[str, Any]:
        """The job's LoRAJob or, for a job cancelled before it started (its LoRAJob deleted), its last state."""
        obj = None
        if JOB_ID.match(job_id):
            obj = self.kube.get_custom(caller.namespace, "lorajobs", job_id)
            if obj is None:
                obj = self.cancelled_record(caller, job_id)
        if obj is None or (obj["metadata"].get("labels") or {}).get(LABEL) != LABEL_VALUE:
            raise not_found("fine-tuning job", job_id)
        return obj

    def cancelled_record(self, caller: Caller, job_id: str, tenant: Tenant | None = None) -> dict[str, Any] | None:
        """``jobs/<id>/cancelled.json``: the LoRAJob of a job cancelled before its run, as cancel left it."""
        try:
            tenant = tenant or self.tenant(caller)
            record = tenant.get_json(tenant.key(JOBS_DIR, f"{job_id}/cancelled.json"))
        except ApiError:
            return None
        except Exception as exc:
            log.warning("Cannot read the cancelled job record job=%s error=%s", job_id, exc)
            return None
        if not isinstance(record, dict) or not isinstance(record.get("metadata"), dict):
            return None
        meta = record["metadata"]
        if meta.get("name") != job_id or ANN + "cancelled-at" not in (meta.get("annotations") or {}):
            return None
        if not isinstance(record.get("spec"), dict) or not isinstance(record.get("status") or {}, dict):
            return None
        return record

    @staticmethod
    def owned_by(ad: dict[str, Any], lorajob: dict[str, Any]) -> bool:
        """Whether ``ad``'s controller is ``lorajob`` (both tenant-editable; the uid ties them together)."""
        uid = lorajob["metadata"].get("uid")
        return bool(uid) and any(
            ref.get("kind") == "LoRAJob" and ref.get("controller") is True and ref.get("uid") == uid
            for ref in ad["metadata"].get("ownerReferences") or []
        )

    def adapter_deployment(self, caller: Caller, lorajob: dict[str, Any]) -> dict[str, Any] | None:
        if ANN + "serving-pool" not in (lorajob["metadata"].get("annotations") or {}):
            return None
        ad = self.kube.get_custom(caller.namespace, "adapterdeployments", lorajob["metadata"]["name"])
        return ad if ad is not None and self.owned_by(ad, lorajob) else None

    def report(self, caller: Caller, lorajob: dict[str, Any]) -> dict[str, Any] | None:
        """The trainer's result.json for this LoRAJob (under its UID), when it published one."""
        try:
            tenant = self.tenant(caller)
            key = tenant.key(
                JOBS_DIR, f"{lorajob['metadata']['name']}/_kubelora/{lorajob['metadata']['uid']}/result.json"
            )
            value = tenant.get_json(key)
        except Exception as exc:
            log.warning("Cannot read the job report job=%s error=%s", lorajob["metadata"]["name"], exc)
            return None
        return dict(value) if isinstance(value, dict) else None

    def get_job(self, caller: Caller, job_id: str) -> dict[str, Any]:
        self.kube.authorize(caller, "get", "lorajobs")
        lorajob = self.lorajob(caller, job_id)
        phase = (lorajob.get("status") or {}).get("phase")
        report = self.report(caller, lorajob) if phase == "Succeeded" else None
        return jobs.job_object(caller.namespace, lorajob, self.adapter_deployment(caller, lorajob), report)

    def list_jobs(self, caller: Caller, after: str | None, limit: int, metadata: dict[str, str]) -> dict[str, Any]:
        self.kube.authorize(caller, "list", "lorajobs")
        items = self.kube.list_custom(caller.namespace, "lorajobs", f"{LABEL}={LABEL_VALUE}")
        items.sort(key=lambda o: (o["metadata"].get("creationTimestamp", ""), o["metadata"]["name"]), reverse=True)
        if metadata:
            items = [
                o
                for o in items
                if all(
                    json.loads(o["metadata"].get("annotations", {}).get(ANN + "metadata", "{}")).get(k) == v
                    for k, v in metadata.items()
                )
            ]
        ads = {
            ad["metadata"]["name"]: ad
            for ad in self.kube.list_custom(caller.namespace, "adapterdeployments", f"{LABEL}={LABEL_VALUE}")
        }
        out: list[dict[str, Any]] = []
        for o in items:
            ad = ads.get(o["metadata"]["name"])
            pooled = ANN + "serving-pool" in (o["metadata"].get("annotations") or {})
            out.append(
                jobs.job_object(caller.namespace, o, ad if pooled and ad is not None and self.owned_by(ad, o) else None)
            )
        live = {o["metadata"]["name"] for o in items}
        for record in self.cancelled_records(caller, live):
            if all(
                json.loads(record["metadata"].get("annotations", {}).get(ANN + "metadata", "{}")).get(k) == v
                for k, v in metadata.items()
            ):
                out.append(jobs.job_object(caller.namespace, record, None))
        out.sort(key=lambda j: (j["created_at"], j["id"]), reverse=True)
        return self._page(out, after, limit)

    def cancelled_records(self, caller: Caller, live: set[str]) -> list[dict[str, Any]]:
        """The records of the jobs cancelled before they started (no LoRAJob left) in the tenant bucket."""
        try:
            tenant = self.tenant(caller)
        except ApiError:
            return []  # no storage: no files, so no job was ever created
        prefix = tenant.key(JOBS_DIR)
        out = []
        try:
            names = [obj.object_name for obj in tenant.client.list_objects(tenant.bucket, prefix=prefix)]
        except Exception as exc:
            log.warning("Cannot list the cancelled job records namespace=%s error=%s", caller.namespace, exc)
            return []
        for name in names:
            job_id = name[len(prefix) :].strip("/")
            if not JOB_ID.match(job_id) or job_id in live:
                continue
            record = self.cancelled_record(caller, job_id, tenant)
            if record is not None:
                out.append(record)
        return out

    @staticmethod
    def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
        if after is not None:
            ids = [i["id"] for i in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        limit = max(1, min(limit, MAX_LIMIT))
        return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}

    def cancel_job(self, caller: Caller, job_id: str) -> dict[str, Any]:
        self.kube.authorize(caller, "patch", "lorajobs")
        lorajob = self.lorajob(caller, job_id)
        status = lorajob.get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed") or ANN + "cancelled-at" in (
            lorajob["metadata"].get("annotations") or {}
        ):
            raise ApiError(400, f"Job {job_id} has already finished and cannot be cancelled", code="job_finished")
        job_name = status.get("jobName")
        # The API deletes with its own rights: the caller must hold the right to delete what goes.
        if job_name:
            self.kube.authorize(caller, "delete", "jobs", group="batch")
        else:
            self.kube.authorize(caller, "delete", "lorajobs")
        tenant = None if job_name else self.tenant(caller)
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        lorajob = self.kube.patch_custom(
            caller.namespace, "lorajobs", job_id, {"metadata": {"annotations": {ANN + "cancelled-at": now}}}
        )
        if job_name:
            # The operator never starts a second run for a LoRAJob whose Job vanished: the run ends here.
            self.kube.delete_job(caller.namespace, job_name)
        elif tenant is not None:
            # No run yet: nothing to stop but the LoRAJob itself, or the operator would start one. Its last state
            # is kept first, so the job can still be retrieved and listed.
            tenant.put_json(tenant.key(JOBS_DIR, f"{job_id}/cancelled.json"), lorajob)
            self.kube.delete_custom(caller.namespace, "lorajobs", job_id)
        log.info("Cancelled fine-tuning job namespace=%s job=%s run=%s", caller.namespace, job_id, job_name)
        return jobs.job_object(caller.namespace, lorajob, self.adapter_deployment(caller, lorajob))

    def job_events(self, caller: Caller, job_id: str, after: str | None, limit: int) -> dict[str, Any]:
        self.kube.authorize(caller, "get", "lorajobs")
        lorajob = self.lorajob(caller, job_id)
        meta = lorajob["metadata"]
        status = lorajob.get("status") or {}
        events: list[dict[str, Any]] = []

        def add(
            created: int | None, message: str, level: str = "info", data: Any = None, kind: str = "message"
        ) -> None:
            created = created or epoch(meta.get("creationTimestamp")) or 0
            ident = hashlib.sha256(f"{created}|{message}|{json.dumps(data, sort_keys=True)}".encode()).hexdigest()[:24]
            events.append(
                {
                    "object": "fine_tuning.job.event",
                    "id": f"ftevent-{ident}",
                    "created_at": created,
                    "level": level,
                    "message": message,
                    "data": data,
                    "type": kind,
                }
            )

        add(epoch(meta.get("creationTimestamp")), f"Created fine-tuning job: {job_id}")
        for event in self.kube.events_for(caller.namespace, meta["name"], meta.get("uid")):
            when = event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
            level = "warn" if event.get("type") == "Warning" else "info"
            add(epoch(when), f"{event.get('reason')}: {event.get('message', '')}".strip(), level)
        for condition in status.get("conditions") or []:
            add(
                epoch(condition.get("lastTransitionTime")),
                f"{condition['type']}={condition['status']} ({condition.get('reason')}): {condition.get('message', '')}",
                "warn"
                if condition["type"] == "Ready" and condition["status"] == "False" and status.get("phase") == "Failed"
                else "info",
            )
        progress = status.get("progress")
        if progress:
            data = {
                "step": progress.get("step"),
                "total_steps": progress.get("totalSteps"),
                "train_loss": progress.get("loss"),
                "valid_loss": progress.get("evalLoss"),
                "epoch": progress.get("epoch"),
                "tokens_per_second": progress.get("tokensPerSecond"),
            }
            add(
                epoch(progress.get("updatedAt")),
                f"Step {progress.get('step')}/{progress.get('totalSteps')}: training loss={progress.get('loss')}",
                data=data,
                kind="metrics",
            )
        evaluation = status.get("eval")
        if evaluation:
            verdict = "passed" if evaluation.get("passed") else "failed"
            adapter = ", ".join(f"{k}={v:.4g}" for k, v in sorted((evaluation.get("adapter") or {}).items()))
            add(
                epoch(status.get("completionTime")),
                f"Evaluation {verdict}: {adapter}",
                "info" if evaluation.get("passed") else "warn",
                data={"eval": evaluation},
                kind="metrics",
            )
        ann = meta.get("annotations") or {}
        if ANN + "cancelled-at" in ann:
            add(epoch(ann[ANN + "cancelled-at"]), "Cancelled fine-tuning job")
        ad = self.adapter_deployment(caller, lorajob)
        if ad is not None:
            ad_status = ad.get("status") or {}
            for condition in ad_status.get("conditions") or []:
                add(
                    epoch(condition.get("lastTransitionTime")),
                    f"Deployment {condition['type']}={condition['status']} ({condition.get('reason')}): "
                    f"{condition.get('message', '')}",
                )
            if ad_status.get("phase") == "Ready":
                add(
                    None
                    if not ad_status.get("conditions")
                    else epoch(ad_status["conditions"][-1].get("lastTransitionTime")),
                    f"Serving the fine-tuned model as {ad['spec']['servedName']}",
                )
        events.sort(key=lambda e: (e["created_at"], e["id"]), reverse=True)
        return self._page(events, after, limit)

    def job_checkpoints(self, caller: Caller, job_id: str, after: str | None, limit: int) -> dict[str, Any]:
        self.kube.authorize(caller, "get", "lorajobs")
        lorajob = self.lorajob(caller, job_id)
        tenant = self.tenant(caller)
        status = lorajob.get("status") or {}
        progress = status.get("progress") or {}
        checkpoints: list[dict[str, Any]] = []
        prefix = tenant.key(JOBS_DIR, f"{job_id}/checkpoints/")
        for obj in tenant.client.list_objects(tenant.bucket, prefix=prefix):
            name = obj.object_name[len(prefix) :].strip("/")
            if not name.startswith("checkpoint-") or not name.removeprefix("checkpoint-").isdigit():
                continue
            step = int(name.removeprefix("checkpoint-"))
            checkpoints.append(
                {
                    "object": "fine_tuning.job.checkpoint",
                    "id": f"ftckpt-{job_id.removeprefix('ftjob-')}-{step}",
                    "created_at": epoch(progress.get("updatedAt"))
                    or epoch(lorajob["metadata"].get("creationTimestamp"))
                    or 0,
                    "fine_tuned_model_checkpoint": f"s3://{tenant.bucket}/{obj.object_name}",
                    "fine_tuning_job_id": job_id,
                    "metrics": {"step": float(step)},
                    "step_number": step,
                }
            )
        adapter = status.get("adapter")
        if adapter:
            step = int(progress.get("totalSteps") or progress.get("step") or 0)
            checkpoints.append(
                {
                    "object": "fine_tuning.job.checkpoint",
                    "id": f"ftckpt-{job_id.removeprefix('ftjob-')}-final",
                    "created_at": epoch(status.get("completionTime")) or 0,
                    "fine_tuned_model_checkpoint": adapter["uri"],
                    "fine_tuning_job_id": job_id,
                    "metrics": {
                        "step": float(step),
                        "train_loss": progress.get("loss"),
                        "valid_loss": progress.get("evalLoss"),
                    },
                    "step_number": step,
                }
            )
        checkpoints.sort(key=lambda c: (c["step_number"], c["id"].endswith("-final")), reverse=True)
        return self._page(checkpoints, after, limit)

    # -------------------------------------------------------------------------------- serving

    def upstream(self, caller: Caller, served_name: str) -> str:
        """The base URL of a vLLM server that serves ``served_name`` for the caller's namespace.

        The AdapterDeployments and LoRAJobs are the tenant's to edit, so a deployment is only followed when it is
        the one the API made: controlled by the API's LoRAJob (same uid), onto that job's catalogue pool, with the
        pool's target unchanged; the port is the pool's.
        """
        self.kube.authorize(caller, "get", "adapterdeployments")
        not_ready: ApiError | None = None
        for ad in self.kube.list_custom(caller.namespace, "adapterdeployments", f"{LABEL}={LABEL_VALUE}"):
            if (ad.get("spec") or {}).get("servedName") != served_name:
                continue
            owner = next(
                (r for r in ad["metadata"].get("ownerReferences") or [] if r.get("controller") is True),
                None,
            )
            if owner is None or owner.get("kind") != "LoRAJob" or not JOB_ID.match(str(owner.get("name", ""))):
                continue
            lorajob = self.kube.get_custom(caller.namespace, "lorajobs", str(owner["name"]))
            if (
                lorajob is None
                or (lorajob["metadata"].get("labels") or {}).get(LABEL) != LABEL_VALUE
                or not self.owned_by(ad, lorajob)
            ):
                continue
            pool = self.catalogue.serving_pools.get(
                (lorajob["metadata"].get("annotations") or {}).get(ANN + "serving-pool", "")
            )
            if pool is None:
                continue
            try:
                same_target = ServingTarget.model_validate(ad["spec"].get("target") or {}) == pool.validated_target()
            except ValueError:
                same_target = False
            if not same_target:
                log.warning(
                    "AdapterDeployment target differs from its pool, not routing namespace=%s name=%s",
                    caller.namespace,
                    ad["metadata"]["name"],
                )
                continue
            status = ad.get("status") or {}
            phase = status.get("phase", "Pending")
            if pool.endpoint:
                if phase == "Ready":
                    return pool.endpoint.rstrip("/")
                not_ready = ApiError(
                    503,
                    f"Model {served_name} is not being served yet (deployment phase {phase})",
                    type_="server_error",
                    code="not_ready",
                )
                continue
            port = pool.validated_target().port
            active = status.get("activeDigest")
            replicas = status.get("replicas") or []
            for replica in replicas:
                if (
                    replica.get("state") == "Loaded"
                    and replica.get("pod")
                    and (active is None or replica.get("digest") in (None, active))
                ):
                    ip = self.kube.pod_ip(caller.namespace, str(replica["pod"]))
                    if ip:
                        return f"http://{ip}:{port}"
            loaded = [(r.get("pod"), r.get("state")) for r in replicas]
            not_ready = ApiError(
                503,
                f"Model {served_name} is not being served yet (deployment phase {phase}, pods {loaded})",
                type_="server_error",
                code="not_ready",
            )
        if not_ready is not None:
            raise not_ready
        raise not_found("model", served_name, "model")


def create_app(service: SelfService) -> FastAPI:
    app = FastAPI(title="kubelora self-service", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("Request failed error=%s", exc)
        body = ApiError(500, f"Internal error: {type(exc).__name__}", type_="server_error").body()
        return JSONResponse(body, status_code=500)

    async def call(request: Request, fn: Callable[..., Any], *args: Any) -> Any:
        caller = await run_in_threadpool(service.caller, request)
        return await run_in_threadpool(fn, caller, *args)

    def query_int(request: Request, name: str, default: int) -> int:
        value = request.query_params.get(name)
        try:
            return int(value) if value is not None else default
        except ValueError:
            raise ApiError(400, f"{name} must be an integer", param=name) from None

    def declared_length(request: Request) -> int | None:
        declared = request.headers.get("content-length")
        return int(declared) if declared is not None and declared.strip().isdigit() else None

    async def json_body(request: Request) -> dict[str, Any]:
        """The JSON object in the body, read only after the caller is authenticated, at most max_body_bytes."""
        limit = service.max_body_bytes
        declared = declared_length(request)
        if declared is not None and declared > limit:
            raise too_large(limit, code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # a chunked body, or one longer than it said
                raise too_large(limit, code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except ValueError:
            raise ApiError(400, "The request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object")
        return body

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/files")
    async def upload(request: Request) -> Any:
        # Authenticated, authorized and the tenant's storage found before a byte of the body is read.
        caller = await run_in_threadpool(service.caller, request)
        tenant = await run_in_threadpool(service.upload_tenant, caller)
        content_type = request.headers.get("content-type", "")
        boundary(content_type)
        limit = service.catalogue.max_file_bytes
        declared = declared_length(request)
        if declared is not None and declared > limit + MULTIPART_SLACK:
            raise too_large(limit, "The upload", "file", "file_too_large")
        fd, name = tempfile.mkstemp(suffix=".upload", dir=service.workdir)
        path = Path(name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit + MULTIPART_SLACK:
                        raise too_large(limit, "The upload", "file", "file_too_large")
                    await asyncio.to_thread(out.write, chunk)
            return await run_in_threadpool(service.store_upload, caller, tenant, path, content_type)
        finally:
            path.unlink(missing_ok=True)

    @app.get("/v1/files")
    async def list_files(request: Request) -> Any:
        return await call(request, service.list_files, request.query_params.get("purpose"))

    @app.get("/v1/files/{file_id}")
    async def get_file(request: Request, file_id: str) -> Any:
        return await call(request, service.get_file, file_id)

    @app.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> Any:
        return await call(request, service.delete_file, file_id)

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request) -> Any:
        caller = await run_in_threadpool(service.caller, request)
        body = await json_body(request)
        return await run_in_threadpool(service.create_job, caller, body)

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request) -> Any:
        metadata = {
            k[len("metadata[") : -1]: v
            for k, v in request.query_params.items()
            if k.startswith("metadata[") and k.endswith("]")
        }
        return await call(
            request,
            service.list_jobs,
            request.query_params.get("after"),
            query_int(request, "limit", DEFAULT_LIMIT),
            metadata,
        )

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(request: Request, job_id: str) -> Any:
        return await call(request, service.get_job, job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(request: Request, job_id: str) -> Any:
        return await call(request, service.cancel_job, job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(request: Request, job_id: str) -> Any:
        return await call(
            request,
            service.job_events,
            job_id,
            request.query_params.get("after"),
            query_int(request, "limit", DEFAULT_LIMIT),
        )

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def job_checkpoints(request: Request, job_id: str) -> Any:
        return await call(
            request,
            service.job_checkpoints,
            job_id,
            request.query_params.get("after"),
            query_int(request, "limit", 10),
        )

    async def relay(request: Request, path: str) -> Response:
        caller = await run_in_threadpool(service.caller, request)
        body = await json_body(request)
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "model is required", param="model", code="missing_required_parameter")
        base = await run_in_threadpool(service.upstream, caller, model)
        return await forward(f"{base}{path}", body, model, service.max_upstream_bytes, service.upstream_transport)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await relay(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await relay(request, "/v1/completions")

    return app


def run(
    host: str, port: int, catalogue_path: Path | None, kubeconfig: Path | None, audience: str | None = None
) -> None:
    """Serve the API (``kubelora api``); ``audience`` (else the catalogue's) is what callers' tokens must carry."""
    import uvicorn

    from kubelora.selfservice.catalogue import load

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    catalogue = load(catalogue_path)
    service = SelfService(Kube(kubeconfig, audience=audience or catalogue.audience), catalogue)
    log.info(
        "Serving the self-service API host=%s port=%d models=%d pools=%d audience=%s",
        host,
        port,
        len(catalogue.models),
        len(catalogue.serving_pools),
        service.kube.audience or "<api server>",
    )
    uvicorn.run(create_app(service), host=host, port=port, log_level="info")
