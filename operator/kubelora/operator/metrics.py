"""Prometheus metrics: LoRAJobs by phase, reconcile latency and GPU-seconds."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

PHASES = ("Pending", "Queued", "Training", "Evaluating", "Succeeded", "Failed")

LORAJOBS_BY_PHASE = Gauge("kubelora_lorajobs", "LoRAJobs seen by this operator, by phase", ["phase"])
RECONCILE_SECONDS = Histogram("kubelora_reconcile_duration_seconds", "Time spent in one LoRAJob reconcile")
GPU_SECONDS = Counter("kubelora_gpu_seconds_total", "GPU-seconds used by training runs this operator watched")

_lock = threading.Lock()
_phase_by_job: dict[str, str] = {}
_gpu_seconds_by_job: dict[str, float] = {}
_server_started = False


def observe_phase(key: str, phase: str, gpu_seconds: float | None = None) -> None:
    with _lock:
        _phase_by_job[key] = phase
        if gpu_seconds is not None:
            previous = _gpu_seconds_by_job.get(key, 0.0)
            if gpu_seconds > previous:
                GPU_SECONDS.inc(gpu_seconds - previous)
                _gpu_seconds_by_job[key] = gpu_seconds
        _refresh()


def forget(key: str) -> None:
    with _lock:
        _phase_by_job.pop(key, None)
        _gpu_seconds_by_job.pop(key, None)
        _refresh()


def _refresh() -> None:
    counts = dict.fromkeys(PHASES, 0)
    for phase in _phase_by_job.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, count in counts.items():
        LORAJOBS_BY_PHASE.labels(phase=phase).set(count)


def serve(port: int) -> None:
    global _server_started
    with _lock:
        if not _server_started:
            start_http_server(port)
            _server_started = True


API_REQUESTS = Counter(
    "kubelora_api_requests_total", "HTTP requests this process sent to the API server", ["client", "method"]
)


def api_server_address() -> tuple[str, int] | None:
    """The API server's host and port, as the kubernetes client is configured (in-cluster, else kubeconfig)."""
    from urllib.parse import urlsplit

    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        try:
            config.load_kube_config(client_configuration=configuration)
        except Exception:
            return None
    url = urlsplit(configuration.host)
    if url.hostname is None:
        return None
    return url.hostname, url.port or (443 if url.scheme == "https" else 80)


def instrument_api_clients(address: tuple[str, int] | None = None) -> None:
    """Count every request kopf (aiohttp) and the kubernetes client (urllib3) send to the API server at
    ``address`` (default: as configured); for benchmarks. The same libraries' requests elsewhere (S3 through
    urllib3, the vLLM pods and their agents through aiohttp) are not API requests and are not counted."""
    import aiohttp
    import urllib3
    from yarl import URL

    api = address or api_server_address()

    def to_api(host: str | None, port: int | None) -> bool:
        return api is None or (host, port) == api

    original_request = aiohttp.ClientSession._request

    async def counted_request(self: Any, method: str, str_or_url: Any, *args: Any, **kwargs: Any) -> Any:
        url = URL(str(str_or_url))
        if to_api(url.host, url.port):
            API_REQUESTS.labels(client="kopf", method=method.upper()).inc()
        return await original_request(self, method, str_or_url, *args, **kwargs)

    aiohttp.ClientSession._request = counted_request  # type: ignore[method-assign]
    original_urlopen = urllib3.connectionpool.HTTPConnectionPool.urlopen

    def counted_urlopen(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if to_api(self.host, self.port):
            API_REQUESTS.labels(client="kubernetes", method=method.upper()).inc()
        return original_urlopen(self, method, *args, **kwargs)

    urllib3.connectionpool.HTTPConnectionPool.urlopen = counted_urlopen  # type: ignore[method-assign]
