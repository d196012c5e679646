"""The AdapterDeployment controller: gate an adapter, deliver it to vLLM pods, roll it out, keep it loaded.

Plain asyncio code with no kopf in it; ``adapter_handlers.py`` holds the thin kopf handlers. One pass
(:func:`reconcile`) reads the object fresh, resolves the adapter (from a LoRAJob or a URI pinned by
digest), checks the gates, lists the target pods, and moves the rollout on as far as it can, writing
status at each phase change. Passes of one object never overlap (a lock per object), so change
handlers, the resync timer and LoRAJob triggers can all call it.

Phases: Pending (waiting for the adapter) · Refused (a gate said no) · Canary (the new adapter on
``canaryReplicas`` pods, then a smoke check) · Promoting (on every pod) · Loading (AllAtOnce) · Ready ·
RolledBack (the rollout failed; the previous adapter serves everywhere) · Failed (the rollout failed
and autoRollback is off; pods are left as they are).

What each pod serves is read from vLLM's ``/v1/models``: the card named ``servedName`` has the adapter
path as ``root``, and the agent names each adapter directory after its digest, so the digest a pod
serves is known without keeping state. Every pass makes each Ready pod serve what it should (drift
repair): a restarted pod or a new one gets its adapter back. Failures are retried with a backoff per pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import ValidationError

from kubelora.api.v1alpha1 import (
    GROUP,
    VERSION,
    AdapterDeployment,
    ReplicaState,
    dump,
    short_digest,
)
from kubelora.operator.conditions import get_condition, set_condition
from kubelora.operator.config import OperatorConfig
from kubelora.operator.lorajobs import Event
from kubelora.serving import vllm

log = logging.getLogger("kubelora.adapterdeployment")

#: The adapter agent's port in server pods (``kubelora.serving.agent.AGENT_PORT``); env KUBELORA_AGENT_PORT.
AGENT_PORT = 8001
AGENT_CONTAINER = "kubelora-agent"
AGENT_PORT_ANNOTATION = "kubelora.dev/agent-port"
#: Label on the pods of a managed server Deployment (value: the AdapterDeployment's name).
MANAGED_LABEL = "kubelora.dev/adapterdeployment"
SPEC_HASH_ANNOTATION = "kubelora.dev/spec-hash"
MANIFEST = "kubelora-manifest.json"
MAX_REPLICA_ENTRIES = 50
ROLLOUT_PHASES = frozenset({"Loading", "Canary", "Promoting"})
PLURAL = "adapterdeployments"
DIGEST_HEX = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_MAX_NEW_TOKENS = 64


# ----------------------------------------------------------------------------------------------------------
# Settings and the runtime the handlers keep in memo


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclasses.dataclass
class Settings:
    resync_seconds: float = 3.0
    concurrency: int = 16
    agent_port: int = AGENT_PORT
    agent_image: str = "ghcr.io/kubelora/agent:0.1.0"
    rollout_max_attempts: int = 3
    rollout_timeout_seconds: float = 600.0
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    probe_timeout_seconds: float = 5.0
    fetch_timeout_seconds: float = 600.0
    load_timeout_seconds: float = 120.0
    generate_timeout_seconds: float = 60.0
    allowed_pod_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_env(cls, agent_image: str | None = None) -> Settings:
        """Settings from KUBELORA_* variables; ``agent_image`` is the operator config's agentImage."""
        networks = tuple(
            ipaddress.ip_network(part.strip(), strict=False)
            for part in os.environ.get("KUBELORA_POD_CIDRS", "").split(",")
            if part.strip()
        )
        return cls(
            resync_seconds=_env_float("KUBELORA_ADAPTER_RESYNC_SECONDS", 3.0),
            concurrency=max(1, int(_env_float("KUBELORA_ADAPTER_CONCURRENCY", 16))),
            agent_port=int(_env_float("KUBELORA_AGENT_PORT", AGENT_PORT)),
            agent_image=os.environ.get("KUBELORA_AGENT_IMAGE") or agent_image or cls.agent_image,
            rollout_max_attempts=max(1, int(_env_float("KUBELORA_ROLLOUT_MAX_ATTEMPTS", 3))),
            rollout_timeout_seconds=_env_float("KUBELORA_ROLLOUT_TIMEOUT_SECONDS", 600.0),
            backoff_max_seconds=_env_float("KUBELORA_ADAPTER_BACKOFF_MAX_SECONDS", 60.0),
            allowed_pod_networks=networks,
        )

    def backoff(self, attempts: int) -> float:
        return float(min(self.backoff_max_seconds, self.backoff_base_seconds * 2 ** max(0, attempts - 1)))


@dataclasses.dataclass
class PodTrack:
    """Retry bookkeeping for one pod of one AdapterDeployment."""

    digest: str | None
    attempts: int = 0
    next_try: float = 0.0
    message: str = ""


class Runtime:
    """What the service layer needs, built once at operator startup (see adapter_handlers)."""

    def __init__(self, kube: Any, http: Any, config: OperatorConfig, settings: Settings | None = None) -> None:
        self.kube = kube
        self.settings = settings or Settings.from_env(config.agent_image)
        self.pods = PodClient(http, self.settings)
        self.config = config
        self.reader = AdapterReader()
        self.semaphore = asyncio.Semaphore(self.settings.concurrency)
        self.locks: dict[str, asyncio.Lock] = {}
        self.tracks: dict[str, dict[str, PodTrack]] = {}
        self.adapters: dict[tuple[str, str | None, str, str, str | None], ResolvedAdapter] = {}
        self.to_thread: Callable[..., Awaitable[Any]] = asyncio.to_thread

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self.locks.setdefault(f"{namespace}/{name}", asyncio.Lock())

    def forget(self, namespace: str, name: str, uid: str | None) -> None:
        self.locks.pop(f"{namespace}/{name}", None)
        if uid:
            self.tracks.pop(uid, None)


# ----------------------------------------------------------------------------------------------------------
# Kubernetes reads and writes (synchronous; called through asyncio.to_thread)


