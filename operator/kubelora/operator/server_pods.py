"""The server pods of an AdapterDeployment: finding them, and talking to their vLLM and agent.

The operator reaches vLLM at ``podIP:spec.target.port`` (with ``spec.target.apiKeySecretRef`` as a bearer
token) and the agent at ``podIP:8001`` (with the agent token). :func:`converge_pod` makes one pod serve
what it should; :func:`smoke_check` compares canary answers with the adapter's eval predictions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import time
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from kubelora.api.v1alpha1 import AdapterDeployment
from kubelora.operator.adapter_resolution import DEFAULT_MAX_NEW_TOKENS
from kubelora.operator.managed_server import (
    AGENT_PORT,
    AGENT_PORT_ANNOTATION,
    MANAGED_LABEL,
    agent_token_ref,
)
from kubelora.operator.rollout import KEEP, PodState, Want, WantValue
from kubelora.serving import vllm

if TYPE_CHECKING:
    from kubelora.operator.adapter_resolution import ResolvedAdapter
    from kubelora.operator.adapterdeployments import Runtime

log = logging.getLogger("kubelora.adapterdeployment")
DIGEST_HEX = re.compile(r"^[0-9a-f]{64}$")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclasses.dataclass
class Settings:
    resync_seconds: float = 300.0
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
    #: How long one read of a target's Deployment, Secrets and pod list serves every AdapterDeployment that
    #: asks for the same (0: no sharing); a pod event drops the namespace's reads at once.
    shared_read_seconds: float = 2.0
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
            resync_seconds=_env_float("KUBELORA_ADAPTER_RESYNC_SECONDS", 300.0),
            concurrency=max(1, int(_env_float("KUBELORA_ADAPTER_CONCURRENCY", 16))),
            agent_port=int(_env_float("KUBELORA_AGENT_PORT", AGENT_PORT)),
            agent_image=os.environ.get("KUBELORA_AGENT_IMAGE") or agent_image or cls.agent_image,
            rollout_max_attempts=max(1, int(_env_float("KUBELORA_ROLLOUT_MAX_ATTEMPTS", 3))),
            rollout_timeout_seconds=_env_float("KUBELORA_ROLLOUT_TIMEOUT_SECONDS", 600.0),
            backoff_max_seconds=_env_float("KUBELORA_ADAPTER_BACKOFF_MAX_SECONDS", 60.0),
            shared_read_seconds=_env_float("KUBELORA_ADAPTER_SHARED_READ_SECONDS", 2.0),
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


@dataclasses.dataclass(frozen=True)
class Pod:
    name: str
    uid: str
    ip: str
    port: int
    agent_port: int
    blocked: str | None = None  # why the operator will not contact it
    api_key: str | None = dataclasses.field(default=None, repr=False)  # vLLM's --api-key (spec.target)
    agent_token: str | None = dataclasses.field(default=None, repr=False)  # the agent's bearer token

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


_REQUIREMENT = re.compile(r"^(!?)([^=!\s(),]+)(?:\s*(=|==|!=|\s+in\s+|\s+notin\s+)\s*(\([^)]*\)|[^,]*))?$")


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` match a label selector string (the form :func:`label_selector` writes)."""
    for part in re.findall(r"[^,(]+(?:\([^)]*\))?", selector):
        match = _REQUIREMENT.match(part.strip())
        if match is None:
            return False
        negated, key, op, value = match.groups()
        op = (op or "").strip()
        if not op:
            if (key in labels) == bool(negated):
                return False
            continue
        values = {v.strip() for v in value.strip("()").split(",")} if op in ("in", "notin") else {value.strip()}
        present = labels.get(key)
        if op in ("=", "==", "in") and present not in values:
            return False
        if op in ("!=", "notin") and present in values:
            return False
    return True


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp") or status.get("phase") != "Running" or not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


async def _secret_value(
    runtime: Runtime, namespace: str, name: str, key: str, field: str
) -> tuple[str | None, str | None]:
    secret = await runtime.shared_read(("secret", namespace, name), runtime.kube.get_secret, namespace, name)
    if secret is None or not secret.get(key):
        what = f"Secret {namespace}/{name}" + (" does not exist" if secret is None else f" has no key {key}")
        return None, f"{what} ({field})"
    return secret[key], None


