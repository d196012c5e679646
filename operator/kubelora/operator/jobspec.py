"""The batch/v1 Job that runs the trainer for a LoRAJob: a pure function of the LoRAJob and the config."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from kubelora.api.v1alpha1 import API_VERSION, LoRAJob, dump
from kubelora.operator import names
from kubelora.operator.config import OperatorConfig
from kubelora.trainer import distributed

#: The LoRAJob's name (shortened with a hash past 63 characters): for people and kubectl selectors only.
LORAJOB_LABEL = "kubelora.dev/lorajob"
#: The LoRAJob's UID. Neither label decides ownership: the controller ownerReference does.
LORAJOB_UID_LABEL = "kubelora.dev/lorajob-uid"
SPEC_ANNOTATION = "kubelora.dev/spec"
SPEC_PATH = "/etc/kubelora/lorajob.json"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
#: Kueue admits a suspended Job that carries this label into the named LocalQueue (docs/gpu-cluster.md).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The trainer exits with this code for failures a retry cannot fix (bad config, bad data).
EXIT_CONFIG_ERROR = 3


def job_name(lorajob: LoRAJob) -> str:
    """Deterministic from name and UID (see kubelora.operator.names), at most 63 characters."""
    return names.job_name(lorajob.metadata.name, lorajob.metadata.uid, lorajob.spec.resources.nodes)


def service_name(lorajob: LoRAJob) -> str:
    """The headless Service that gives a multi-node Job's pods their stable hostnames."""
    return names.service_name(job_name(lorajob))


def owner_references(lorajob: LoRAJob) -> list[dict[str, Any]]:
    meta = lorajob.metadata
    return [
        {
            "apiVersion": API_VERSION,
            "kind": "LoRAJob",
            "name": meta.name,
            "uid": meta.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


TRAINER_ARGS = ("--spec", SPEC_PATH, "--workdir", "/workspace/run")


def container_command(lorajob: LoRAJob, *, grace_period_seconds: int | None = None) -> list[str] | None:
    """The trainer container's command: torchrun through kubelora.trainer.distributed for more than one process.

    None keeps the image's entrypoint (one process). Every pod of a multi-node Job has the same command; each
    finds its node rank in JOB_COMPLETION_INDEX when it starts. ``grace_period_seconds``, the pod's
    terminationGracePeriodSeconds, sets torchrun's --shutdown-timeout (the grace period less 10 s, at least 30 s):
    torchrun gets the SIGTERM (through the launcher) and would otherwise kill its workers after 30 s.
    """
    resources = lorajob.spec.resources
    host = None
    if resources.nodes > 1:
        host = distributed.rendezvous_host(job_name(lorajob), service_name(lorajob))
    return distributed.pod_command(
        nodes=resources.nodes,
        gpus=resources.gpus,
        trainer_args=TRAINER_ARGS,
        rdzv_host=host,
        rdzv_id=lorajob.metadata.uid or job_name(lorajob),
        shutdown_timeout=(
            distributed.shutdown_timeout_for(grace_period_seconds) if grace_period_seconds is not None else None
        ),
    )


def build_service(lorajob: LoRAJob) -> dict[str, Any] | None:
    """The headless Service of a multi-node Job (None for one node): DNS names for its pods, no load balancing.

    ``publishNotReadyAddresses``: the pods have no readiness probe to pass before the rendezvous, and pod 0 must
    be resolvable as soon as it runs. Owned by the LoRAJob, like the Job, so both go with it.
    """
    if lorajob.spec.resources.nodes <= 1:
        return None
    job_labels = labels(lorajob)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(lorajob),
            "namespace": lorajob.metadata.namespace,
            "labels": job_labels,
            "ownerReferences": owner_references(lorajob),
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LORAJOB_UID_LABEL: job_labels.get(LORAJOB_UID_LABEL, ""), "job-name": job_name(lorajob)},
            "ports": [{"name": "rendezvous", "port": distributed.RDZV_PORT, "targetPort": distributed.RDZV_PORT}],
        },
    }


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


#: Grace period bounds: the trainer stops at the next step after SIGTERM and uploads a checkpoint (trainer.md).
MIN_GRACE_SECONDS = 120
#: Seconds for the trainer to notice SIGTERM, write the checkpoint and start the upload.
GRACE_OVERHEAD_SECONDS = 30
#: The step that runs when SIGTERM arrives finishes first: one step and a half, to be safe.
GRACE_STEPS = 1.5
#: The upload speed assumed for a checkpoint, bytes per second (20 MB/s).
UPLOAD_BYTES_PER_SECOND = 20e6
#: A checkpoint holds the adapter in fp32 and AdamW's two fp32 moments: 12 bytes per trainable parameter,
#: plus about 1 MB of optimizer, scheduler and trainer state.
CHECKPOINT_BYTES_PER_PARAMETER = 12
CHECKPOINT_OVERHEAD_BYTES = 1_000_000
#: Without a step time: MIN_GRACE_SECONDS plus this much per UNKNOWN_STEP_CHUNK_BYTES of checkpoint.
UNKNOWN_STEP_SECONDS_PER_CHUNK = 60
UNKNOWN_STEP_CHUNK_BYTES = 500e6
#: Without an estimate at all (the base model's config.json was not read: hf://, or no preflight estimate).
UNKNOWN_GRACE_SECONDS = 300


