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
import mmap
import os
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import anyio
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kubelora.api.v1alpha1 import InvalidObjectError, ServingTarget, validate_adapterdeployment, validate_lorajob
from kubelora.selfservice.catalogue import SERVED_NAME, SERVED_NAME_MAX, Catalogue, endpoint_host
from kubelora.selfservice.kube import ApiError, Caller, Kube, not_found

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

LABEL = "kubelora.dev/api"
LABEL_VALUE = "fine-tuning"
ANN = "api.kubelora.dev/"
FILES_DIR = "files/"
JOBS_DIR = "jobs/"
#: spec.training.learningRate for learning_rate_multiplier 1 when the catalogue model sets none.
BASE_LEARNING_RATE = 2.0e-4
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
#: The largest JSON request body (job creation, chat completions): 413 above it.
MAX_BODY_BYTES = 1 << 20
#: The largest reply the API relays from a model server: 502 above it.
MAX_UPSTREAM_BYTES = 16 << 20
#: Room for the multipart framing around the file part of an upload.
MULTIPART_SLACK = 64 * 1024
#: A job id: the LoRAJob's name, and a key in the tenant bucket (jobs/<id>/...).
JOB_ID = re.compile(r"^ftjob-[a-z0-9]{1,40}$")


# ------------------------------------------------------------------------------------------------------------- helpers