class KubeApi:
    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    @staticmethod
    def _missing(exc: Exception) -> bool:
        return getattr(exc, "status", None) == 404

    def get_adapterdeployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: Any = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            return dict(obj)
        except Exception as exc:
            if self._missing(exc):
                return None
            raise

    def get_lorajob(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: Any = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "lorajobs", name)
            return dict(obj)
        except Exception as exc:
            if self._missing(exc):
                return None
            raise

    def get_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        import base64

        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except Exception as exc:
            if self._missing(exc):
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            deployment = self.apps.read_namespaced_deployment(name, namespace)
        except Exception as exc:
            if self._missing(exc):
                return None
            raise
        return dict(self.api_client.sanitize_for_serialization(deployment))

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        result: Any = self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        return list(json.loads(result.data)["items"])

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": status}
            )
        except Exception as exc:
            if not self._missing(exc):
                raise

    def apply_deployment(self, namespace: str, body: dict[str, Any]) -> str:
        """Create the Deployment, or patch it when its spec hash changed. Returns created|updated|unchanged."""
        name = body["metadata"]["name"]
        existing = self.get_deployment(namespace, name)
        if existing is None:
            self.apps.create_namespaced_deployment(namespace, body)  # type: ignore[arg-type]
            return "created"
        wanted = body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        if (existing["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION) == wanted:
            return "unchanged"
        self.apps.patch_namespaced_deployment(name, namespace, body)
        return "updated"


# ----------------------------------------------------------------------------------------------------------
# Adapter files: the manifest, adapter_config.json and eval samples (synchronous; through to_thread)


@dataclasses.dataclass(frozen=True)
class S3Credentials:
    endpoint: str
    access_key: str
    secret_key: str
    secure: bool = False


class AdapterStorageError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _join(uri: str, path: str) -> str:
    return uri.rstrip("/") + "/" + path.lstrip("/")


class AdapterReader:
    def __init__(self) -> None:
        self._clients: dict[S3Credentials, Any] = {}
        import minio  # noqa: F401 - imported at startup, not on the first rollout

    def read(self, uri: str, credentials: S3Credentials | None) -> bytes:
        if uri.startswith("file://"):
            try:
                with open(uri.removeprefix("file://"), "rb") as f:
                    return f.read()
            except FileNotFoundError as exc:
                raise AdapterStorageError("NotFound", f"{uri} does not exist") from exc
        if not uri.startswith("s3://"):
            raise AdapterStorageError("UnsupportedURI", f"{uri}: the operator reads only s3:// and file:// adapters")
        if credentials is None or not credentials.endpoint:
            raise AdapterStorageError(
                "StorageUnavailable", f"{uri}: no S3 endpoint (secretRef endpoint or defaultS3Endpoint)"
            )
        from minio.error import S3Error

        from kubelora.storage import make_client, parse_s3

        client = self._clients.get(credentials)
        if client is None:
            client = make_client(
                credentials.endpoint, credentials.access_key, credentials.secret_key, credentials.secure
            )
            self._clients[credentials] = client
        location = parse_s3(uri)
        try:
            response = client.get_object(location.bucket, location.key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                raise AdapterStorageError("NotFound", f"{uri} does not exist") from exc
            if exc.code == "AccessDenied":
                who = "these credentials" if credentials.access_key else "an anonymous read (no Secret named)"
                raise AdapterStorageError("AccessDenied", f"{uri}: access denied to {who}") from exc
            raise AdapterStorageError("StorageUnavailable", f"{uri}: {exc.code}: {exc.message}") from exc
        except Exception as exc:
            raise AdapterStorageError("StorageUnavailable", f"{uri}: {exc}") from exc
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()


@dataclasses.dataclass
class ResolvedAdapter:
    digest: str
    uri: str
    rank: int
    base_model: str
    source: str  # "LoRAJob x" or the URI
    samples: list[dict[str, Any]]
    max_new_tokens: int | None  # None: unknown (compare by prefix)
    samples_problem: str | None = None


@dataclasses.dataclass
class Resolution:
    state: Literal["ok", "pending", "refused"]
    reason: str = ""
    message: str = ""
    adapter: ResolvedAdapter | None = None
    secret_name: str | None = None  # the S3 Secret the adapter is read with (for managed servers' agents)


def identity(name: str | None) -> str:
    """A base model identity for comparison: hf:// and trailing slashes dropped, case folded."""
    value = (name or "").strip()
    value = value.removeprefix("hf://")
    return value.rstrip("/").casefold()


def adapter_rank(config: Mapping[str, Any]) -> int:
    """The largest rank in an adapter_config.json (as vLLM computes it)."""
    ranks = [int(config.get("r") or 0)]
    pattern = config.get("rank_pattern") or {}
    if isinstance(pattern, Mapping):
        ranks += [int(v) for v in pattern.values()]
    return max(ranks)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def describe_failed_gates(eval_status: Mapping[str, Any]) -> str:
    failed = [g for g in eval_status.get("gates") or [] if not g.get("passed")]
    parts = []
    for gate in failed:
        text = (
            f"{gate.get('metric')} {gate.get('rule')} {_fmt(gate.get('threshold'))}: adapter {_fmt(gate.get('value'))}"
        )
        if gate.get("baseValue") is not None:
            text += f", base {_fmt(gate.get('baseValue'))}"
        parts.append(text)
    return "; ".join(parts) if parts else "the evaluation did not pass"


async def _credentials(
    runtime: Runtime, namespace: str, secret_name: str | None
) -> tuple[S3Credentials | None, Resolution | None]:
    secret: dict[str, str] = {}
    if secret_name:
        found = await runtime.to_thread(runtime.kube.get_secret, namespace, secret_name)
        if found is None:
            return None, Resolution("pending", "SecretNotFound", f"Secret {namespace}/{secret_name} does not exist")
        secret = found
    endpoint = secret.get("endpoint") or runtime.config.default_s3_endpoint or os.environ.get("S3_ENDPOINT", "")
    access_key, secret_key = secret.get("accessKey", ""), secret.get("secretKey", "")
    if not secret_name and namespace in runtime.config.operator_credentials_namespaces:
        # An explicit opt-in per namespace: the operator's own keys read for a tenant that names no Secret.
        access_key = os.environ.get("AWS_ACCESS_KEY_ID", "")
        secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    # Otherwise no Secret means an anonymous read: a tenant never reads with the operator's keys.
    credentials = S3Credentials(
        endpoint=endpoint,
        access_key=access_key,
        secret_key=secret_key,
        secure=runtime.config.s3_secure or endpoint.startswith("https://"),
    )
    return credentials, None


def _parse_samples(data: bytes) -> list[dict[str, Any]]:
    samples = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict):
                samples.append(row)
    return samples


async def _load_files(
    runtime: Runtime,
    uri: str,
    digest: str,
    credentials: S3Credentials | None,
    samples_uri: str | None,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], str | None]:
    """(manifest, adapter_config, samples, samples problem); raises AdapterStorageError, or ValueError on a bad digest."""
    manifest_bytes = await runtime.to_thread(runtime.reader.read, _join(uri, MANIFEST), credentials)
    if "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() != digest:
        # What the manifest's digest is stays unsaid: it would let a tenant probe digests it cannot read.
        raise ValueError(f"{_join(uri, MANIFEST)} does not have the digest {digest}")
    try:
        manifest = json.loads(manifest_bytes)
        files = {str(f["path"]): f for f in manifest.get("files", [])}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AdapterStorageError("InvalidManifest", f"{_join(uri, MANIFEST)}: cannot parse: {exc}") from exc
    entry = files.get("adapter_config.json")
    if entry is None:
        raise AdapterStorageError("InvalidManifest", f"{_join(uri, MANIFEST)} lists no adapter_config.json")
    config_bytes = await runtime.to_thread(runtime.reader.read, _join(uri, "adapter_config.json"), credentials)
    if hashlib.sha256(config_bytes).hexdigest() != entry.get("sha256"):
        raise ValueError(f"{_join(uri, 'adapter_config.json')} does not match the sha256 in the manifest")
    adapter_config = json.loads(config_bytes)
    samples: list[dict[str, Any]] = []
    problem = None
    sample_entry = files.get("eval/samples.jsonl")
    location = samples_uri or (_join(uri, "eval/samples.jsonl") if sample_entry else None)
    if location:
        try:
            data = await runtime.to_thread(runtime.reader.read, location, credentials)
            listed = location == _join(uri, "eval/samples.jsonl") and sample_entry is not None
            if listed and hashlib.sha256(data).hexdigest() != (sample_entry or {}).get("sha256"):
                raise AdapterStorageError("DigestMismatch", f"{location} does not match the sha256 in the manifest")
            samples = _parse_samples(data)
        except AdapterStorageError as exc:
            problem = exc.message
    else:
        problem = "the adapter has no eval samples"
    return manifest, adapter_config, samples, problem


async def resolve(runtime: Runtime, ad: AdapterDeployment) -> Resolution:
    """Which adapter spec.adapter means, and whether the gates let it be served."""
    secrets: list[str | None] = []
    resolution = await _resolve(runtime, ad, secrets)
    resolution.secret_name = secrets[-1] if secrets else None
    return resolution


async def _resolve(runtime: Runtime, ad: AdapterDeployment, secrets: list[str | None]) -> Resolution:
    spec = ad.spec
    namespace = ad.metadata.namespace or "default"
    require_eval = spec.gate_policy.require_eval_passed
    samples_uri: str | None = None
    max_new_tokens: int | None = None
    secret_name = spec.adapter.secret_ref.name if spec.adapter.secret_ref else None
    if spec.adapter.lora_job:
        job_name = spec.adapter.lora_job
        job = await runtime.to_thread(runtime.kube.get_lorajob, namespace, job_name)
        if job is None:
            return Resolution("pending", "LoRAJobNotFound", f"LoRAJob {job_name} does not exist in {namespace}")
        job_status = job.get("status") or {}
        job_spec = job.get("spec") or {}
        evaluation = job_status.get("eval")
        artifact = job_status.get("adapter")
        phase = job_status.get("phase") or "Pending"
        if require_eval and evaluation is not None and not evaluation.get("passed", False):
            return Resolution(
                "refused",
                "EvalFailed",
                f"LoRAJob {job_name} failed evaluation: {describe_failed_gates(evaluation)} "
                "(spec.gatePolicy.requireEvalPassed is true)",
            )
        if phase != "Succeeded":
            if phase == "Failed" and not (artifact and not require_eval):
                detail = job_status.get("message") or "no adapter was published"
                return Resolution("refused", "LoRAJobFailed", f"LoRAJob {job_name} failed: {detail}")
            if phase != "Failed":
                return Resolution(
                    "pending", "LoRAJobNotSucceeded", f"Waiting for LoRAJob {job_name} to succeed (phase {phase})"
                )
        if require_eval and evaluation is None:
            return Resolution(
                "refused",
                "EvalMissing",
                f"LoRAJob {job_name} has no evaluation (its spec.eval is unset); set "
                "spec.gatePolicy.requireEvalPassed to false to serve it unjudged",
            )
        if not artifact or not artifact.get("uri") or not artifact.get("digest"):
            return Resolution("pending", "NoAdapter", f"LoRAJob {job_name} has not published an adapter")
        uri, digest = str(artifact["uri"]), str(artifact["digest"])
        source = f"LoRAJob {job_name}"
        if secret_name is None:
            secret_name = ((job_spec.get("output") or {}).get("secretRef") or {}).get("name")
        secrets.append(secret_name)
        if evaluation is not None:
            samples_uri = evaluation.get("samplesUri")
        if job_spec.get("eval") is not None:
            max_new_tokens = int(job_spec["eval"].get("maxNewTokens") or DEFAULT_MAX_NEW_TOKENS)
        status_rank, status_base = artifact.get("rank"), artifact.get("baseModel")
    else:
        uri, digest = str(spec.adapter.uri), str(spec.adapter.digest)
        source = uri
        status_rank, status_base = None, None
        secrets.append(secret_name)

    # Keyed by who reads, too: one tenant's resolved adapter is never another tenant's cache hit.
    key = (namespace, secret_name, uri, digest, samples_uri)
    cached = runtime.adapters.get(key)
    if cached is None:
        credentials, problem = await _credentials(runtime, namespace, secret_name)
        if problem is not None:
            return problem
        try:
            manifest, adapter_config, samples, samples_problem = await _load_files(
                runtime, uri, digest, credentials, samples_uri
            )
        except ValueError as exc:
            return Resolution("refused", "DigestMismatch", str(exc))
        except AdapterStorageError as exc:
            if exc.reason == "NotFound":
                return Resolution("pending", "AdapterNotFound", f"{exc.message}; waiting for it to be published")
            return Resolution("pending", exc.reason, exc.message)
        base = (manifest.get("baseModel") or {}).get("name") or status_base or ""
        rank = adapter_rank(adapter_config) if adapter_config.get("r") else int(status_rank or 0)
        cached = ResolvedAdapter(
            digest=digest,
            uri=uri,
            rank=rank,
            base_model=str(base),
            source=source,
            samples=samples,
            max_new_tokens=max_new_tokens,
            samples_problem=samples_problem,
        )
        if len(runtime.adapters) > 256:
            runtime.adapters.clear()
        runtime.adapters[key] = cached
    adapter = dataclasses.replace(cached, source=source, max_new_tokens=max_new_tokens, uri=uri)
    target = spec.target
    if adapter.rank > target.max_lora_rank:
        return Resolution(
            "refused",
            "RankTooHigh",
            f"{source}: adapter rank {adapter.rank} exceeds spec.target.maxLoraRank {target.max_lora_rank} "
            "(vLLM --max-lora-rank)",
            adapter,
        )
    if identity(adapter.base_model) != identity(target.base_model):
        return Resolution(
            "refused",
            "BaseModelMismatch",
            f"{source}: the adapter was trained on base model {adapter.base_model or '<unknown>'!r}, "
            f"but spec.target.baseModel is {target.base_model!r}",
            adapter,
        )
    return Resolution("ok", "GatesPassed", _admitted_message(adapter, ad), adapter)


def _admitted_message(adapter: ResolvedAdapter, ad: AdapterDeployment) -> str:
    evaluation = (
        "eval passed" if ad.spec.adapter.lora_job and ad.spec.gate_policy.require_eval_passed else "eval not required"
    )
    return (
        f"{adapter.source} {short_digest(adapter.digest)}: {evaluation}, rank {adapter.rank} <= "
        f"{ad.spec.target.max_lora_rank}, base model {adapter.base_model}"
    )


# ----------------------------------------------------------------------------------------------------------
# Pods and what they serve


@dataclasses.dataclass(frozen=True)
class Pod:
    name: str
    uid: str
    ip: str
    port: int
    agent_port: int
    blocked: str | None = None  # why the operator will not contact it
    api_key: str | None = dataclasses.field(default=None, repr=False)  # vLLM's --api-key (spec.target)

    @property
    def server(self) -> str:
        return f"http://{_host(self.ip)}:{self.port}"

    @property
    def agent(self) -> str:
        return f"http://{_host(self.ip)}:{self.agent_port}"


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def label_selector(selector: Mapping[str, Any]) -> str:
    """A Deployment's spec.selector (matchLabels and matchExpressions) as a label selector string."""
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In":
            parts.append(f"{key} in ({','.join(values)})")
        elif operator == "NotIn":
            parts.append(f"{key} notin ({','.join(values)})")
        elif operator == "Exists":
            parts.append(key)
        elif operator == "DoesNotExist":
            parts.append(f"!{key}")
    return ",".join(parts)


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp") or status.get("phase") != "Running" or not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


async def target_pods(runtime: Runtime, ad: AdapterDeployment) -> tuple[list[Pod], str | None]:
    """The Ready pods of the target, sorted by name, and a problem finding them (if any)."""
    target = ad.spec.target
    namespace = ad.metadata.namespace or "default"
    if target.deployment_name:
        deployment = await runtime.to_thread(runtime.kube.get_deployment, namespace, target.deployment_name)
        if deployment is None:
            return [], f"Deployment {namespace}/{target.deployment_name} does not exist"
        selector = label_selector(deployment["spec"].get("selector") or {})
        if not selector:
            return [], f"Deployment {target.deployment_name} has an empty selector"
    elif target.selector:
        selector = ",".join(f"{k}={v}" for k, v in sorted(target.selector.items()))
    else:
        selector = f"{MANAGED_LABEL}={ad.metadata.name}"
    api_key = None
    if target.api_key_secret_ref is not None:
        ref = target.api_key_secret_ref
        secret = await runtime.to_thread(runtime.kube.get_secret, namespace, ref.name)
        if secret is None or not secret.get(ref.key):
            what = f"Secret {namespace}/{ref.name}" + (
                " does not exist" if secret is None else f" has no key {ref.key}"
            )
            return [], f"{what} (spec.target.apiKeySecretRef)"
        api_key = secret[ref.key]
    raw = await runtime.to_thread(runtime.kube.list_pods, namespace, selector)
    pods = []
    for item in raw:
        if not _pod_ready(item):
            continue
        ip = item["status"]["podIP"]
        annotations = item["metadata"].get("annotations") or {}
        try:
            agent_port = int(annotations.get(AGENT_PORT_ANNOTATION) or runtime.settings.agent_port)
        except ValueError:
            agent_port = runtime.settings.agent_port
        blocked = None
        networks = runtime.settings.allowed_pod_networks
        if networks and not any(ipaddress.ip_address(ip) in net for net in networks):
            blocked = f"pod IP {ip} is outside KUBELORA_POD_CIDRS"
        pods.append(
            Pod(item["metadata"]["name"], item["metadata"]["uid"], ip, target.port, agent_port, blocked, api_key)
        )
    pods.sort(key=lambda p: p.name)
    if not pods:
        return [], f"No Ready pods match {selector}"
    return pods, None


class PodError(Exception):
    def __init__(
        self,
        kind: Literal["unreachable", "agent", "load", "unload", "generate"],
        message: str,
        refusal: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        # vLLM refused the adapter itself (DoRA, a rank above --max-lora-rank, ...): retrying cannot help
        self.refusal = refusal


def _error_text(body: str) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        data = json.loads(body)
        error = data.get("error", data)
        if isinstance(error, Mapping):
            message = error.get("message") or error.get("detail")
            if message:
                return str(message)
        if isinstance(error, str):
            return error
    return body.strip()[:300] or "empty response"


class PodClient:
    """HTTP to vLLM (podIP:target.port) and the agent (podIP:agentPort) with one aiohttp session."""

    def __init__(self, http: Any, settings: Settings) -> None:
        self.http = http
        self.settings = settings

    async def _request(
        self, kind: Any, method: str, url: str, timeout: float, body: Any = None, pod: Pod | None = None
    ) -> tuple[int, str]:
        """One HTTP call; ``pod`` given: a call to its vLLM, with its API key as a bearer token."""
        import aiohttp

        headers = {"Authorization": f"Bearer {pod.api_key}"} if pod is not None and pod.api_key else None
        try:
            async with self.http.request(
                method, url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=5)
            ) as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            what = "agent" if kind == "agent" else "vLLM"
            raise PodError(
                "unreachable" if kind != "agent" else "agent",
                f"{what} at {url.split('/v1')[0]} not reachable: {type(exc).__name__} {exc}".strip(),
            ) from exc

    async def models(self, pod: Pod) -> dict[str, str]:
        """Served model id -> root (the adapter path for adapters)."""
        status, text = await self._request(
            "unreachable", "GET", f"{pod.server}/v1/models", self.settings.probe_timeout_seconds, pod=pod
        )
        if status == 401:
            why = "it does not accept the key in" if pod.api_key else "it wants an API key: set"
            raise PodError(
                "unreachable", f"vLLM /v1/models answered 401 Unauthorized: {why} spec.target.apiKeySecretRef"
            )
        if status != 200:
            raise PodError("unreachable", f"vLLM /v1/models answered {status}: {_error_text(text)}")
        try:
            cards = json.loads(text)["data"]
            return {str(c["id"]): str(c.get("root") or "") for c in cards}
        except (ValueError, KeyError, TypeError) as exc:
            raise PodError("unreachable", f"vLLM /v1/models answered something else: {text[:200]}") from exc

    async def fetch(self, pod: Pod, uri: str, digest: str) -> str:
        status, text = await self._request(
            "agent",
            "POST",
            f"{pod.agent}/v1/adapters",
            self.settings.fetch_timeout_seconds,
            {"uri": uri, "digest": digest},
        )
        if status != 200:
            raise PodError("agent", f"agent could not fetch the adapter ({status}): {_error_text(text)}")
        return str(json.loads(text)["path"])

    async def forget(self, pod: Pod, digest: str) -> None:
        hex_digest = digest.split(":", 1)[-1]
        with contextlib.suppress(PodError):
            await self._request(
                "agent", "DELETE", f"{pod.agent}/v1/adapters/{hex_digest}", self.settings.probe_timeout_seconds
            )

    async def load(self, pod: Pod, name: str, path: str, replace: bool) -> None:
        body = {"lora_name": name, "lora_path": path, "load_inplace": replace}
        url = f"{pod.server}/v1/load_lora_adapter"
        status, text = await self._request("load", "POST", url, self.settings.load_timeout_seconds, body, pod)
        if status == 400 and replace and "already been loaded" in text:
            # a vLLM without load_inplace: swap by unload + load
            await self.unload(pod, name)
            body["load_inplace"] = False
            status, text = await self._request("load", "POST", url, self.settings.load_timeout_seconds, body, pod)
        if status != 200:
            message = _error_text(text)
            refusal = None if status == 401 else vllm.load_refusal(status, message)
            if refusal:
                raise PodError("load", f"vLLM refused the adapter ({status}): {refusal}", refusal=refusal)
            raise PodError("load", f"vLLM could not load the adapter ({status}): {message}")

    async def unload(self, pod: Pod, name: str) -> bool:
        status, text = await self._request(
            "unload",
            "POST",
            f"{pod.server}/v1/unload_lora_adapter",
            self.settings.load_timeout_seconds,
            {"lora_name": name},
            pod,
        )
        if status == 404:
            return False
        if status != 200:
            raise PodError("unload", f"vLLM could not unload the adapter ({status}): {_error_text(text)}")
        return True

    async def generate(self, pod: Pod, model: str, sample: Mapping[str, Any], max_tokens: int) -> str:
        messages = sample.get("messages")
        if isinstance(messages, list) and messages:
            if messages[-1].get("role") == "assistant":
                messages = messages[:-1]
            url, body = f"{pod.server}/v1/chat/completions", dict[str, Any](model=model, messages=messages)
        else:
            url, body = f"{pod.server}/v1/completions", {"model": model, "prompt": str(sample.get("prompt") or "")}
        body.update(max_tokens=max_tokens, temperature=0)
        status, text = await self._request("generate", "POST", url, self.settings.generate_timeout_seconds, body, pod)
        if status != 200:
            raise PodError("generate", f"{url.rsplit('/v1/', 1)[-1]} answered {status}: {_error_text(text)}")
        choice = json.loads(text)["choices"][0]
        if "message" in choice:
            return str((choice["message"] or {}).get("content") or "")
        return str(choice.get("text") or "")


def digest_of_root(root: str | None) -> str | None:
    """The digest an adapter path names (the agent's layout ``<dir>/<hex>``), or None."""
    if not root:
        return None
    name = PurePosixPath(root.rstrip("/")).name
    return f"sha256:{name}" if DIGEST_HEX.match(name) else None


@dataclasses.dataclass(frozen=True)
class Want:
    digest: str
    uri: str


KEEP = "keep"  # observe only
WantValue = Want | None | str  # Want: serve it; None: serve nothing under servedName; KEEP


@dataclasses.dataclass
class PodResult:
    pod: Pod
    state: Literal["Pending", "Loading", "Loaded", "Failed", "Unloaded"]
    digest: str | None
    message: str | None = None
    attempts: int = 0
    fatal: bool = False  # a load error (not an unreachable pod): counts toward failing a rollout
    refusal: str | None = None  # vLLM refused the adapter itself: fails a rollout at once

    def replica(self) -> ReplicaState:
        return ReplicaState(
            pod=self.pod.name,
            digest=self.digest,
            state=self.state,
            message=(self.message or None) and self.message[:512],
            attempts=self.attempts,
        )


async def converge_pod(
    runtime: Runtime, tracks: dict[str, PodTrack], pod: Pod, served_name: str, want: WantValue
) -> PodResult:
    """Observe one pod and make it serve ``want`` under ``served_name``."""
    settings = runtime.settings
    target = want.digest if isinstance(want, Want) else None
    track = tracks.get(pod.uid)
    if track is None or track.digest != target:
        track = tracks[pod.uid] = PodTrack(target)

    def failed(error: PodError, current: str | None) -> PodResult:
        fatal = error.kind not in ("unreachable",)
        track.attempts += 1
        track.next_try = time.monotonic() + settings.backoff(track.attempts)
        track.message = error.message
        log.warning(
            "Adapter operation failed pod=%s servedName=%s digest=%s attempt=%d error=%s",
            pod.name,
            served_name,
            target,
            track.attempts,
            error.message,
        )
        return PodResult(pod, "Failed", target or current, error.message, track.attempts, fatal, error.refusal)

    if pod.blocked:
        return PodResult(pod, "Failed", target, pod.blocked, 0, False)
    async with runtime.semaphore:
        try:
            served = await runtime.pods.models(pod)
        except PodError as exc:
            # Not a load attempt: no backoff, so a pod that comes back is served at the next pass.
            if track.message != exc.message:
                log.warning("Server not reachable pod=%s ip=%s error=%s", pod.name, pod.ip, exc.message)
                track.message = exc.message
            return PodResult(pod, "Failed", target, exc.message, track.attempts, False)
        present = served_name in served
        current = digest_of_root(served.get(served_name)) if present else None
        if want == KEEP:
            return PodResult(pod, "Loaded" if present else "Unloaded", current)
        if want is None:
            if not present:
                tracks.pop(pod.uid, None)
                return PodResult(pod, "Unloaded", None)
            try:
                await runtime.pods.unload(pod, served_name)
            except PodError as exc:
                return failed(exc, current)
            log.info("Unloaded adapter pod=%s servedName=%s digest=%s", pod.name, served_name, current)
            tracks.pop(pod.uid, None)
            return PodResult(pod, "Unloaded", None)
        assert isinstance(want, Want)
        if current == want.digest:
            if track.attempts:
                tracks[pod.uid] = PodTrack(target)
            return PodResult(pod, "Loaded", current)
        if time.monotonic() < track.next_try:
            return PodResult(pod, "Failed", want.digest, track.message, track.attempts, True)
        started = time.monotonic()
        try:
            path = await runtime.pods.fetch(pod, want.uri, want.digest)
            await runtime.pods.load(pod, served_name, path, replace=present)
        except PodError as exc:
            return failed(exc, current)
        log.info(
            "Loaded adapter pod=%s ip=%s servedName=%s digest=%s replaced=%s seconds=%.2f",
            pod.name,
            pod.ip,
            served_name,
            want.digest,
            current,
            time.monotonic() - started,
        )
        tracks[pod.uid] = PodTrack(target)
        return PodResult(pod, "Loaded", want.digest)


async def converge(
    runtime: Runtime, uid: str, served_name: str, pods: Sequence[Pod], wants: Mapping[str, WantValue]
) -> dict[str, PodResult]:
    tracks = runtime.tracks.setdefault(uid, {})
    for stale in set(tracks) - {p.uid for p in pods}:
        tracks.pop(stale, None)
    results = await asyncio.gather(*(converge_pod(runtime, tracks, p, served_name, wants[p.name]) for p in pods))
    return {r.pod.name: r for r in results}


# ----------------------------------------------------------------------------------------------------------
# Smoke check


@dataclasses.dataclass
class SmokeResult:
    passed: bool
    matched: int
    total: int
    message: str
    skipped: bool = False


def _same_answer(got: str, expected: str, exact: bool) -> bool:
    got, expected = got.strip(), expected.strip()
    return got == expected if exact else got.startswith(expected)


async def smoke_check(
    runtime: Runtime, ad: AdapterDeployment, adapter: ResolvedAdapter, pods: Sequence[Pod]
) -> SmokeResult:
    rollout = ad.spec.rollout
    wanted = rollout.smoke_prompts
    samples = [s for s in adapter.samples if isinstance(s.get("adapter"), str)][:wanted]
    if wanted == 0:
        return SmokeResult(True, 0, 0, "Smoke check skipped: spec.rollout.smokePrompts is 0", skipped=True)
    if not samples:
        why = adapter.samples_problem or "the adapter's eval samples hold no adapter predictions"
        return SmokeResult(True, 0, 0, f"Smoke check skipped: {why}", skipped=True)
    exact = adapter.max_new_tokens is not None
    max_tokens = adapter.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    name = ad.spec.served_name

    async def ask(pod: Pod, sample: Mapping[str, Any]) -> tuple[Pod, Mapping[str, Any], str | None, str | None]:
        async with runtime.semaphore:
            try:
                return pod, sample, await runtime.pods.generate(pod, name, sample, max_tokens), None
            except (PodError, ValueError, KeyError, IndexError) as exc:
                return pod, sample, None, str(exc)

    answers = await asyncio.gather(*(ask(p, s) for p in pods for s in samples))
    matched = 0
    first_miss = None
    for pod, sample, got, error in answers:
        if got is not None and _same_answer(got, str(sample["adapter"]), exact):
            matched += 1
        elif first_miss is None:
            prompt = str(sample.get("prompt") or sample.get("messages") or "")[-80:]
            detail = f"error {error}" if error or got is None else f"got {got.strip()[:80]!r}"
            first_miss = (
                f"pod {pod.name}, prompt ...{prompt!r}: expected {str(sample['adapter']).strip()[:80]!r}, {detail}"
            )
    total = len(answers)
    rate = matched / total
    passed = rate >= rollout.smoke_min_match
    comparison = "exact match" if exact else "prefix match (eval maxNewTokens unknown)"
    message = (
        f"Smoke check on {', '.join(p.name for p in pods)}: {matched}/{total} answers matched the eval predictions "
        f"({comparison}; rate {rate:.2f}, smokeMinMatch {rollout.smoke_min_match:.2f})"
    )
    if not passed and first_miss:
        message += f"; first mismatch: {first_miss}"
    return SmokeResult(passed, matched, total, message)


# ----------------------------------------------------------------------------------------------------------
# Managed vLLM servers


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
) -> dict[str, Any]:
    """The vLLM Deployment the operator runs for ``spec.target.managed``: vLLM plus the agent sidecar.

    The agent reads adapters with the Secret ``secret_name`` (spec.adapter.secretRef, or the LoRAJob's
    spec.output.secretRef); a Secret without an ``endpoint`` key falls back to the operator's defaultS3Endpoint.
    The image is spec.target.managed.image, else the operator's ``vllm_image``; the operator passes only args,
    so the image's own entrypoint starts the server.
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
    env: list[dict[str, Any]] = [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"}]
    volumes: list[dict[str, Any]] = [{"name": "adapters", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "adapters", "mountPath": "/adapters", "readOnly": True}]
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
        *managed.args,
    ]
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
    agent = {
        "name": AGENT_CONTAINER,
        "image": settings.agent_image,
        "args": ["--host", "0.0.0.0", "--port", str(settings.agent_port), "--dir", "/adapters"],  # noqa: S104
        "env": s3_env,
        "ports": [{"name": "agent", "containerPort": settings.agent_port}],
        "volumeMounts": [{"name": "adapters", "mountPath": "/adapters"}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": settings.agent_port}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
    }
    pod_spec: dict[str, Any] = {
        "containers": [vllm, agent],
        "volumes": volumes,
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
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
        metadata["ownerReferences"] = [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "AdapterDeployment",
                "name": name,
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": spec}


# ----------------------------------------------------------------------------------------------------------
# The rollout state machine


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def parse(obj: Mapping[str, Any]) -> AdapterDeployment:
    return AdapterDeployment.model_validate({"metadata": dict(obj["metadata"]), "spec": dict(obj.get("spec") or {})})


def _replicas(results: Iterable[PodResult]) -> list[dict[str, Any]]:
    ordered = sorted(results, key=lambda r: (r.state != "Failed", r.pod.name))
    return [dump(r.replica()) for r in ordered[:MAX_REPLICA_ENTRIES]]


def choose_canary(pods: Sequence[Pod], results_before: Mapping[str, str | None], digest: str, count: int) -> list[Pod]:
    """``count`` pods, preferring those that already serve ``digest`` (so a rescheduled canary stays put)."""
    ordered = sorted(pods, key=lambda p: (results_before.get(p.name) != digest, p.name))
    return ordered[: max(1, min(count, len(pods)))]


@dataclasses.dataclass
class Step:
    status: dict[str, Any]
    events: list[Event]
    again: bool = False
    observed: Observed | None = None


@dataclasses.dataclass
class Observed:
    """What a step read (the adapter and the pods); the next step of the same pass reuses it."""

    resolution: Resolution
    pods: list[Pod]
    target_problem: str | None


class Pass:
    """One reconcile step over an AdapterDeployment with status ``old``."""

    def __init__(
        self, runtime: Runtime, ad: AdapterDeployment, old: Mapping[str, Any], observed: Observed | None = None
    ) -> None:
        self.runtime = runtime
        self.ad = ad
        self.generation = ad.metadata.generation
        self.status: dict[str, Any] = {k: copy.deepcopy(v) for k, v in old.items() if k != "kopf"}
        self.status.setdefault("phase", "Pending")
        self.events: list[Event] = []
        self.observed = observed

    # -- small helpers --------------------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        return str(self.status.get("phase") or "Pending")

    @property
    def active(self) -> Want | None:
        digest, uri = self.status.get("activeDigest"), self.status.get("activeUri")
        return Want(digest, uri) if digest and uri else None

    @property
    def previous(self) -> Want | None:
        digest, uri = self.status.get("previousDigest"), self.status.get("previousUri")
        return Want(digest, uri) if digest and uri else None

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        conditions = list(self.status.get("conditions") or [])
        before = get_condition(conditions, type_)
        unchanged = (
            before is not None
            and before.get("status") == ("True" if status else "False")
            and before.get("reason") == reason
            and before.get("message") == message[:1024]
            and before.get("observedGeneration") == self.generation
        )
        if unchanged:
            return
        self.status["conditions"] = set_condition(conditions, type_, status, reason, message, self.generation)

    def event(self, kind: str, reason: str, message: str) -> None:
        self.events.append(Event(kind, reason, message[:1024]))

    def set_digests(self, active: Want | None, previous: Want | None) -> None:
        self.status["activeDigest"] = active.digest if active else None
        self.status["activeUri"] = active.uri if active else None
        self.status["previousDigest"] = previous.digest if previous else None
        self.status["previousUri"] = previous.uri if previous else None

    def restart_progress_clock(self) -> None:
        conditions = [c for c in self.status.get("conditions") or [] if c.get("type") != "Progressing"]
        self.status["conditions"] = conditions

    # -- the step -------------------------------------------------------------------------------------------

    async def run(self) -> Step:
        ad, runtime = self.ad, self.runtime
        spec = ad.spec
        self.status["observedGeneration"] = self.generation
        if self.observed is None:
            resolution = await resolve(runtime, ad)
            managed_problem = await self.ensure_managed(resolution.secret_name) if spec.target.managed else None
            pods, target_problem = await target_pods(runtime, ad)
            self.observed = Observed(resolution, pods, managed_problem or target_problem)
        resolution, pods, target_problem = self.observed.resolution, self.observed.pods, self.observed.target_problem
        rolling = self.phase in ROLLOUT_PHASES

        if resolution.state == "refused":
            self.condition("Admitted", False, resolution.reason, resolution.message)
            if rolling:
                self.abandon_rollout(f"spec.adapter now names an adapter that is refused ({resolution.reason})")
            if self.phase != "Refused" or self.reason_changed("Ready", resolution.reason):
                self.event("Warning", resolution.reason, resolution.message)
            self.status["phase"] = "Refused"
            serving = f"; still serving {short_digest(self.active.digest)}" if self.active else ""
            self.status["message"] = resolution.message + serving
            self.condition("Ready", False, resolution.reason, resolution.message + serving)
        elif resolution.state == "pending":
            if rolling:
                # a transient problem (storage, API): keep the rollout where it is and try again later
                self.status["message"] = f"Rollout paused: {resolution.message}"
                return Step(self.status, self.events)
            if self.reason_changed("Admitted", resolution.reason):
                kind = "Warning" if resolution.reason.endswith(("NotFound", "Unavailable")) else "Normal"
                self.event(kind, resolution.reason, resolution.message)
            self.condition("Admitted", False, resolution.reason, resolution.message)
            serving = f"; still serving {short_digest(self.active.digest)}" if self.active else ""
            self.status["phase"] = "Pending"
            self.status["message"] = resolution.message + serving
            self.condition("Ready", False, resolution.reason, resolution.message + serving)
        else:
            adapter = resolution.adapter
            assert adapter is not None
            self.condition("Admitted", True, "GatesPassed", resolution.message)
            if rolling and self.active and self.active.digest != adapter.digest:
                self.abandon_rollout(f"spec.adapter changed to {short_digest(adapter.digest)}")
                rolling = False
            if not rolling and self.should_roll_out(adapter):
                self.start_rollout(adapter, len(pods))
                return Step(self.status, self.events, again=True, observed=self.observed)
            if self.phase in ("Pending", "Refused") and self.active and self.active.digest == adapter.digest:
                self.status["phase"] = "Ready"  # the gate passes again for what is already served
        return await self.drive(pods, target_problem, resolution.adapter if resolution.state == "ok" else None)

    def reason_of(self, type_: str) -> str | None:
        condition = get_condition(list(self.status.get("conditions") or []), type_)
        return condition.get("reason") if condition else None

    def reason_changed(self, type_: str, reason: str) -> bool:
        condition = get_condition(list(self.status.get("conditions") or []), type_)
        return condition is None or condition.get("reason") != reason

    def should_roll_out(self, adapter: ResolvedAdapter) -> bool:
        active = self.active
        if active is not None and active.digest == adapter.digest:
            return False
        if self._decided_here():
            # A rollout failed for this very spec: do not try the same adapter again until the spec changes.
            if self.phase == "RolledBack" and self.status.get("previousDigest") == adapter.digest:
                return False
            if self.phase == "Failed":
                return False
        return True

    def _decided_here(self) -> bool:
        """The last rollout decision (RolledBack/Failed) was made for the current spec generation."""
        progressing = get_condition(list(self.status.get("conditions") or []), "Progressing")
        return progressing is not None and progressing.get("observedGeneration") == self.generation

    def start_rollout(self, adapter: ResolvedAdapter, pod_count: int) -> None:
        rollout = self.ad.spec.rollout
        old = self.active
        new = Want(adapter.digest, adapter.uri)
        self.set_digests(new, old)
        self.restart_progress_clock()
        canary = rollout.strategy == "Canary"
        self.status["phase"] = "Canary" if canary else "Loading"
        how = (
            f"Canary on {min(rollout.canary_replicas, max(pod_count, 1))} of {pod_count} pods"
            if canary
            else f"AllAtOnce on {pod_count} pods"
        )
        replacing = f", replacing {short_digest(old.digest)}" if old else ""
        message = f"Rolling out {adapter.source} {short_digest(adapter.digest)} ({how}){replacing}"
        self.status["message"] = message
        self.condition("Progressing", True, "RolloutStarted", message)
        self.condition("Ready", False, "RolloutInProgress", message)
        self.event("Normal", "RolloutStarted", message)
        log.info(
            "Rollout started adapterdeployment=%s/%s digest=%s previous=%s strategy=%s",
            self.ad.metadata.namespace,
            self.ad.metadata.name,
            adapter.digest,
            old.digest if old else None,
            rollout.strategy,
        )

    def abandon_rollout(self, why: str) -> None:
        """Stop an unfinished rollout: the previous adapter is what counts as active again."""
        unfinished = self.active
        previous = self.previous
        self.set_digests(previous, unfinished)
        self.status["phase"] = "Ready" if previous else "Pending"
        message = f"Rollout of {short_digest(unfinished.digest) if unfinished else 'nothing'} stopped: {why}"
        self.condition("Progressing", False, "RolloutSuperseded", message)
        self.event("Normal", "RolloutSuperseded", message)

    async def ensure_managed(self, secret_name: str | None) -> str | None:
        runtime = self.runtime
        body = managed_deployment(
            self.ad,
            runtime.settings,
            self.ad.metadata.uid,
            secret_name=secret_name,
            default_s3_endpoint=runtime.config.default_s3_endpoint,
            s3_secure=runtime.config.s3_secure,
            image_pull_secrets=runtime.config.image_pull_secrets,
            vllm_image=runtime.config.vllm_image,
        )
        namespace = self.ad.metadata.namespace or "default"
        try:
            outcome = await self.runtime.to_thread(self.runtime.kube.apply_deployment, namespace, body)
        except Exception as exc:
            return f"Cannot create the managed vLLM Deployment {body['metadata']['name']}: {exc}"
        if outcome != "unchanged":
            self.event(
                "Normal", f"ManagedServer{outcome.capitalize()}", f"Deployment {body['metadata']['name']} {outcome}"
            )
        return None

    def wants(self, pods: Sequence[Pod], before: Mapping[str, str | None]) -> tuple[dict[str, WantValue], list[Pod]]:
        phase, active, previous = self.phase, self.active, self.previous
        canary: list[Pod] = []
        if phase == "Canary" and active is not None:
            canary = choose_canary(pods, before, active.digest, self.ad.spec.rollout.canary_replicas)
            names = {p.name for p in canary}
            return {p.name: (active if p.name in names else previous) for p in pods}, canary
        if phase == "Failed":
            return dict.fromkeys((p.name for p in pods), KEEP), canary
        if active is None:
            value: WantValue = None if phase == "RolledBack" else KEEP
            return dict.fromkeys((p.name for p in pods), value), canary
        return dict.fromkeys((p.name for p in pods), active), canary

    async def drive(self, pods: list[Pod], target_problem: str | None, adapter: ResolvedAdapter | None) -> Step:
        runtime, ad = self.runtime, self.ad
        uid = ad.metadata.uid or ad.metadata.name
        served_name = ad.spec.served_name
        if self.active is None and self.phase in ("Pending", "Refused"):
            self.status.update(desiredReplicas=len(pods), loadedReplicas=0, replicas=[])
            return Step(self.status, self.events)
        # What pods served on the last pass decides the canary set; read it from status.
        before = {r["pod"]: r.get("digest") for r in self.status.get("replicas") or [] if r.get("state") == "Loaded"}
        wants, canary = self.wants(pods, before)
        results = await converge(runtime, uid, served_name, pods, wants)
        active = self.active
        loaded = sum(1 for r in results.values() if r.state == "Loaded" and active and r.digest == active.digest)
        self.status.update(desiredReplicas=len(pods), loadedReplicas=loaded, replicas=_replicas(results.values()))
        phase = self.phase
        failures = [r for r in results.values() if r.state == "Failed"]
        if phase in ROLLOUT_PHASES:
            return await self.drive_rollout(pods, target_problem, adapter, results, canary, loaded)
        if phase in ("Ready", "RolledBack", "Pending", "Refused") and active is not None:
            summary = f"{short_digest(active.digest)} loaded on {loaded}/{len(pods)} pods as {served_name}"
            if phase == "Ready":
                if pods and loaded == len(pods):
                    self.condition("Ready", True, "AdapterLoaded", summary)
                    self.status["message"] = summary
                else:
                    detail = target_problem or (f"{failures[0].pod.name}: {failures[0].message}" if failures else "")
                    self.condition("Ready", False, "ReplicasNotLoaded", summary + (f"; {detail}" if detail else ""))
                    self.status["message"] = summary + (f"; {detail}" if detail else "")
        return Step(self.status, self.events)

    async def drive_rollout(
        self,
        pods: list[Pod],
        target_problem: str | None,
        adapter: ResolvedAdapter | None,
        results: Mapping[str, PodResult],
        canary: list[Pod],
        loaded: int,
    ) -> Step:
        ad = self.ad
        active = self.active
        assert active is not None
        settings = self.runtime.settings
        targets = canary if self.phase == "Canary" else pods
        if not pods:
            self.status["message"] = f"Rollout waiting: {target_problem or 'no Ready pods'}"
            self.condition("Ready", False, "NoReadyPods", self.status["message"])
            return await self.check_deadline()
        refused = [results[p.name] for p in targets if results[p.name].refusal]
        if refused:
            first = refused[0]
            return self.fail(
                "AdapterRejected",
                f"vLLM on pod {first.pod.name} refused {short_digest(active.digest)}: {first.refusal}",
            )
        broken = [
            results[p.name]
            for p in targets
            if results[p.name].fatal and results[p.name].attempts >= settings.rollout_max_attempts
        ]
        if broken:
            first = broken[0]
            return self.fail(
                "LoadFailed",
                f"Loading {short_digest(active.digest)} failed {first.attempts} times on pod {first.pod.name}: "
                f"{first.message}",
            )
        done = [p for p in targets if results[p.name].state == "Loaded" and results[p.name].digest == active.digest]
        if len(done) < len(targets):
            waiting = [results[p.name] for p in targets if p not in done]
            detail = "; ".join(f"{r.pod.name}: {r.message}" for r in waiting if r.message)[:300]
            self.status["message"] = (
                f"{self.phase}: {short_digest(active.digest)} loaded on {len(done)}/{len(targets)} target pods"
                + (f"; {detail}" if detail else "")
            )
            self.condition("Ready", False, "RolloutInProgress", self.status["message"])
            if self.phase == "Canary" and self.reason_of("Progressing") == "SmokeCheck":
                self.condition("Progressing", True, "CanaryLoading", self.status["message"])
            return await self.check_deadline()
        if self.phase == "Canary":
            if adapter is None:
                return Step(self.status, self.events)
            if self.reason_of("Progressing") != "SmokeCheck":
                # Write the loaded canary first (status shows it), then smoke-test it in the next step.
                message = (
                    f"Canary: {short_digest(active.digest)} loaded on {', '.join(p.name for p in canary)} "
                    f"({loaded}/{len(pods)} pods); running the smoke check"
                )
                self.status["message"] = message
                self.condition("Progressing", True, "SmokeCheck", message)
                self.condition("Ready", False, "RolloutInProgress", message)
                return Step(self.status, self.events, again=True, observed=self.observed)
            smoke = await smoke_check(self.runtime, ad, adapter, canary)
            if not smoke.passed:
                return self.fail("SmokeCheckFailed", smoke.message)
            self.event("Normal", "SmokeCheckSkipped" if smoke.skipped else "CanaryPassed", smoke.message)
            self.status["phase"] = "Promoting"
            message = f"Promoting {short_digest(active.digest)} to all {len(pods)} pods; {smoke.message}"
            self.status["message"] = message
            self.condition("Progressing", True, "Promoting", message)
            self.condition("Ready", False, "RolloutInProgress", message)
            return Step(self.status, self.events, again=True, observed=self.observed)
        summary = f"{short_digest(active.digest)} loaded on {loaded}/{len(pods)} pods as {ad.spec.served_name}"
        self.status["phase"] = "Ready"
        self.status["message"] = summary
        self.condition("Progressing", False, "RolloutComplete", f"Rollout of {short_digest(active.digest)} complete")
        self.condition("Ready", True, "AdapterLoaded", summary)
        self.event("Normal", "RolloutComplete", f"Rollout complete: {summary}")
        log.info(
            "Rollout complete adapterdeployment=%s/%s digest=%s pods=%d",
            ad.metadata.namespace,
            ad.metadata.name,
            active.digest,
            len(pods),
        )
        return Step(self.status, self.events)

    async def check_deadline(self) -> Step:
        progressing = get_condition(list(self.status.get("conditions") or []), "Progressing")
        started = _parse_time(progressing.get("lastTransitionTime") if progressing else None)
        limit = self.runtime.settings.rollout_timeout_seconds
        if started is not None and (_now() - started).total_seconds() > limit:
            return self.fail(
                "RolloutTimedOut", f"The rollout did not finish within {limit:.0f}s: {self.status.get('message')}"
            )
        return Step(self.status, self.events)

    def fail(self, reason: str, message: str) -> Step:
        ad = self.ad
        failed, previous = self.active, self.previous
        assert failed is not None
        if ad.spec.rollout.auto_rollback:
            self.set_digests(previous, failed)
            self.status["phase"] = "RolledBack"
            restored = (
                f"rolled back to {short_digest(previous.digest)}" if previous else "unloaded it (no previous adapter)"
            )
            text = f"Rollout of {short_digest(failed.digest)} failed ({reason}): {message}; {restored}"
            # Progressing says what happened, Ready says why: the failure's own reason.
            self.condition("Progressing", False, "RolledBack", text)
            self.condition("Ready", False, reason, text)
            self.status["message"] = text
            self.event("Warning", reason, text)
            log.warning(
                "Rollout rolled back adapterdeployment=%s/%s failed=%s restored=%s reason=%s",
                ad.metadata.namespace,
                ad.metadata.name,
                failed.digest,
                previous.digest if previous else None,
                reason,
            )
            return Step(self.status, self.events, again=True, observed=self.observed)
        text = f"Rollout of {short_digest(failed.digest)} failed ({reason}): {message}; autoRollback is off"
        self.status["phase"] = "Failed"
        self.condition("Progressing", False, reason, text)
        self.condition("Ready", False, reason, text)
        self.status["message"] = text
        self.event("Warning", reason, text)
        return Step(self.status, self.events)


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch turning status ``old`` into ``new`` (None removes a field); kopf's own field is left alone."""
    patch = {k: v for k, v in new.items() if old.get(k) != v and k != "kopf"}
    for key in old:
        if key not in new and key != "kopf":
            patch[key] = None
    return patch


