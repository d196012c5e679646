"""Checks before any Job exists, so that no GPU is asked for a run that cannot work.

Each check owns one condition type and nothing else writes it: ``SecretsFound`` (the referenced Secrets),
``InputsFound`` (the base model's ``config.json`` and the dataset files), ``GPUTypeAvailable`` and
``MemoryFits`` (the estimate from ``config.json`` against the GPU's memory). ``Preflight`` is the verdict
over all of them. A failed check either blocks (the job stays ``Pending`` and is checked again: a Secret or
a file may appear) or is fatal (the job fails: the model does not fit the GPU).

Only ``s3://`` locations are read, each with the credentials of its own role's Secret in the LoRAJob's
namespace, never with the operator's: what the tenant cannot read, the operator does not read for it, and
messages name only the tenant's own URIs and the storage's answer. ``file://`` and ``pvc://`` paths are for
pods and ``hf://`` needs the hub, so the trainer checks those when it runs.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal, Protocol

from kubelora import storage
from kubelora.api.v1alpha1 import LoRAJob, SecretRef
from kubelora.operator.config import OperatorConfig
from kubelora.operator.estimates import estimate_spec
from kubelora.operator.executors import http_pool, s3_client
from kubelora.operator.jobspec import GPU_PRODUCT_LABEL

logger = logging.getLogger("kubelora.lorajob")

Status = Literal["True", "False", "Unknown"]
#: ok and info never stop a run; a warning is shown (condition and event); blocking keeps the job Pending;
#: fatal fails it.
Severity = Literal["ok", "info", "warning", "blocking", "fatal"]

#: The trainer reads S3 per role, each with its own Secret (kubelora.trainer.storage).
ROLES = ("BASE_MODEL", "DATASET", "OUTPUT")
NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"})
CONFIG_JSON_LIMIT = 1 << 20

# GPU memory in MiB by product, for types no node shows yet (an autoscaler may add them).
KNOWN_GPU_MEMORY_MIB = {
    "NVIDIA-A100-SXM4-80GB": 81920,
    "NVIDIA-A100-SXM4-40GB": 40960,
    "NVIDIA-H100-80GB-HBM3": 81559,
    "NVIDIA-L4": 23034,
    "NVIDIA-A10G": 23028,
    "Tesla-T4": 15360,
}


@dataclasses.dataclass
class Check:
    """The outcome of one check: the condition it owns, and how much it matters."""

    type: str
    status: Status
    reason: str
    message: str
    severity: Severity = "ok"


@dataclasses.dataclass
class Preflight:
    """Outcome of the checks the API server cannot make."""

    checks: list[Check] = dataclasses.field(default_factory=list)
    #: S3 settings per role (env form, as kubelora.storage.client_from_env takes them); kept in memory only.
    credentials: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    estimate: dict[str, Any] | None = None

    def _with(self, *severities: str) -> list[tuple[str, str]]:
        return [(c.reason, c.message) for c in self.checks if c.severity in severities]

    @property
    def blocking(self) -> list[tuple[str, str]]:
        return self._with("blocking")

    @property
    def fatal(self) -> list[tuple[str, str]]:
        return self._with("fatal")

    @property
    def warnings(self) -> list[tuple[str, str]]:
        return self._with("warning")


def read_secret(core: Any, namespace: str, name: str) -> dict[str, str] | None:
    """A Secret's data, decoded, through a ``CoreV1Api``; None when it does not exist."""
    from kubernetes.client.exceptions import ApiException

    try:
        secret = core.read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


