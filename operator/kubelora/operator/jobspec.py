"""The batch/v1 Job that runs the trainer for a LoRAJob: a pure function of the LoRAJob and the config."""

from __future__ import annotations

import json
from typing import Any

from kubelora.api.v1alpha1 import API_VERSION, LoRAJob, dump
from kubelora.operator import names
from kubelora.operator.config import OperatorConfig

#: The LoRAJob's name (shortened with a hash past 63 characters): for people and kubectl selectors only.
LORAJOB_LABEL = "kubelora.dev/lorajob"
#: The LoRAJob's UID. Neither label decides ownership: the controller ownerReference does.
LORAJOB_UID_LABEL = "kubelora.dev/lorajob-uid"
SPEC_ANNOTATION = "kubelora.dev/spec"
SPEC_PATH = "/etc/kubelora/lorajob.json"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# The trainer exits with this code for failures a retry cannot fix (bad config, bad data).
EXIT_CONFIG_ERROR = 3


def job_name(lorajob: LoRAJob) -> str:
    """Deterministic from name and UID (see kubelora.operator.names), at most 63 characters."""
    return names.job_name(lorajob.metadata.name, lorajob.metadata.uid)


def labels(lorajob: LoRAJob) -> dict[str, str]:
    """Labels of the Job and its pods; every value fits 63 characters whatever the LoRAJob's name."""
    out = {
        LORAJOB_LABEL: names.label_value(lorajob.metadata.name),
        "app.kubernetes.io/name": "kubelora-trainer",
        "app.kubernetes.io/managed-by": "kubelora",
    }
    if lorajob.metadata.uid:
        out[LORAJOB_UID_LABEL] = lorajob.metadata.uid
    return out


#: The trainer reads S3 credentials per role (kubelora.storage): BASE_MODEL_AWS_ACCESS_KEY_ID, ...
CREDENTIAL_ROLES = ("BASE_MODEL", "DATASET", "OUTPUT")
PVC_ROOT = "/mnt/pvc"


def _role_refs(lorajob: LoRAJob) -> dict[str, str | None]:
    spec = lorajob.spec
    refs = (spec.base_model.secret_ref, spec.dataset.secret_ref, spec.output.secret_ref)
    return {role: (ref.name if ref is not None else None) for role, ref in zip(CREDENTIAL_ROLES, refs, strict=True)}


def _secret_env(lorajob: LoRAJob) -> list[dict[str, Any]]:
    """S3 credentials by reference, one set per role, so each location is read with its own Secret.

    There are no unprefixed AWS_* variables: a role without a secretRef gets no credentials at all
    rather than another role's.
    """
    env: list[dict[str, Any]] = []
    for role, secret in _role_refs(lorajob).items():
        if secret is None:
            continue
        for env_name, secret_key, optional in (
            ("AWS_ACCESS_KEY_ID", "accessKey", False),
            ("AWS_SECRET_ACCESS_KEY", "secretKey", False),
            ("S3_ENDPOINT", "endpoint", True),
        ):
            selector: dict[str, Any] = {"name": secret, "key": secret_key}
            if optional:
                selector["optional"] = True
            env.append({"name": f"{role}_{env_name}", "valueFrom": {"secretKeyRef": selector}})
    return env


def pvc_claims(lorajob: LoRAJob) -> dict[str, bool]:
    """The PersistentVolumeClaims a run reads or writes: claim name -> read-only.

    Inputs (base model, datasets, test and regression sets) are mounted read-only; the claim of a
    pvc:// output is mounted read-write (and only once, if an input shares it).
    """
    spec = lorajob.spec
    inputs = [spec.base_model.uri, spec.dataset.train, spec.dataset.validation]
    if spec.eval is not None:
        inputs.append(spec.eval.test_set)
        if spec.eval.regression is not None:
            inputs.append(spec.eval.regression.dataset)
    claims: dict[str, bool] = {}
    for uri in inputs:
        if uri and uri.startswith("pvc://"):
            claims.setdefault(_claim(uri), True)
    if spec.output.uri.startswith("pvc://"):
        claims[_claim(spec.output.uri)] = False
    return claims


def _claim(uri: str) -> str:
    return uri[len("pvc://") :].split("/", 1)[0]


