"""A managed vLLM server: the Deployment, its agent token and its NetworkPolicy, built from the spec.

Pure functions: the controller applies what they return.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kubelora.api.v1alpha1 import GROUP, VERSION, AdapterDeployment
from kubelora.operator.config import OperatorConfig
from kubelora.serving import vllm

if TYPE_CHECKING:
    from kubelora.operator.server_pods import Settings

#: The adapter agent's port in server pods (``kubelora.serving.agent.AGENT_PORT``); env KUBELORA_AGENT_PORT.
AGENT_PORT = 8001


AGENT_CONTAINER = "kubelora-agent"


AGENT_PORT_ANNOTATION = "kubelora.dev/agent-port"


#: ``kubelora.serving.agent.TOKEN_ENV``: where the agent reads its bearer token; the Secret key the operator writes.
AGENT_TOKEN_ENV = "KUBELORA_AGENT_TOKEN"  # noqa: S105 - a variable name


AGENT_TOKEN_KEY = "token"  # noqa: S105 - a Secret key


#: Where the agent reads the preload ConfigMap (key PRELOAD_KEY) in managed server pods.
PRELOAD_DIR = "/etc/kubelora/preload"
PRELOAD_KEY = "adapters.json"


#: Label on the pods of a managed server Deployment (value: the AdapterDeployment's name).
MANAGED_LABEL = "kubelora.dev/adapterdeployment"
SPEC_HASH_ANNOTATION = "kubelora.dev/spec-hash"


#: A container securityContext that meets the restricted Pod Security Standard.
RESTRICTED: dict[str, Any] = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def managed_name(ad_name: str) -> str:
    name = f"{ad_name}-vllm"
    if len(name) <= 63:
        return name
    return f"{ad_name[:50].rstrip('-')}-{hashlib.sha256(ad_name.encode()).hexdigest()[:8]}"


def managed_deployment(
    ad: AdapterDeployment,
    settings: Settings,
    uid: str | None,
    secret_name: str | None = None,
    default_s3_endpoint: str | None = None,
    s3_secure: bool = False,
    image_pull_secrets: Sequence[str] = (),
    vllm_image: str = vllm.VLLM_IMAGE,
    adapter_cache_size: str = "10Gi",
    shm_size: str = "8Gi",
    run_as_user: int = 65532,
) -> dict[str, Any]:
    """The vLLM Deployment the operator runs for ``spec.target.managed``: vLLM plus the agent sidecar.

    The agent reads adapters with the Secret ``secret_name`` (spec.adapter.secretRef, or the LoRAJob's
    spec.output.secretRef); a Secret without an ``endpoint`` key falls back to the operator's defaultS3Endpoint.
    The image is spec.target.managed.image, else the operator's ``vllm_image``; the operator passes only args,
    so the image's own entrypoint starts the server. Both containers meet the restricted Pod Security profile
    (non-root ``run_as_user``, no privilege escalation, all capabilities dropped, seccomp RuntimeDefault); the
    agent reads its token from the Secret :func:`agent_token_secret` names (or spec.target.agentTokenSecretRef).
    """
    target = ad.spec.target
    managed = target.managed
    assert managed is not None
    name = ad.metadata.name
    labels = {
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/managed-by": "kubelora",
        "app.kubernetes.io/instance": name,
        MANAGED_LABEL: name,
    }
    base = managed.base_model
    env: list[dict[str, Any]] = [
        {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"},
        # vLLM resolves servedName from the agent's links on its first request (preload; docs/serving.md).
        {"name": "VLLM_PLUGINS", "value": "lora_filesystem_resolver"},
        {"name": "VLLM_LORA_RESOLVER_CACHE_DIR", "value": "/adapters"},
        # The pod runs as a non-root user the image may not know: caches go to a writable emptyDir.
        {"name": "HOME", "value": "/home/vllm"},
        {"name": "HF_HOME", "value": "/home/vllm/.cache/huggingface"},
    ]
    volumes: list[dict[str, Any]] = [
        # Bounded: the agent keeps each verified digest here; the kubelet evicts a pod that outgrows it.
        {"name": "adapters", "emptyDir": {"sizeLimit": adapter_cache_size}},
        # vLLM's workers share tensors through /dev/shm; the container runtime's default is 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
        {"name": "home", "emptyDir": {}},
        # What the pods serve after the last completed rollout; optional: pods start before the operator writes it.
        {"name": "preload", "configMap": {"name": preload_configmap_name(name), "optional": True}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "adapters", "mountPath": "/adapters", "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "home", "mountPath": "/home/vllm"},
    ]
    args: list[str] = []
    if base.uri.startswith("hf://"):
        args += ["--model", base.uri.removeprefix("hf://").strip("/")]
        if base.revision:
            args += ["--revision", base.revision]
    elif base.uri.startswith("pvc://"):
        claim, _, path = base.uri.removeprefix("pvc://").partition("/")
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": f"/mnt/pvc/{claim}", "readOnly": True})
        args += ["--model", f"/mnt/pvc/{claim}/{path}".rstrip("/")]
    elif base.uri.startswith("file://"):
        args += ["--model", base.uri.removeprefix("file://")]
    else:  # s3:// through vLLM's Run:ai model streamer
        args += ["--model", base.uri, "--load-format", "runai_streamer"]
    if base.trust_remote_code:
        args.append("--trust-remote-code")
    args += [
        "--served-model-name",
        target.base_model,
        "--port",
        str(target.port),
        "--enable-lora",
        "--max-loras",
        str(target.max_loras),
        "--max-lora-rank",
        str(target.max_lora_rank),
        "--max-cpu-loras",
        str(max(target.max_loras, 2 * target.max_loras)),
    ]
    if managed.gpus > 1:
        # One server across the pod's GPUs: without it vLLM uses one of them and leaves the rest idle.
        args += ["--tensor-parallel-size", str(managed.gpus)]
    args += managed.args
    if target.api_key_secret_ref is not None:
        # vLLM reads --api-key from VLLM_API_KEY; /health stays open for the probes.
        ref = target.api_key_secret_ref
        env.append({"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})

    def secret_env(secret: str, names: Mapping[str, str]) -> list[dict[str, Any]]:
        return [
            {
                "name": env_name,
                "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": key == "endpoint"}},
            }
            for env_name, key in names.items()
        ]

    s3_env: list[dict[str, Any]] = []
    if default_s3_endpoint:
        s3_env.append({"name": "KUBELORA_DEFAULT_S3_ENDPOINT", "value": default_s3_endpoint})
    s3_env.append({"name": "S3_SECURE", "value": "true" if s3_secure else "false"})
    secret = secret_name or (base.secret_ref.name if base.secret_ref else None)
    if secret:
        s3_env += secret_env(
            secret, {"AWS_ACCESS_KEY_ID": "accessKey", "AWS_SECRET_ACCESS_KEY": "secretKey", "S3_ENDPOINT": "endpoint"}
        )
    if base.uri.startswith("s3://") and base.secret_ref is not None:
        env += secret_env(
            base.secret_ref.name,
            {"AWS_ACCESS_KEY_ID": "accessKey", "AWS_SECRET_ACCESS_KEY": "secretKey", "AWS_ENDPOINT_URL": "endpoint"},
        )
    resources: dict[str, Any] = {}
    if managed.gpus:
        resources = {"limits": {"nvidia.com/gpu": str(managed.gpus)}, "requests": {"nvidia.com/gpu": str(managed.gpus)}}
    probe = {"httpGet": {"path": "/health", "port": target.port}, "periodSeconds": 10, "timeoutSeconds": 5}
    vllm = {
        "name": "vllm",
        "image": managed.image or vllm_image,
        "args": args,
        "env": env,
        "ports": [{"name": "http", "containerPort": target.port}],
        "resources": resources,
        "volumeMounts": mounts,
        "startupProbe": {**probe, "failureThreshold": 180},
        "readinessProbe": {**probe, "failureThreshold": 3},
        "livenessProbe": {**probe, "failureThreshold": 6},
    }
    model = args[args.index("--model") + 1]
    agent = {
        "name": AGENT_CONTAINER,
        "image": settings.agent_image,
        "args": [
            *("--host", "0.0.0.0", "--port", str(settings.agent_port), "--dir", "/adapters"),  # noqa: S104
            *("--preload", f"{PRELOAD_DIR}/{PRELOAD_KEY}", "--base-model", model),
        ],
        "env": s3_env,
        "ports": [{"name": "agent", "containerPort": settings.agent_port}],
        "volumeMounts": [
            {"name": "adapters", "mountPath": "/adapters"},
            {"name": "preload", "mountPath": PRELOAD_DIR, "readOnly": True},
        ],
        # Not Ready (no traffic) until the adapters of the preload ConfigMap are in place.
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": settings.agent_port},
            "periodSeconds": 2,
            "failureThreshold": 1,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": settings.agent_port},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {**RESTRICTED, "readOnlyRootFilesystem": True},
    }
    token_name, token_key, _ = agent_token_ref(ad)
    agent["env"] = [
        {"name": AGENT_TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": token_name, "key": token_key}}},
        *s3_env,
    ]
    vllm["securityContext"] = dict(RESTRICTED)
    pod_spec: dict[str, Any] = {
        "containers": [vllm, agent],
        "volumes": volumes,
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": run_as_user,
            "runAsGroup": run_as_user,
            "fsGroup": run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # Neither container calls the API server.
        "automountServiceAccountToken": False,
    }
    if image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in image_pull_secrets]
    if managed.gpu_type:
        pod_spec["nodeSelector"] = {"nvidia.com/gpu.product": managed.gpu_type}
    spec = {
        "replicas": managed.replicas,
        "selector": {"matchLabels": {MANAGED_LABEL: name}},
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    spec_hash = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    metadata: dict[str, Any] = {
        "name": managed_name(name),
        "labels": labels,
        "annotations": {SPEC_HASH_ANNOTATION: spec_hash},
    }
    if uid:
        metadata["ownerReferences"] = [owner_reference(ad, uid)]
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": spec}


def preload_configmap_name(ad_name: str) -> str:
    """The ConfigMap with what a managed server's pods preload: ``<managed-name>-adapters``."""
    return f"{managed_name(ad_name)}-adapters"