class _Flight:
    """One Secret GET in progress: the callers that arrive while it runs wait for its answer, or its error."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: dict[str, str] | None = None
        self.error: BaseException | None = None


class Cluster:
    """The reads preflight needs from the API server; a fake stands in for it in unit tests.

    A Secret read is shared for `shared_read_seconds`: a tenant's hundred LoRAJobs that name one Secret, applied
    together, cost one GET, not a hundred (the operator may not list or watch Secrets, so no cache is fed by a
    watch). Concurrent reads of one Secret share the GET in flight, its error included: under a failing API server,
    a hundred waiting LoRAJobs cost one failed GET, not a hundred in a row. An error is never kept past its flight.
    An edited or new Secret is seen within that time, well inside the interval at which a LoRAJob blocked on a
    Secret is checked again.
    """

    def __init__(self, api_client: Any, shared_read_seconds: float = 2.0) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.shared_read_seconds = shared_read_seconds
        self._secrets: dict[tuple[str, str], tuple[float, dict[str, str] | None]] = {}
        self._flights: dict[tuple[str, str], _Flight] = {}
        self._lock = threading.Lock()

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        if self.shared_read_seconds <= 0:
            return read_secret(self.core, namespace, name)
        key = (namespace, name)
        with self._lock:
            hit = self._secrets.get(key)
            if hit is not None and hit[0] > time.monotonic():
                return dict(hit[1]) if hit[1] is not None else None
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return dict(flight.data) if flight.data is not None else None
        try:
            data = read_secret(self.core, namespace, name)
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.data = data
            with self._lock:
                now = time.monotonic()
                if len(self._secrets) > 1000:
                    for k in [k for k, (until, _) in self._secrets.items() if until <= now]:
                        del self._secrets[k]
                self._secrets[key] = (now + self.shared_read_seconds, data)
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()
        return dict(data) if data is not None else None

    def gpu_nodes(self, product: str) -> list[dict[str, str]]:
        """Labels of the nodes that carry this GPU product."""
        nodes = self.core.list_node(label_selector=f"{GPU_PRODUCT_LABEL}={product}").items
        return [dict((n.metadata.labels if n.metadata else None) or {}) for n in nodes]


# --------------------------------------------------------------------------------------------------------------------
# Credentials


def role_refs(lorajob: LoRAJob) -> dict[str, SecretRef | None]:
    spec = lorajob.spec
    return {
        "BASE_MODEL": spec.base_model.secret_ref,
        "DATASET": spec.dataset.secret_ref,
        "OUTPUT": spec.output.secret_ref,
    }


def credentials_for(secret: dict[str, str], config: OperatorConfig) -> dict[str, str]:
    """S3 settings from one Secret's data; no Secret means no keys (anonymous), never the operator's."""
    endpoint = secret.get("endpoint") or config.default_s3_endpoint or ""
    creds = {"AWS_ACCESS_KEY_ID": secret.get("accessKey", ""), "AWS_SECRET_ACCESS_KEY": secret.get("secretKey", "")}
    if endpoint:
        creds["S3_ENDPOINT"] = endpoint
    creds["S3_SECURE"] = "true" if config.s3_secure else "false"
    return creds


def role_credentials(lorajob: LoRAJob, role: str, cluster: Cluster, config: OperatorConfig) -> dict[str, str]:
    """S3 settings of one role, from that role's own Secret in the LoRAJob's namespace."""
    ref = role_refs(lorajob)[role]
    secret = cluster.read_secret(lorajob.metadata.namespace or "default", ref.name) if ref else None
    return credentials_for(secret or {}, config)


def role_env(credentials: dict[str, dict[str, str]]) -> dict[str, str]:
    """Per-role settings as the trainer reads them from its environment: BASE_MODEL_AWS_ACCESS_KEY_ID, ..."""
    return {f"{role}_{key}": value for role, creds in credentials.items() for key, value in creds.items()}


def _reader(namespace: str, ref: SecretRef | None) -> str:
    return f"with Secret {namespace}/{ref.name}" if ref else "without credentials (no secretRef)"


# --------------------------------------------------------------------------------------------------------------------
# Objects in S3


@dataclasses.dataclass(frozen=True)
class Probe:
    """What the storage said about one object, to the tenant's credentials."""

    found: bool
    body: bytes | None = None
    #: Set when the answer was neither "here it is" nor "no such object": the S3 error code (AccessDenied,
    #: SignatureDoesNotMatch, ...), or "Unavailable: ..." when the storage could not be reached.
    error: str | None = None

    @property
    def unavailable(self) -> bool:
        return bool(self.error and self.error.startswith("Unavailable"))