async def target_pods(runtime: Runtime, ad: AdapterDeployment) -> tuple[list[Pod], str | None]:
    """The Ready pods of the target, sorted by name, and a problem finding them (if any)."""
    target = ad.spec.target
    namespace = ad.metadata.namespace or "default"
    if target.deployment_name:
        deployment = await runtime.shared_read(
            ("deployment", namespace, target.deployment_name),
            runtime.kube.get_deployment,
            namespace,
            target.deployment_name,
        )
        if deployment is None:
            return [], f"Deployment {namespace}/{target.deployment_name} does not exist"
        selector = label_selector(deployment["spec"].get("selector") or {})
        if not selector:
            return [], f"Deployment {target.deployment_name} has an empty selector"
    elif target.selector:
        selector = ",".join(f"{k}={v}" for k, v in sorted(target.selector.items()))
    else:
        selector = f"{MANAGED_LABEL}={ad.metadata.name}"
    # Which pods' events concern this AdapterDeployment (the controller's pod watch reads it).
    runtime.selectors[(namespace, ad.metadata.name)] = selector
    api_key = None
    if target.api_key_secret_ref is not None:
        ref = target.api_key_secret_ref
        api_key, problem = await _secret_value(runtime, namespace, ref.name, ref.key, "spec.target.apiKeySecretRef")
        if problem:
            return [], problem
    token_name, token_key, field = agent_token_ref(ad)
    agent_token, problem = await _secret_value(runtime, namespace, token_name, token_key, field)
    if problem:
        return [], problem
    raw = await runtime.shared_read(("pods", namespace, selector), runtime.kube.list_pods, namespace, selector)
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
            Pod(
                item["metadata"]["name"],
                item["metadata"]["uid"],
                ip,
                target.port,
                agent_port,
                blocked,
                api_key,
                agent_token,
            )
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
        """One HTTP call; ``pod`` given: a call to its vLLM or (kind "agent") its agent, with the bearer token."""
        import aiohttp

        token = None if pod is None else (pod.agent_token if kind == "agent" else pod.api_key)
        headers = {"Authorization": f"Bearer {token}"} if token else None
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
            pod,
        )
        if status == 401:
            raise PodError(
                "agent",
                "the agent answered 401 Unauthorized: its KUBELORA_AGENT_TOKEN is not the token "
                "in the AdapterDeployment's agent token Secret",
            )
        if status != 200:
            raise PodError("agent", f"agent could not fetch the adapter ({status}): {_error_text(text)}")
        return str(json.loads(text)["path"])

    async def forget(self, pod: Pod, digest: str) -> None:
        hex_digest = digest.split(":", 1)[-1]
        with contextlib.suppress(PodError):
            await self._request(
                "agent", "DELETE", f"{pod.agent}/v1/adapters/{hex_digest}", self.settings.probe_timeout_seconds, pod=pod
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


async def converge_pod(
    runtime: Runtime, tracks: dict[str, PodTrack], pod: Pod, served_name: str, want: WantValue
) -> PodState:
    """Observe one pod and make it serve ``want`` under ``served_name``."""
    settings = runtime.settings
    target = want.digest if isinstance(want, Want) else None
    track = tracks.get(pod.uid)
    if track is None or track.digest != target:
        track = tracks[pod.uid] = PodTrack(target)

    def failed(error: PodError, current: str | None) -> PodState:
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
        return PodState(pod.name, "Failed", target or current, error.message, track.attempts, fatal, error.refusal)

    if pod.blocked:
        return PodState(pod.name, "Failed", target, pod.blocked, 0, False)
    async with runtime.semaphore:
        try:
            served = await runtime.pods.models(pod)
        except PodError as exc:
            # Not a load attempt: no backoff, so a pod that comes back is served at the next pass.
            if track.message != exc.message:
                log.warning("Server not reachable pod=%s ip=%s error=%s", pod.name, pod.ip, exc.message)
                track.message = exc.message
            return PodState(pod.name, "Failed", target, exc.message, track.attempts, False)
        present = served_name in served
        current = digest_of_root(served.get(served_name)) if present else None
        if want == KEEP:
            return PodState(pod.name, "Loaded" if present else "Unloaded", current)
        if want is None:
            if not present:
                tracks.pop(pod.uid, None)
                return PodState(pod.name, "Unloaded", None)
            try:
                await runtime.pods.unload(pod, served_name)
            except PodError as exc:
                return failed(exc, current)
            log.info("Unloaded adapter pod=%s servedName=%s digest=%s", pod.name, served_name, current)
            tracks.pop(pod.uid, None)
            return PodState(pod.name, "Unloaded", None)
        assert isinstance(want, Want)
        if current == want.digest:
            if track.attempts:
                tracks[pod.uid] = PodTrack(target)
            return PodState(pod.name, "Loaded", current)
        if time.monotonic() < track.next_try:
            return PodState(pod.name, "Failed", want.digest, track.message, track.attempts, True)
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
        return PodState(pod.name, "Loaded", want.digest)


async def converge(
    runtime: Runtime, uid: str, served_name: str, pods: Sequence[Pod], wants: Mapping[str, WantValue]
) -> dict[str, PodState]:
    tracks = runtime.tracks.setdefault(uid, {})
    for stale in set(tracks) - {p.uid for p in pods}:
        tracks.pop(stale, None)
    results = await asyncio.gather(*(converge_pod(runtime, tracks, p, served_name, wants[p.name]) for p in pods))
    return {r.name: r for r in results}


@dataclasses.dataclass
class SmokeResult:
    passed: bool
    matched: int
    total: int
    message: str
    skipped: bool = False


def normalise_answer(text: str) -> str:
    """An answer as the smoke check compares it: Unicode NFKC, case folded, runs of whitespace as one space,
    trimmed. vLLM's kernels and transformers' differ in the last bits, which at temperature 0 shows up as
    spacing or casing now and then; those never decide a rollout. Any other difference (a word, a digit,
    punctuation) counts as a mismatch, and ``smokeMinMatch`` is the tolerance for those."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _same_answer(got: str, expected: str, exact: bool) -> bool:
    got, expected = normalise_answer(got), normalise_answer(expected)
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