def spec_annotation(lorajob: LoRAJob) -> str:
    return json.dumps(
        {
            "apiVersion": API_VERSION,
            "kind": "LoRAJob",
            "metadata": {"name": lorajob.metadata.name, "namespace": lorajob.metadata.namespace},
            "spec": dump(lorajob.spec),
        },
        sort_keys=True,
    )


def _memory_to_shm(per_gpu: str, gpus: int) -> str:
    number = "".join(ch for ch in per_gpu if ch.isdigit())
    unit = per_gpu[len(number) :]
    return f"{int(number) * max(gpus, 1)}{unit}"


def build_job(lorajob: LoRAJob, config: OperatorConfig) -> dict[str, Any]:
    spec = lorajob.spec
    meta = lorajob.metadata
    gpus = spec.resources.gpus
    job_labels = labels(lorajob)
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)
    if spec.resources.memory:
        limits["memory"] = requests["memory"] = spec.resources.memory
    if spec.resources.cpu:
        requests["cpu"] = spec.resources.cpu
    env = [
        {"name": "HOME", "value": "/workspace"},
        {"name": "HF_HOME", "value": "/workspace/hf"},
        {"name": "KUBELORA_LORAJOB", "value": f"{meta.namespace}/{meta.name}"},
        {"name": "KUBELORA_LORAJOB_UID", "value": meta.uid or ""},
        {"name": "S3_SECURE", "value": "true" if config.s3_secure else "false"},
        *_secret_env(lorajob),
    ]
    if config.default_s3_endpoint:
        # Used by the trainer when the Secret has no `endpoint` key.
        env.append({"name": "KUBELORA_DEFAULT_S3_ENDPOINT", "value": config.default_s3_endpoint})
    tolerations = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}] if gpus else []
    tolerations += [t.model_dump(by_alias=True, exclude_none=True) for t in spec.resources.tolerations]
    mounts: list[dict[str, Any]] = [
        {"name": "spec", "mountPath": "/etc/kubelora", "readOnly": True},
        {"name": "workspace", "mountPath": "/workspace"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    claim_volumes: list[dict[str, Any]] = []
    for index, (claim, read_only) in enumerate(sorted(pvc_claims(lorajob).items())):
        volume = f"pvc-{index}"
        mounts.append({"name": volume, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": read_only})
        claim_volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.trainer_uid,
            "runAsGroup": config.trainer_uid,
            "fsGroup": config.trainer_uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "tolerations": tolerations,
        "containers": [
            {
                "name": "trainer",
                "image": config.trainer_image,
                "args": ["--spec", SPEC_PATH, "--workdir", "/workspace/run"],
                "env": env,
                "resources": {"limits": limits, "requests": requests},
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": mounts,
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": [
            {
                "name": "spec",
                "downwardAPI": {
                    "items": [
                        {
                            "path": "lorajob.json",
                            "fieldRef": {"fieldPath": f"metadata.annotations['{SPEC_ANNOTATION}']"},
                        }
                    ]
                },
            },
            {"name": "workspace", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {
                "name": "dshm",
                "emptyDir": {"medium": "Memory", "sizeLimit": _memory_to_shm(config.shm_size_per_gpu, gpus)},
            },
            *claim_volumes,
        ],
    }
    if config.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in config.image_pull_secrets]
    if spec.resources.gpu_type:
        pod_spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": [spec.resources.gpu_type]}
                            ]
                        }
                    ]
                }
            }
        }
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name
    if spec.active_deadline_seconds:
        # Per attempt, as the API says: the kubelet stops a pod active on its node for longer (reason
        # DeadlineExceeded), counted from when the node took the pod, so time queued for a GPU is not. No rule of
        # the podFailurePolicy matches that pod: it is a failed attempt, counted against backoffLimit. On the Job
        # spec the deadline would bound all attempts together, queue time and retry back-off included.
        pod_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.retries,
        "completions": 1,
        "parallelism": 1,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [EXIT_CONFIG_ERROR]},
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {
            "metadata": {"labels": job_labels, "annotations": {SPEC_ANNOTATION: spec_annotation(lorajob)}},
            "spec": pod_spec,
        },
    }
    if config.job_ttl_seconds_after_finished is not None:
        # A finished Job and its pods go after this; the LoRAJob keeps its final status (memory and etcd stay flat).
        job_spec["ttlSecondsAfterFinished"] = config.job_ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(lorajob),
            "namespace": meta.namespace,
            "labels": job_labels,
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "LoRAJob",
                    "name": meta.name,
                    "uid": meta.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": job_spec,
    }