def checkpoint_bytes(estimate: Mapping[str, Any] | None) -> int | None:
    """The size of a checkpoint from the estimate's trainable parameters (None when unknown)."""
    trainable = (estimate or {}).get("trainableParameters")
    if not trainable:
        return None
    return int(trainable) * CHECKPOINT_BYTES_PER_PARAMETER + CHECKPOINT_OVERHEAD_BYTES


def step_seconds(estimate: Mapping[str, Any] | None, max_steps: int | None) -> float | None:
    """Wall seconds of one optimizer step: the estimate's GPU-hours over the world and the steps (None if unknown)."""
    gpu_hours = (estimate or {}).get("gpuHours")
    if not gpu_hours or not max_steps:
        return None
    world = max(1, int((estimate or {}).get("worldSize") or 1))
    return float(gpu_hours) * 3600.0 / world / max_steps


def grace_period_seconds(estimate: Mapping[str, Any] | None, max_steps: int | None) -> int:
    """terminationGracePeriodSeconds of a training pod: time to finish the step under way and upload a checkpoint.

    ``max(120, ceil(30 + 1.5 x step seconds + checkpoint bytes / 20 MB/s))``; with no step time,
    ``ceil(120 + 60 s per 500 MB of checkpoint)``; with no estimate, 300 s.
    """
    size = checkpoint_bytes(estimate)
    if size is None:
        return UNKNOWN_GRACE_SECONDS
    step = step_seconds(estimate, max_steps)
    if step is None:
        return math.ceil(MIN_GRACE_SECONDS + UNKNOWN_STEP_SECONDS_PER_CHUNK * size / UNKNOWN_STEP_CHUNK_BYTES)
    needed = GRACE_OVERHEAD_SECONDS + GRACE_STEPS * step + size / UPLOAD_BYTES_PER_SECOND
    return max(MIN_GRACE_SECONDS, math.ceil(needed))


def _memory_to_shm(per_gpu: str, gpus: int) -> str:
    number = "".join(ch for ch in per_gpu if ch.isdigit())
    unit = per_gpu[len(number) :]
    return f"{int(number) * max(gpus, 1)}{unit}"


def build_job(lorajob: LoRAJob, config: OperatorConfig, estimate: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Job. ``estimate`` (the preflight's, in status.estimate's form) sizes the pods' grace period; without
    it, the LoRAJob's status.estimate is used when there is one."""
    spec = lorajob.spec
    if estimate is None and lorajob.status is not None:
        estimate = lorajob.status.estimate
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
    grace = grace_period_seconds(estimate, spec.training.max_steps)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # SIGTERM (deletion, preemption, a drained node) lets the trainer finish its step and upload a checkpoint.
        "terminationGracePeriodSeconds": grace,
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
                "args": list(TRAINER_ARGS),
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
    command = container_command(lorajob, grace_period_seconds=grace)
    if command is not None:
        pod_spec["containers"][0]["command"], pod_spec["containers"][0]["args"] = command, []
    nodes = spec.resources.nodes
    job_spec: dict[str, Any] = {
        # A multi-node attempt that fails ends all of its pods (a dead peer breaks the others' collectives and
        # torchrun restarts nothing in place), so it may count up to `nodes` failed pods.
        "backoffLimit": spec.retries * nodes,
        "completions": nodes,
        "parallelism": nodes,
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
    if nodes > 1:
        # Pods <job>-<index> with the index in JOB_COMPLETION_INDEX; under the headless Service's subdomain pod 0
        # is <job>-0.<service>, the rendezvous endpoint.
        job_spec["completionMode"] = "Indexed"
        pod_spec["subdomain"] = service_name(lorajob)
    job_metadata_labels = dict(job_labels)
    if spec.queue_name:
        # Created suspended, so nothing starts before Kueue admits it (Kueue's own webhook would suspend it,
        # but the operator does not depend on that webhook: docs/gpu-cluster.md).
        job_spec["suspend"] = True
        job_metadata_labels[QUEUE_LABEL] = spec.queue_name
    if config.job_ttl_seconds_after_finished is not None:
        # A finished Job and its pods go after this; the LoRAJob keeps its final status (memory and etcd stay flat).
        job_spec["ttlSecondsAfterFinished"] = config.job_ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(lorajob),
            "namespace": meta.namespace,
            "labels": job_metadata_labels,
            "ownerReferences": owner_references(lorajob),
        },
        "spec": job_spec,
    }
