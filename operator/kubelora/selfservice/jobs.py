"""The OpenAI fine-tuning job and the LoRAJob it is, both ways, without I/O: a create request to the LoRAJob (and
AdapterDeployment) manifests the API applies, and a LoRAJob (its AdapterDeployment, its trainer's report) to the job
object the ``openai`` client reads."""

from __future__ import annotations

import datetime
import json
import re
import secrets
import time
from typing import Any, Protocol

from kubelora.api.v1alpha1 import InvalidObjectError, validate_adapterdeployment, validate_lorajob
from kubelora.selfservice.catalogue import SERVED_NAME, SERVED_NAME_MAX, Catalogue
from kubelora.selfservice.kube import ApiError

LABEL = "kubelora.dev/api"
LABEL_VALUE = "fine-tuning"
ANN = "api.kubelora.dev/"
FILES_DIR = "files/"
JOBS_DIR = "jobs/"
#: spec.training.learningRate for learning_rate_multiplier 1 when the catalogue model sets none.
BASE_LEARNING_RATE = 2.0e-4
#: A job id: the LoRAJob's name, and a key in the tenant bucket (jobs/<id>/...).
JOB_ID = re.compile(r"^ftjob-[a-z0-9]{1,40}$")


class Storage(Protocol):
    """Where a tenant's files and job outputs live: the storage Secret's name and URIs in its bucket."""

    secret_name: str

    def uri(self, *parts: str) -> str: ...


def epoch(value: str | None) -> int | None:
    if not value:
        return None
    return int(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def catalogue_model(catalogue: Catalogue, body: dict[str, Any]) -> str:
    """The request's ``model``, which the catalogue must offer (404 naming what it does offer)."""
    model_name = body.get("model")
    if not isinstance(model_name, str) or model_name not in catalogue.models:
        known = ", ".join(sorted(catalogue.models)) or "none"
        raise ApiError(
            404 if isinstance(model_name, str) else 400,
            f"Unknown base model {model_name!r}; the catalogue offers: {known}",
            param="model",
            code="model_not_found",
        )
    return model_name


def manifests(
    catalogue: Catalogue, storage: Storage, body: dict[str, Any], name: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The LoRAJob ``name`` for a create request, and the AdapterDeployment of the same name when it asks for a
    serving pool (its owner reference is the caller's to add once the LoRAJob exists). Both are validated as the
    API server would: ApiError 400 naming the parameter, before anything is created."""
    model_name = catalogue_model(catalogue, body)
    model = catalogue.models[model_name]
    training_file = body["training_file"]
    validation_file = body.get("validation_file")
    method = body.get("method") or {"type": "supervised"}
    if method.get("type", "supervised") != "supervised":
        raise ApiError(400, "Only method type supervised is supported", param="method", code="unsupported_method")
    hyper = dict(body.get("hyperparameters") or {})
    hyper.update((method.get("supervised") or {}).get("hyperparameters") or {})
    extras = dict(body.get("kubelora") or {})
    pool_name = extras.get("serving_pool")
    if pool_name is not None and pool_name not in catalogue.serving_pools:
        known = ", ".join(sorted(catalogue.serving_pools)) or "none"
        raise ApiError(
            400,
            f"Unknown serving pool {pool_name!r}; the catalogue offers: {known}",
            param="kubelora.serving_pool",
            code="serving_pool_not_found",
        )
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

    secret = {"name": storage.secret_name}
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
    dataset: dict[str, Any] = {"train": storage.uri(FILES_DIR, f"{training_file}.jsonl"), "format": "chat"}
    dataset["secretRef"] = secret
    spec: dict[str, Any] = {
        "baseModel": {"uri": model.uri, "secretRef": {"name": model.secret_name or storage.secret_name}},
        "dataset": dataset,
        "method": extras.get("method", "lora"),
        "lora": lora,
        "training": training,
        "resources": {"gpus": model.gpus, **({"gpuType": model.gpu_type} if model.gpu_type else {})},
        "output": {"uri": storage.uri(JOBS_DIR, f"{name}/"), "secretRef": secret},
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
        validation_uri = storage.uri(FILES_DIR, f"{validation_file}.jsonl")
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
        pool = catalogue.serving_pools[pool_name]
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
    return manifest, ad_manifest


def job_object(
    namespace: str,
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
    finished_at = epoch(status.get("completionTime"))
    if ANN + "cancelled-at" in ann:
        state = "cancelled"
        finished_at = finished_at or epoch(ann[ANN + "cancelled-at"])
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
        base = epoch(progress.get("updatedAt")) or int(time.time())
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
        "created_at": epoch(meta.get("creationTimestamp")) or int(time.time()),
        "model": ann.get(ANN + "model", ""),
        "fine_tuned_model": fine_tuned_model,
        "organization_id": namespace,
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
            "namespace": namespace,
            "phase": phase,
            "adapter": status.get("adapter"),
            "eval": status.get("eval"),
            "serving_pool": ann.get(ANN + "serving-pool"),
            "served_name": ann.get(ANN + "served-name"),
        },
    }