def _normalise(status: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in status.items() if v is not None and k != "kopf"}
    # derived on serialisation by the API model; never compared
    out.pop("activeShortDigest", None)
    out.pop("loaded", None)
    return out


def _wire_status(status: Mapping[str, Any]) -> dict[str, Any]:
    out = _normalise(status)
    if out.get("activeDigest"):
        out["activeShortDigest"] = short_digest(out["activeDigest"])
    out["loaded"] = f"{out.get('loadedReplicas', 0)}/{out.get('desiredReplicas', 0)}"
    return out


async def reconcile(
    runtime: Runtime, namespace: str, name: str, post: Callable[[Mapping[str, Any], Event], None] | None = None
) -> list[Event]:
    """One level-based pass over the AdapterDeployment ``namespace/name``. Returns the events it posted."""
    all_events: list[Event] = []
    async with runtime.lock(namespace, name):
        obj = await runtime.to_thread(runtime.kube.get_adapterdeployment, namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return all_events
        status = {k: v for k, v in (obj.get("status") or {}).items() if k != "kopf"}
        try:
            ad = parse(obj)
        except ValidationError as exc:
            message = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())[:1024]
            new = dict(status)
            new["phase"] = "Failed"
            new["message"] = message
            new["conditions"] = set_condition(
                list(status.get("conditions") or []),
                "Ready",
                False,
                "InvalidSpec",
                message,
                obj["metadata"].get("generation"),
            )
            if _normalise(new) != _normalise(status):
                await runtime.to_thread(
                    runtime.kube.patch_status, namespace, name, status_patch(status, _wire_status(new))
                )
                event = Event("Warning", "InvalidSpec", message)
                if post:
                    post(obj, event)
                all_events.append(event)
            return all_events
        observed: Observed | None = None
        for _ in range(8):
            step = await Pass(runtime, ad, status, observed).run()
            observed = step.observed
            new = {k: v for k, v in step.status.items() if v is not None}
            if _normalise(new) != _normalise(status):
                await runtime.to_thread(
                    runtime.kube.patch_status, namespace, name, status_patch(status, _wire_status(new))
                )
                if new.get("phase") != status.get("phase"):
                    log.info(
                        "Phase changed adapterdeployment=%s/%s phase=%s message=%s",
                        namespace,
                        name,
                        new.get("phase"),
                        new.get("message"),
                    )
            for event in step.events:
                if post:
                    post(obj, event)
            all_events += step.events
            status = _wire_status(new)
            if not step.again:
                break
    return all_events