def _epoch(value: str | None) -> int | None:
    if not value:
        return None
    return int(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


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


# ------------------------------------------------------------------------------------------------------------- uploads


def _boundary(content_type: str) -> str:
    """The boundary of a multipart/form-data Content-Type; ApiError 400 for any other body."""
    boundary = None
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not content_type.lower().startswith("multipart/form-data") or not boundary:
        raise ApiError(400, "Expected a multipart/form-data upload", code="invalid_upload")
    return boundary


def _multipart(body: Path, content_type: str) -> tuple[dict[str, str], tuple[str, int, int] | None]:
    """Fields and the ``file`` part (filename, start, end offsets in ``body``) of a multipart/form-data body."""
    delimiter = b"--" + _boundary(content_type).encode()
    fields: dict[str, str] = {}
    file_part: tuple[str, int, int] | None = None
    if body.stat().st_size == 0:
        raise ApiError(400, "Empty upload", code="invalid_upload")
    with body.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos = data.find(delimiter)
        while pos >= 0:
            start = pos + len(delimiter)
            if data[start : start + 2] == b"--":
                break
            header_end = data.find(b"\r\n\r\n", start)
            if header_end < 0:
                break
            headers = data[start:header_end].decode("utf-8", "replace")
            content_start = header_end + 4
            next_pos = data.find(b"\r\n" + delimiter, content_start)
            if next_pos < 0:
                raise ApiError(400, "Truncated multipart upload", code="invalid_upload")
            name = filename = None
            for line in headers.split("\r\n"):
                if line.lower().startswith("content-disposition:"):
                    for item in line.split(";")[1:]:
                        k, _, v = item.strip().partition("=")
                        if k == "name":
                            name = v.strip('"')
                        elif k == "filename":
                            filename = v.strip('"')
            if name == "file":
                file_part = (filename or "upload.jsonl", content_start, next_pos)
            elif name:
                if next_pos - content_start > MULTIPART_SLACK:
                    raise ApiError(400, f"The form field {name} is too long", param=name, code="invalid_upload")
                fields[name] = data[content_start:next_pos].decode("utf-8", "replace")
            pos = next_pos + 2
    return fields, file_part


def _validate_jsonl(path: Path, filename: str, fmt: str, start: int = 0, end: int | None = None) -> int:
    """The trainer's own row checks, row by row, on bytes [start, end) of ``path``; the number of rows.
    ApiError 400 naming file and line of the first bad row."""
    from kubelora.trainer.data import validate_jsonl
    from kubelora.trainer.errors import MalformedDatasetError

    try:
        return validate_jsonl(path, fmt, name=filename, start=start, end=end)
    except MalformedDatasetError as exc:
        raise ApiError(400, f"Invalid training file: {exc}", param="file", code="invalid_file_format") from None


class _Range:
    """Bytes [start, end) of an open file as a readable stream (the file part of an upload, for put_object)."""

    def __init__(self, f: BinaryIO, start: int, end: int) -> None:
        f.seek(start)
        self.f = f
        self.remaining = end - start

    def read(self, size: int | None = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        n = self.remaining if size is None or size < 0 else min(size, self.remaining)
        chunk = self.f.read(n)
        self.remaining -= len(chunk)
        return chunk


def _too_large(limit: int, what: str = "The request body", param: str | None = None, code: str = "") -> ApiError:
    return ApiError(413, f"{what} is larger than the limit of {limit} bytes", param=param, code=code or None)


# ------------------------------------------------------------------------------------------------------------- proxy


def _unreachable(model: str, exc: Exception) -> ApiError:
    log.warning("Model server unreachable model=%s error=%s", model, exc)
    return ApiError(
        502, f"The model server did not answer: {type(exc).__name__}", type_="server_error", code="upstream"
    )


def _upstream_too_large(model: str, limit: int) -> ApiError:
    log.warning("Model server reply over the limit model=%s limit=%d", model, limit)
    return ApiError(
        502,
        f"The model server's reply is larger than the limit of {limit} bytes",
        type_="server_error",
        code="upstream_too_large",
    )


async def _read_reply(upstream: httpx.Response, model: str, limit: int) -> bytes:
    """The whole reply of a model server, at most ``limit`` bytes (502 above)."""
    chunks, size = [], 0
    async for chunk in upstream.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise _upstream_too_large(model, limit)
        chunks.append(chunk)
    return b"".join(chunks)


#: What ends a Server-Sent Event: a blank line (vLLM writes ``\n\n``).
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")


def _events_end(data: bytearray) -> int:
    """The length of the whole events at the start of ``data`` (0: not one event yet)."""
    return max((i + len(end) for end in _EVENT_ENDS if (i := data.rfind(end)) >= 0), default=0)


def _error_event(error: ApiError) -> bytes:
    """An error in the middle of a stream, as vLLM sends one (the openai client raises ``APIError``), then the end."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\ndata: [DONE]\n\n"


async def _relay_events(upstream: httpx.Response, model: str, limit: int) -> AsyncIterator[bytes]:
    """The model server's events as they arrive, whole events only, so that the stream can always end cleanly.

    Past ``limit`` bytes, or when the model server breaks off, the stream ends with an error event and
    ``data: [DONE]`` (the status line has gone, so that is the only way left to say so).
    """
    import httpx

    pending, size = bytearray(), 0
    try:
        async for chunk in upstream.aiter_bytes():
            size += len(chunk)
            if size > limit:
                yield _error_event(_upstream_too_large(model, limit))
                return
            pending += chunk
            end = _events_end(pending)
            if end:
                yield bytes(pending[:end])
                del pending[:end]
    except httpx.HTTPError as exc:
        log.warning("Model server stream broke off model=%s error=%s", model, exc)
        yield _error_event(
            ApiError(
                502,
                f"The model server's stream broke off: {type(exc).__name__}",
                type_="server_error",
                code="upstream",
            )
        )
        return
    if pending:  # the model server's last bytes, even when they are not a whole event
        yield bytes(pending)


class _EventStream(StreamingResponse):
    """A relayed stream that closes the model server's stream however it ends, the caller going away included."""

    def __init__(
        self, content: AsyncIterator[bytes], closers: Sequence[Callable[[], Awaitable[None]]], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self.events = content
        self.closers = closers

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette cancels the relay when the caller disconnects: close upstream all the same.
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.events, "aclose", None)
                if aclose is not None:
                    await aclose()
                for close in self.closers:
                    await close()


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
        fields, part = _multipart(body, content_type)
        if fields.get("purpose") != "fine-tune":
            raise ApiError(400, "Only purpose=fine-tune is supported", param="purpose", code="invalid_purpose")
        if part is None:
            raise ApiError(400, "Missing the file part", param="file", code="invalid_upload")
        filename, start, end = part
        size = end - start
        if size > self.catalogue.max_file_bytes:
            raise _too_large(self.catalogue.max_file_bytes, "The file", "file", "file_too_large")
        rows = _validate_jsonl(body, filename, "chat", start, end)
        file_id = _new_id("file")
        with body.open("rb") as src:
            tenant.client.put_object(
                tenant.bucket,
                tenant.key(FILES_DIR, f"{file_id}.jsonl"),
                _Range(src, start, end),
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
        model_name = body.get("model")
        if not isinstance(model_name, str) or model_name not in self.catalogue.models:
            known = ", ".join(sorted(self.catalogue.models)) or "none"
            raise ApiError(
                404 if isinstance(model_name, str) else 400,
                f"Unknown base model {model_name!r}; the catalogue offers: {known}",
                param="model",
                code="model_not_found",
            )
        model = self.catalogue.models[model_name]
        tenant = self.tenant(caller)
        training_file = body.get("training_file")
        if not isinstance(training_file, str):
            raise ApiError(400, "training_file is required", param="training_file", code="missing_required_parameter")
        self.file_meta(tenant, training_file, "training_file")
        validation_file = body.get("validation_file")
        if validation_file is not None:
            self.file_meta(tenant, str(validation_file), "validation_file")
        method = body.get("method") or {"type": "supervised"}
        if method.get("type", "supervised") != "supervised":
            raise ApiError(400, "Only method type supervised is supported", param="method", code="unsupported_method")
        hyper = dict(body.get("hyperparameters") or {})
        hyper.update((method.get("supervised") or {}).get("hyperparameters") or {})
        extras = dict(body.get("kubelora") or {})
        pool_name = extras.get("serving_pool")
        if pool_name is not None and pool_name not in self.catalogue.serving_pools:
            known = ", ".join(sorted(self.catalogue.serving_pools)) or "none"
            raise ApiError(
                400,
                f"Unknown serving pool {pool_name!r}; the catalogue offers: {known}",
                param="kubelora.serving_pool",
                code="serving_pool_not_found",
            )
        if pool_name is not None:
            self.kube.authorize(caller, "create", "adapterdeployments")
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 64 or not SERVED_NAME.match(suffix)):
            raise ApiError(
                400,
                "suffix must be at most 64 of the characters A-Z a-z 0-9 . _ / -, starting with a letter or digit",
                param="suffix",
            )
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ApiError(400, "metadata must map strings to strings", param="metadata")

        name = _new_id("ftjob")
        secret = {"name": tenant.secret_name}
        training = dict(model.training)
        if (epochs := hyper.get("n_epochs")) not in (None, "auto"):
            training.pop("maxSteps", None)
            training["epochs"] = epochs
        if (batch := hyper.get("batch_size")) not in (None, "auto"):
            training["batchSize"] = batch
        if (multiplier := hyper.get("learning_rate_multiplier")) not in (None, "auto"):
            training["learningRate"] = float(training.get("learningRate", BASE_LEARNING_RATE)) * float(multiplier)
        if "seed" in body and body["seed"] is not None:
            training["seed"] = body["seed"]
        lora = dict(model.lora)
        if "rank" in extras:
            lora["rank"] = extras["rank"]
        dataset: dict[str, Any] = {"train": tenant.uri(FILES_DIR, f"{training_file}.jsonl"), "format": "chat"}
        dataset["secretRef"] = secret
        spec: dict[str, Any] = {
            "baseModel": {"uri": model.uri, "secretRef": {"name": model.secret_name or tenant.secret_name}},
            "dataset": dataset,
            "method": extras.get("method", "lora"),
            "lora": lora,
            "training": training,
            "resources": {"gpus": model.gpus, **({"gpuType": model.gpu_type} if model.gpu_type else {})},
            "output": {"uri": tenant.uri(JOBS_DIR, f"{name}/"), "secretRef": secret},
        }
        if spec["method"] == "dora":
            # vLLM cannot load DoRA adapters as runtime LoRA: a DoRA job is evaluated (and served) merged.
            spec["output"]["mergedModel"] = True
            if pool_name is not None:
                raise ApiError(
                    400,
                    "method dora cannot be deployed onto a serving pool: vLLM serves DoRA only as a merged model",
                    param="kubelora.serving_pool",
                    code="unsupported_method",
                )
        if model.retries is not None:
            spec["retries"] = model.retries
        if model.active_deadline_seconds is not None:
            spec["activeDeadlineSeconds"] = model.active_deadline_seconds
        if validation_file is not None:
            validation_uri = tenant.uri(FILES_DIR, f"{validation_file}.jsonl")
            dataset["validation"] = validation_uri
            spec["eval"] = {**model.eval, "testSet": validation_uri}
            if "gates" in extras:
                spec["eval"]["gates"] = extras["gates"]
        elif "gates" in extras:
            raise ApiError(400, "Gates need a validation_file to evaluate on", param="kubelora.gates")
        served_name = None
        if pool_name is not None:
            served_name = f"ft/{model_name}/{suffix + '-' if suffix else ''}{name.removeprefix('ftjob-')}"
            if len(served_name) > SERVED_NAME_MAX or not SERVED_NAME.match(served_name):
                raise ApiError(
                    400,
                    f"The served name {served_name!r} would be longer than {SERVED_NAME_MAX} characters or invalid: "
                    "use a shorter suffix",
                    param="suffix",
                )
        annotations = {
            ANN + "model": model_name,
            ANN + "training-file": training_file,
            ANN + "metadata": json.dumps(metadata),
            ANN + "hyperparameters": json.dumps(hyper),
        }
        for key, value in (
            ("validation-file", validation_file),
            ("suffix", suffix),
            ("serving-pool", pool_name),
            ("served-name", served_name),
        ):
            if value is not None:
                annotations[ANN + key] = str(value)
        manifest = {
            "apiVersion": "kubelora.dev/v1alpha1",
            "kind": "LoRAJob",
            "metadata": {"name": name, "labels": {LABEL: LABEL_VALUE}, "annotations": annotations},
            "spec": spec,
        }
        try:
            validate_lorajob(manifest)
        except InvalidObjectError as exc:
            raise ApiError(400, "; ".join(exc.causes), code="invalid_job") from None
        ad_manifest: dict[str, Any] | None = None
        ad_metadata: dict[str, Any] = {"name": name, "labels": {LABEL: LABEL_VALUE}}
        if pool_name is not None and served_name is not None:
            pool = self.catalogue.serving_pools[pool_name]
            ad_spec: dict[str, Any] = {"adapter": {"loraJob": name}, "servedName": served_name, "target": pool.target}
            if pool.rollout:
                ad_spec["rollout"] = pool.rollout
            ad_manifest = {
                "apiVersion": "kubelora.dev/v1alpha1",
                "kind": "AdapterDeployment",
                "metadata": ad_metadata,
                "spec": ad_spec,
            }
            # Checked before the LoRAJob exists: a job is never left without the deployment it asked for.
            try:
                validate_adapterdeployment(ad_manifest)
            except InvalidObjectError as exc:
                raise ApiError(400, "; ".join(exc.causes), param="kubelora.serving_pool", code="invalid_job") from None
        created = self.kube.create_custom(caller.namespace, "lorajobs", manifest)
        ad = None
        if ad_manifest is not None:
            ad_metadata["ownerReferences"] = [
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
            model_name,
            pool_name,
        )
        return self.job_object(caller, created, ad)

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

    def job_object(
        self,
        caller: Caller,
        lorajob: dict[str, Any],
        ad: dict[str, Any] | None,
        report: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        meta = lorajob["metadata"]
        ann = meta.get("annotations") or {}
        spec = lorajob["spec"]
        status = lorajob.get("status") or {}
        phase = status.get("phase", "Pending")
        error = None
        fine_tuned_model = None
        finished_at = _epoch(status.get("completionTime"))
        if ANN + "cancelled-at" in ann:
            state = "cancelled"
            finished_at = finished_at or _epoch(ann[ANN + "cancelled-at"])
        elif phase == "Failed":
            state = "failed"
            ready: dict[str, Any] = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), {})
            error = {"code": ready.get("reason") or "Failed", "message": status.get("message") or "", "param": None}
        elif phase == "Succeeded":
            state = "succeeded"
            if ad is not None:
                ad_status = ad.get("status") or {}
                ad_phase = ad_status.get("phase", "Pending")
                serving = any(
                    c.get("type") == "Ready" and c.get("status") == "True" for c in ad_status.get("conditions") or []
                )
                if ad_phase == "Ready" and serving:  # phase Ready with Ready=False: no pod serves it right now
                    fine_tuned_model = ad["spec"]["servedName"]
                elif ad_phase in ("Refused", "Failed", "RolledBack"):
                    state = "failed"
                    error = {
                        "code": f"Deployment{ad_phase}",
                        "message": ad_status.get("message") or f"AdapterDeployment {ad_phase}",
                        "param": None,
                    }
                else:
                    state = "running"  # trained, not yet served: succeeded means the model answers
                    finished_at = None
        elif phase == "Queued":
            state = "queued"
        elif phase in ("Training", "Evaluating"):
            state = "running"
        else:
            state = "validating_files"
        progress = status.get("progress") or {}
        estimated_finish = None
        if state in ("running", "queued") and progress.get("etaSeconds") is not None:
            base = _epoch(progress.get("updatedAt")) or int(time.time())
            estimated_finish = base + int(progress["etaSeconds"])
        trained_tokens = None
        if report is not None:
            training = report.get("training") or {}
            if training.get("tokensPerSecond") and training.get("seconds"):
                trained_tokens = int(float(training["tokensPerSecond"]) * float(training["seconds"]))
        training_spec = spec.get("training") or {}
        hyper = json.loads(ann.get(ANN + "hyperparameters", "{}"))
        hyperparameters = {
            "n_epochs": training_spec.get("epochs", hyper.get("n_epochs", "auto")),
            "batch_size": training_spec.get("batchSize", hyper.get("batch_size", "auto")),
            "learning_rate_multiplier": hyper.get("learning_rate_multiplier", "auto"),
        }
        result_files = []
        if status.get("eval", {}).get("samplesUri"):
            result_files.append(status["eval"]["samplesUri"])
        return {
            "object": "fine_tuning.job",
            "id": meta["name"],
            "created_at": _epoch(meta.get("creationTimestamp")) or int(time.time()),
            "model": ann.get(ANN + "model", ""),
            "fine_tuned_model": fine_tuned_model,
            "organization_id": caller.namespace,
            "status": state,
            "hyperparameters": hyperparameters,
            "training_file": ann.get(ANN + "training-file", ""),
            "validation_file": ann.get(ANN + "validation-file"),
            "result_files": result_files,
            "trained_tokens": trained_tokens,
            "error": error,
            "finished_at": finished_at if state in ("succeeded", "failed", "cancelled") else None,
            "estimated_finish": estimated_finish,
            "seed": int(training_spec.get("seed", 42)),
            "suffix": ann.get(ANN + "suffix"),
            "user_provided_suffix": ann.get(ANN + "suffix"),
            "metadata": json.loads(ann.get(ANN + "metadata", "{}")) or None,
            "integrations": None,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
            "kubelora": {
                "lorajob": meta["name"],
                "namespace": caller.namespace,
                "phase": phase,
                "adapter": status.get("adapter"),
                "eval": status.get("eval"),
                "serving_pool": ann.get(ANN + "serving-pool"),
                "served_name": ann.get(ANN + "served-name"),
            },
        }

    def get_job(self, caller: Caller, job_id: str) -> dict[str, Any]:
        self.kube.authorize(caller, "get", "lorajobs")
        lorajob = self.lorajob(caller, job_id)
        phase = (lorajob.get("status") or {}).get("phase")
        report = self.report(caller, lorajob) if phase == "Succeeded" else None
        return self.job_object(caller, lorajob, self.adapter_deployment(caller, lorajob), report)

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
        jobs = []
        for o in items:
            ad = ads.get(o["metadata"]["name"])
            pooled = ANN + "serving-pool" in (o["metadata"].get("annotations") or {})
            jobs.append(self.job_object(caller, o, ad if pooled and ad is not None and self.owned_by(ad, o) else None))
        live = {o["metadata"]["name"] for o in items}
        for record in self.cancelled_records(caller, live):
            if all(
                json.loads(record["metadata"].get("annotations", {}).get(ANN + "metadata", "{}")).get(k) == v
                for k, v in metadata.items()
            ):
                jobs.append(self.job_object(caller, record, None))
        jobs.sort(key=lambda j: (j["created_at"], j["id"]), reverse=True)
        return self._page(jobs, after, limit)

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
        return self.job_object(caller, lorajob, self.adapter_deployment(caller, lorajob))

    def job_events(self, caller: Caller, job_id: str, after: str | None, limit: int) -> dict[str, Any]:
        self.kube.authorize(caller, "get", "lorajobs")
        lorajob = self.lorajob(caller, job_id)
        meta = lorajob["metadata"]
        status = lorajob.get("status") or {}
        events: list[dict[str, Any]] = []

        def add(
            created: int | None, message: str, level: str = "info", data: Any = None, kind: str = "message"
        ) -> None:
            created = created or _epoch(meta.get("creationTimestamp")) or 0
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

        add(_epoch(meta.get("creationTimestamp")), f"Created fine-tuning job: {job_id}")
        for event in self.kube.events_for(caller.namespace, meta["name"], meta.get("uid")):
            when = event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
            level = "warn" if event.get("type") == "Warning" else "info"
            add(_epoch(when), f"{event.get('reason')}: {event.get('message', '')}".strip(), level)
        for condition in status.get("conditions") or []:
            add(
                _epoch(condition.get("lastTransitionTime")),
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
                _epoch(progress.get("updatedAt")),
                f"Step {progress.get('step')}/{progress.get('totalSteps')}: training loss={progress.get('loss')}",
                data=data,
                kind="metrics",
            )
        evaluation = status.get("eval")
        if evaluation:
            verdict = "passed" if evaluation.get("passed") else "failed"
            adapter = ", ".join(f"{k}={v:.4g}" for k, v in sorted((evaluation.get("adapter") or {}).items()))
            add(
                _epoch(status.get("completionTime")),
                f"Evaluation {verdict}: {adapter}",
                "info" if evaluation.get("passed") else "warn",
                data={"eval": evaluation},
                kind="metrics",
            )
        ann = meta.get("annotations") or {}
        if ANN + "cancelled-at" in ann:
            add(_epoch(ann[ANN + "cancelled-at"]), "Cancelled fine-tuning job")
        ad = self.adapter_deployment(caller, lorajob)
        if ad is not None:
            ad_status = ad.get("status") or {}
            for condition in ad_status.get("conditions") or []:
                add(
                    _epoch(condition.get("lastTransitionTime")),
                    f"Deployment {condition['type']}={condition['status']} ({condition.get('reason')}): "
                    f"{condition.get('message', '')}",
                )
            if ad_status.get("phase") == "Ready":
                add(
                    None
                    if not ad_status.get("conditions")
                    else _epoch(ad_status["conditions"][-1].get("lastTransitionTime")),
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
                    "created_at": _epoch(progress.get("updatedAt"))
                    or _epoch(lorajob["metadata"].get("creationTimestamp"))
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
                    "created_at": _epoch(status.get("completionTime")) or 0,
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
            raise _too_large(limit, code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # a chunked body, or one longer than it said
                raise _too_large(limit, code="request_too_large")
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
        _boundary(content_type)
        limit = service.catalogue.max_file_bytes
        declared = declared_length(request)
        if declared is not None and declared > limit + MULTIPART_SLACK:
            raise _too_large(limit, "The upload", "file", "file_too_large")
        fd, name = tempfile.mkstemp(suffix=".upload", dir=service.workdir)
        path = Path(name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit + MULTIPART_SLACK:
                        raise _too_large(limit, "The upload", "file", "file_too_large")
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

    async def proxy(request: Request, path: str) -> Response:
        import httpx

        caller = await run_in_threadpool(service.caller, request)
        body = await json_body(request)
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "model is required", param="model", code="missing_required_parameter")
        base = await run_in_threadpool(service.upstream, caller, model)
        limit = service.max_upstream_bytes
        if body.get("stream"):
            return await proxy_stream(f"{base}{path}", body, model, limit)
        try:
            async with (
                httpx.AsyncClient(timeout=120, transport=service.upstream_transport) as client,
                client.stream("POST", f"{base}{path}", json=body) as upstream,
            ):
                content = await _read_reply(upstream, model, limit)
        except httpx.HTTPError as exc:
            raise _unreachable(model, exc) from None
        return Response(
            content,
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type", "application/json"),
        )

    async def proxy_stream(url: str, body: dict[str, Any], model: str, limit: int) -> Response:
        """``stream=true``: the model server's Server-Sent Events, relayed as they arrive."""
        import httpx

        client = httpx.AsyncClient(timeout=120, transport=service.upstream_transport)
        try:
            upstream = await client.send(client.build_request("POST", url, json=body), stream=True)
        except BaseException as exc:
            await client.aclose()
            if isinstance(exc, httpx.HTTPError):
                raise _unreachable(model, exc) from None
            raise
        content_type = upstream.headers.get("content-type", "application/json")
        if upstream.is_success and content_type.partition(";")[0].strip().lower() == "text/event-stream":
            return _EventStream(
                _relay_events(upstream, model, limit),
                closers=(upstream.aclose, client.aclose),
                status_code=upstream.status_code,
                media_type=content_type,
                # Proxies in front of the API (nginx ingress) must not buffer the events either.
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        # An error before any event (vLLM's own OpenAI-shaped error, say): relayed whole, as without stream.
        try:
            content = await _read_reply(upstream, model, limit)
        except httpx.HTTPError as exc:
            raise _unreachable(model, exc) from None
        finally:
            await upstream.aclose()
            await client.aclose()
        return Response(content, status_code=upstream.status_code, media_type=content_type)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await proxy(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxy(request, "/v1/completions")

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