class ObjectStore(Protocol):
    def probe(
        self, identity: tuple[str, ...], credentials: dict[str, str], location: storage.S3Location, read: bool
    ) -> Probe:
        """Whether `location` exists (and its bytes when `read`), asked with `credentials`.

        `identity` (namespace, Secret name, credential fingerprint) keys any cache: an answer to one tenant
        is never an answer to another.
        """


def identity(namespace: str, ref: SecretRef | None, credentials: dict[str, str]) -> tuple[str, ...]:
    material = "\0".join(credentials.get(k, "") for k in ("S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    return (namespace, ref.name if ref else "", hashlib.sha256(material.encode()).hexdigest()[:16])


class S3Objects:
    """Probes objects in S3 with short timeouts, caching answers per tenant identity for a short while."""

    def __init__(
        self, found_ttl: float = 300.0, missing_ttl: float = 15.0, connect_timeout: float = 3.0, timeout: float = 15.0
    ) -> None:
        self.found_ttl, self.missing_ttl = found_ttl, missing_ttl
        self.http = http_pool(connect_timeout, timeout)
        self.cache: dict[tuple[Any, ...], tuple[float, Probe]] = {}
        self.lock = threading.Lock()

    def probe(
        self, identity: tuple[str, ...], credentials: dict[str, str], location: storage.S3Location, read: bool
    ) -> Probe:
        key = (*identity, location.bucket, location.key, read)
        now = time.monotonic()
        with self.lock:
            hit = self.cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        result = self._ask(credentials, location, read)
        ttl = self.found_ttl if result.found else self.missing_ttl
        now = time.monotonic()  # from the answer, not the question: a probe that timed out is cached too
        with self.lock:
            if len(self.cache) > 10000:
                self.cache = {k: v for k, v in self.cache.items() if v[0] > now}
            self.cache[key] = (now + ttl, result)
        return result

    def _ask(self, credentials: dict[str, str], location: storage.S3Location, read: bool) -> Probe:
        from minio.error import S3Error

        client = s3_client(credentials, self.http)
        try:
            if not read:
                client.stat_object(location.bucket, location.key)
                return Probe(True)
            response = client.get_object(location.bucket, location.key)
            try:
                return Probe(True, body=response.read(CONFIG_JSON_LIMIT))
            finally:
                response.close()
                response.release_conn()
        except S3Error as exc:
            if exc.code in NOT_FOUND:
                return Probe(False)
            return Probe(False, error=str(exc.code or "S3Error"))
        except Exception as exc:  # unreachable endpoint, TLS, DNS: say so, do not guess
            return Probe(False, error=f"Unavailable: {type(exc).__name__}: {str(exc)[:300]}")


# --------------------------------------------------------------------------------------------------------------------
# The checks


def check_secrets(lorajob: LoRAJob, cluster: Cluster) -> tuple[Check, dict[str, dict[str, str]]]:
    namespace = lorajob.metadata.namespace or "default"
    fields = {"BASE_MODEL": "spec.baseModel", "DATASET": "spec.dataset", "OUTPUT": "spec.output"}
    found: dict[str, dict[str, str]] = {}
    problems: list[tuple[str, str]] = []
    for role, ref in role_refs(lorajob).items():
        if ref is None or ref.name in found:
            continue
        data = cluster.read_secret(namespace, ref.name)
        if data is None:
            problems.append(
                ("SecretNotFound", f"{fields[role]}.secretRef: Secret {namespace}/{ref.name} does not exist")
            )
            continue
        missing = [k for k in ("accessKey", "secretKey") if k not in data]
        if missing:
            problems.append(
                ("SecretInvalid", f"{fields[role]}.secretRef: Secret {namespace}/{ref.name} has no key {missing[0]}")
            )
            continue
        found[ref.name] = data
    if problems:
        message = "; ".join(m for _, m in problems)
        return Check("SecretsFound", "False", problems[0][0], message, "blocking"), found
    names = sorted(found)
    message = f"Secrets {', '.join(names)} exist with accessKey and secretKey" if names else "No Secret is referenced"
    return Check("SecretsFound", "True", "SecretsFound", message), found


def _inputs(lorajob: LoRAJob) -> Iterator[tuple[str, str, str, str]]:
    """(field, uri, role, what) of every location the trainer reads: the base model and each data file."""
    spec = lorajob.spec
    yield "spec.baseModel.uri", spec.base_model.uri, "BASE_MODEL", "BaseModel"
    yield "spec.dataset.train", spec.dataset.train, "DATASET", "Dataset"
    if spec.dataset.validation:
        yield "spec.dataset.validation", spec.dataset.validation, "DATASET", "Dataset"
    if spec.eval is not None:
        yield "spec.eval.testSet", spec.eval.test_set, "DATASET", "Dataset"
        if spec.eval.regression is not None:
            yield "spec.eval.regression.dataset", spec.eval.regression.dataset, "DATASET", "Dataset"


def check_inputs(
    lorajob: LoRAJob, credentials: dict[str, dict[str, str]], objects: ObjectStore
) -> tuple[Check, bytes | None]:
    """Every s3:// input exists and is readable with its role's Secret. Returns the check and config.json."""
    namespace = lorajob.metadata.namespace or "default"
    refs = role_refs(lorajob)
    problems: list[tuple[str, str]] = []
    checked: list[str] = []
    skipped: list[str] = []
    model_config: bytes | None = None
    unreachable: dict[str, str] = {}
    for field, uri, role, what in _inputs(lorajob):
        if not uri.startswith("s3://"):
            skipped.append(f"{field} ({uri.split('://', 1)[0]}://)")
            continue
        creds = credentials[role]
        reader = _reader(namespace, refs[role])
        is_model = role == "BASE_MODEL"
        location = storage.parse_s3(uri).child("config.json") if is_model else storage.parse_s3(uri)
        if "S3_ENDPOINT" not in creds:
            problems.append(
                (
                    "StorageUnavailable",
                    f"{field}: no S3 endpoint: the Secret has no key endpoint and the operator no defaultS3Endpoint",
                )
            )
            continue
        if creds["S3_ENDPOINT"] in unreachable:
            # One dead endpoint costs one timeout per preflight, not one per input.
            answer = Probe(False, error=unreachable[creds["S3_ENDPOINT"]])
        else:
            answer = objects.probe(identity(namespace, refs[role], creds), creds, location, read=is_model)
            if answer.unavailable and answer.error:
                unreachable[creds["S3_ENDPOINT"]] = answer.error
        if answer.found:
            checked.append(field)
            if is_model:
                model_config = answer.body
        elif answer.error is None:
            detail = f"no config.json under {uri}" if is_model else f"{uri} does not exist"
            problems.append((f"{what}NotFound", f"{field}: {detail} (read {reader})"))
        elif answer.unavailable:
            problems.append(
                (
                    "StorageUnavailable",
                    f"{field}: S3 endpoint {creds['S3_ENDPOINT']} did not answer (read {reader}); "
                    f"cannot check {location}: {answer.error}",
                )
            )
        else:
            problems.append((f"{what}AccessDenied", f"{field}: {location} cannot be read {reader}: {answer.error}"))
    unchecked = f"; not checked here: {', '.join(skipped)}, read only by the trainer" if skipped else ""
    if problems:
        message = "; ".join(m for _, m in problems) + unchecked
        return Check("InputsFound", "False", problems[0][0], message, "blocking"), None
    if not checked:
        message = f"Nothing to check in S3{unchecked}: hf:// needs the hub, file:// and pvc:// are read in the pod"
        return Check("InputsFound", "Unknown", "NotChecked", message, "info"), None
    return Check("InputsFound", "True", "InputsFound", f"Found {', '.join(checked)}{unchecked}"), model_config


def check_gpu_type(lorajob: LoRAJob, cluster: Cluster) -> tuple[Check | None, int | None]:
    """Whether a node has the GPU type, and that type's memory in MiB if known."""
    gpu_type = lorajob.spec.resources.gpu_type
    if not gpu_type:
        return None, None
    nodes = cluster.gpu_nodes(gpu_type)
    memory_labels = [int(n["nvidia.com/gpu.memory"]) for n in nodes if n.get("nvidia.com/gpu.memory", "").isdigit()]
    memory = max(memory_labels) if memory_labels else KNOWN_GPU_MEMORY_MIB.get(gpu_type)
    if not nodes:
        message = f"spec.resources.gpuType: no node has {GPU_PRODUCT_LABEL}={gpu_type}"
        return Check("GPUTypeAvailable", "False", "GPUTypeNotFound", message, "warning"), memory
    return Check("GPUTypeAvailable", "True", "GPUTypeFound", f"{len(nodes)} node(s) have {gpu_type}"), memory


def check_memory(
    lorajob: LoRAJob, model_config: bytes | None, gpu_memory_mib: int | None, config: OperatorConfig
) -> tuple[Check, dict[str, Any] | None]:
    spec = lorajob.spec
    if model_config is None:
        message = "No config.json was read (only s3:// base models are sized here); the trainer reports its estimate"
        return Check("MemoryFits", "Unknown", "NotEstimated", message, "info"), None
    try:
        estimate = estimate_spec(spec, dict(json.loads(model_config)), config)
    except Exception as exc:
        message = f"spec.baseModel: cannot estimate from config.json: {type(exc).__name__}: {exc}"
        return Check("MemoryFits", "Unknown", "EstimateUnavailable", message[:1024], "warning"), None
    needed = estimate.get("totalBytesPerGpu")
    if not (needed and gpu_memory_mib and spec.resources.gpus):
        message = f"Estimated {needed / 2**30:.1f} GiB per GPU; " if needed else ""
        message += "the GPU's memory is not known (set spec.resources.gpuType)" if spec.resources.gpus else "no GPU"
        return Check("MemoryFits", "Unknown", "GPUMemoryUnknown", message, "info"), estimate
    available = gpu_memory_mib * 1024 * 1024
    sizes = f"{needed / 2**30:.1f} GiB per GPU of the {available / 2**30:.1f} GiB of {spec.resources.gpu_type}"
    if needed > available:
        message = f"spec.resources: estimated {needed / 2**30:.1f} GiB per GPU exceeds the "
        message += f"{available / 2**30:.1f} GiB of {spec.resources.gpu_type}"
        return Check("MemoryFits", "False", "InsufficientGPUMemory", message, "fatal"), estimate
    return Check("MemoryFits", "True", "Fits", f"Estimated {sizes}"), estimate


def preflight(lorajob: LoRAJob, cluster: Cluster, config: OperatorConfig, objects: ObjectStore | None) -> Preflight:
    """Every check, in order; storage and memory checks wait for the Secrets they need."""
    result = Preflight()
    secrets_check, secrets = check_secrets(lorajob, cluster)
    result.checks.append(secrets_check)
    refs = role_refs(lorajob)
    result.credentials = {
        role: credentials_for(secrets.get(ref.name, {}) if ref else {}, config) for role, ref in refs.items()
    }
    model_config: bytes | None = None
    if secrets_check.severity == "blocking":
        result.checks.append(Check("InputsFound", "Unknown", "NotChecked", "Waiting for the Secrets", "info"))
    elif objects is not None:
        inputs_check, model_config = check_inputs(lorajob, result.credentials, objects)
        result.checks.append(inputs_check)
    gpu_check, gpu_memory_mib = check_gpu_type(lorajob, cluster)
    if gpu_check is not None:
        result.checks.append(gpu_check)
    memory_check, result.estimate = check_memory(lorajob, model_config, gpu_memory_mib, config)
    result.checks.append(memory_check)
    return result