def preload_configmap(ad: AdapterDeployment, uid: str | None, serving: Mapping[str, Any] | None) -> dict[str, Any]:
    """The preload ConfigMap: ``{servedName: {"uri", "digest"}}`` (``serving``: a Want-like object, or None to
    serve nothing), owned by the AdapterDeployment. The agent downloads and links what it lists at pod start."""
    name = ad.metadata.name
    entries: dict[str, Any] = {}
    if serving is not None:
        entries[ad.spec.served_name] = {"uri": serving["uri"], "digest": serving["digest"]}
    metadata: dict[str, Any] = {
        "name": preload_configmap_name(name),
        "labels": {MANAGED_LABEL: name, "app.kubernetes.io/managed-by": "kubelora"},
    }
    if uid:
        metadata["ownerReferences"] = [owner_reference(ad, uid)]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {PRELOAD_KEY: json.dumps(entries, sort_keys=True)},
    }


def owner_reference(ad: AdapterDeployment, uid: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AdapterDeployment",
        "name": ad.metadata.name,
        "uid": uid or ad.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def managed_network_policy(ad: AdapterDeployment, settings: Settings, config: OperatorConfig) -> dict[str, Any] | None:
    """Ingress to a managed server's pods: the agent port only from the operator's pods, vLLM's port from anyone.

    vLLM's runtime LoRA endpoints share the serving port with completions, so a policy cannot tell them apart:
    spec.target.apiKeySecretRef guards those. None when the operator does not know where its own pods run.
    """
    if not config.operator_pod_labels or not config.operator_namespace:
        return None
    name = ad.metadata.name
    operator_pods = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": config.operator_namespace}},
        "podSelector": {"matchLabels": dict(sorted(config.operator_pod_labels.items()))},
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": managed_name(name),
            "labels": {MANAGED_LABEL: name, "app.kubernetes.io/managed-by": "kubelora"},
            "ownerReferences": [owner_reference(ad)],
        },
        "spec": {
            "podSelector": {"matchLabels": {MANAGED_LABEL: name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [operator_pods], "ports": [{"protocol": "TCP", "port": settings.agent_port}]},
                {"ports": [{"protocol": "TCP", "port": ad.spec.target.port}]},
            ],
        },
    }


def agent_token_secret(ad_name: str) -> str:
    """The Secret the operator generates with a managed server's agent token."""
    return f"{managed_name(ad_name)}-agent-token"


def agent_token_ref(ad: AdapterDeployment) -> tuple[str, str, str]:
    """(Secret, key, what names it) for the agent token of ``ad``'s pods."""
    ref = ad.spec.target.agent_token_secret_ref
    if ref is not None:
        return ref.name, ref.key, "spec.target.agentTokenSecretRef"
    return agent_token_secret(ad.metadata.name), AGENT_TOKEN_KEY, "the managed server's generated Secret"
