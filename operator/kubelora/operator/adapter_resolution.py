"""Which adapter an AdapterDeployment means, read with the tenant's own credentials, and its gates.

The adapter comes from a LoRAJob's status or a URI pinned by digest. Its manifest is read from S3 only
(never a path on the operator's or a pod's filesystem), checked against the digest, and the adapter's
rank and base model are compared with the target. Errors name the tenant's own URI and the storage's
answer, never what a manifest the tenant cannot read would say.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from kubelora import storage
from kubelora.api.v1alpha1 import AdapterDeployment, short_digest

if TYPE_CHECKING:
    from kubelora.operator.adapterdeployments import Runtime

MANIFEST = storage.MANIFEST
DEFAULT_MAX_NEW_TOKENS = 64


MANIFEST = storage.MANIFEST


DEFAULT_MAX_NEW_TOKENS = 64


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
        # Only object storage, with the tenant's credentials: file:// and pvc:// name paths on pods' volumes,
        # and the operator reading them would read its own filesystem for a tenant.
        if not uri.startswith("s3://"):
            raise AdapterStorageError("UnsupportedURI", f"{uri}: AdapterDeployments serve adapters from s3:// only")
        if credentials is None or not credentials.endpoint:
            raise AdapterStorageError(
                "StorageUnavailable", f"{uri}: no S3 endpoint (secretRef endpoint or defaultS3Endpoint)"
            )
        from minio.error import S3Error

        from kubelora.storage import QUICK_TIMEOUTS, make_client, parse_s3

        client = self._clients.get(credentials)
        if client is None:
            client = make_client(
                credentials.endpoint,
                credentials.access_key,
                credentials.secret_key,
                credentials.secure,
                timeouts=QUICK_TIMEOUTS,
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
    dora: bool = False  # a DoRA adapter: vLLM cannot load it as a runtime LoRA
    merged_uri: str | None = None  # where the LoRAJob published the merged model (output.mergedModel), if it did


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
) -> tuple[str, dict[str, Any], dict[str, Any], list[dict[str, Any]], str | None]:
    """(uri, manifest, adapter_config, samples, samples problem); raises AdapterStorageError, or ValueError on a
    bad digest. ``uri`` is where the files are: the given URI, or its content-addressed ``sha256/<hex>/``."""
    try:
        manifest_bytes = await runtime.to_thread(runtime.reader.read, _join(uri, MANIFEST), credentials)
    except AdapterStorageError as exc:
        addressed = content_addressed(uri, digest)
        if exc.reason != "NotFound" or addressed.rstrip("/") == uri.rstrip("/"):
            raise
        # An output URI: the trainer publishes each adapter under <output>/sha256/<hex>/.
        uri = addressed
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
    # The manifest's own samples (sha256-checked) first; status.eval.samplesUri only for an adapter without them.
    location = _join(uri, "eval/samples.jsonl") if sample_entry else samples_uri
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
    return uri, manifest, adapter_config, samples, problem


def content_addressed(uri: str, digest: str) -> str:
    """Where the trainer publishes the adapter ``digest`` under the output ``uri`` (``uri`` if it is that already)."""
    addressed = storage.digest_dir(uri, digest)
    base = uri if uri.endswith("/") else uri + "/"
    return base if base.endswith(addressed.removeprefix(uri.rstrip("/"))) else addressed


def under(uri: str, prefix: str) -> bool:
    """Whether ``uri`` names an object below ``prefix`` (same bucket, no ``..`` segments)."""
    base = prefix if prefix.endswith("/") else prefix + "/"
    return uri.startswith(base) and ".." not in uri[len(base) :].split("/")


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
        if not uri.startswith("s3://"):
            return Resolution(
                "refused",
                "UnsupportedURI",
                f"LoRAJob {job_name} published its adapter to {uri}: AdapterDeployments serve adapters from s3:// "
                "only (the operator and the agent never read paths on pods' volumes)",
            )
        output_uri = str((job_spec.get("output") or {}).get("uri") or "")
        if secret_name is None:
            secret_name = ((job_spec.get("output") or {}).get("secretRef") or {}).get("name")
        secrets.append(secret_name)
        if not under(uri, output_uri):
            return Resolution(
                "refused",
                "AdapterOutsideOutput",
                f"LoRAJob {job_name} reports its adapter at {uri}, outside its spec.output.uri",
            )
        if evaluation is not None:
            samples_uri = evaluation.get("samplesUri")
            if samples_uri and not under(str(samples_uri), output_uri):
                # Expected answers for the smoke check come only from the job's own output.
                samples_uri = None
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
            files_uri, manifest, adapter_config, samples, samples_problem = await _load_files(
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
        about = manifest.get("adapter")
        method = about.get("method") if isinstance(about, dict) else None
        merged = any(
            isinstance(f, dict) and str(f.get("path", "")).startswith("merged/") for f in manifest.get("files") or []
        )
        cached = ResolvedAdapter(
            digest=digest,
            uri=files_uri,
            rank=rank,
            base_model=str(base),
            source=source,
            samples=samples,
            max_new_tokens=max_new_tokens,
            samples_problem=samples_problem,
            dora=adapter_config.get("use_dora") is True or method == "dora",
            merged_uri=_join(files_uri, "merged/") if merged else None,
        )
        if len(runtime.adapters) > 256:
            runtime.adapters.clear()
        runtime.adapters[key] = cached
    adapter = dataclasses.replace(cached, source=source, max_new_tokens=max_new_tokens)
    target = spec.target
    if adapter.dora:
        # vLLM refuses a DoRA adapter at load time ("vLLM does not yet support DoRA"): say so before any pod tries.
        instead = (
            f"serve its merged model {adapter.merged_uri} as a base model instead"
            if adapter.merged_uri
            else "train it with spec.output.mergedModel and serve the merged model as a base model instead"
        )
        return Resolution(
            "refused",
            "DoRAUnsupported",
            f"{source}: a DoRA adapter (use_dora in its adapter_config.json) cannot be served: vLLM cannot load "
            f"DoRA adapters as runtime LoRA; {instead}",
            adapter,
        )
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