async def cleanup(runtime: Runtime, obj: Mapping[str, Any], attempts: int = 3) -> tuple[list[Event], list[str]]:
    """Unload the AdapterDeployment's adapter from every target pod. Returns events and pods still failing."""
    namespace = obj["metadata"].get("namespace") or "default"
    name = obj["metadata"]["name"]
    events: list[Event] = []
    try:
        ad = parse(obj)
    except ValidationError:
        return events, []
    status = obj.get("status") or {}
    digests = {d for d in (status.get("activeDigest"), status.get("previousDigest")) if d}
    remaining: list[str] = []
    async with runtime.lock(namespace, name):
        pods, _ = await target_pods(runtime, ad)
        uid = ad.metadata.uid or name
        for attempt in range(attempts):
            runtime.tracks.pop(uid, None)
            results = await converge(
                runtime, uid, ad.spec.served_name, pods, dict.fromkeys((p.name for p in pods), None)
            )
            remaining = [r.pod.name for r in results.values() if r.state != "Unloaded"]
            if not remaining:
                break
            await asyncio.sleep(runtime.settings.backoff(attempt + 1))
        unloaded = [p for p in pods if p.name not in remaining]
        await asyncio.gather(*(_forget_unused(runtime, p, digests) for p in unloaded if not p.blocked))
    runtime.forget(namespace, name, ad.metadata.uid)
    if remaining:
        events.append(
            Event("Warning", "UnloadFailed", f"Could not unload {ad.spec.served_name} from {', '.join(remaining)}")
        )
    else:
        events.append(Event("Normal", "Unloaded", f"Unloaded {ad.spec.served_name} from {len(pods)} pods"))
    return events, remaining


async def _forget_unused(runtime: Runtime, pod: Pod, digests: set[str]) -> None:
    """Delete adapter files from the pod's agent when no served model uses them any more."""
    if not digests:
        return
    with contextlib.suppress(PodError):
        served = await runtime.pods.models(pod)
        in_use = {digest_of_root(root) for root in served.values()}
        for digest in digests - in_use:
            await runtime.pods.forget(pod, digest)
