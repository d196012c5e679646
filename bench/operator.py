"""Benchmark: 1,000 LoRAJobs applied at once against the kwok cluster; prints JSON.

Measures the time until every LoRAJob has its Job, p50/p99 latency from a LoRAJob appearing
to its Job appearing (both seen through watches), the operator's peak RSS and the API requests
it sent per LoRAJob. The baseline, in the same run, is the time the API server takes to create
the same number of Jobs directly (no operator): `ratio` = operator time / baseline time.

Usage: python bench/operator.py [--count 1000]
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path, and this file is named like the
# standard library's `operator`: drop the folder so no later import can pick this file up instead.
BENCH_DIR = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != BENCH_DIR]

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402

REPO = Path(BENCH_DIR).parent
sys.path.insert(0, str(REPO))

from tests.operator.harness import OperatorProcess, install_crds, lorajob_manifest, seed_inputs  # noqa: E402

from kubelora.devenv import cluster  # noqa: E402


def watch_added(
    api_client, namespace: str, kind: str, seen: dict[str, float], label: str | None, stop: threading.Event
) -> None:
    from kubernetes import client

    batch, custom = client.BatchV1Api(api_client), client.CustomObjectsApi(api_client)
    position = {"resourceVersion": None}
    while not stop.is_set():
        try:
            _watch_once(batch, custom, namespace, kind, seen, label, stop, position)
        except Exception as exc:
            if "410" in str(exc):
                position["resourceVersion"] = None  # too old: start again from a list
            print(f"Restarting watch kind={kind} error={exc!r:.120}", file=sys.stderr)


def _watch_once(batch, custom, namespace, kind, seen, label, stop, position) -> None:
    """Resume from the last resourceVersion seen: a watch started without one sends every object again, and the
    API server's time spent re-sending a thousand objects every few seconds is taken from what is measured."""
    from kubernetes import watch

    if kind == "jobs":
        lister, args = batch.list_namespaced_job, (namespace,)
    else:
        lister, args = custom.list_namespaced_custom_object, ("kubelora.dev", "v1alpha1", namespace, "lorajobs")
    kwargs = {"timeout_seconds": 60, "allow_watch_bookmarks": True}
    if position["resourceVersion"]:
        kwargs["resource_version"] = position["resourceVersion"]
    # Raw events: decoding every Job into V1Job models would take CPU from the operator being measured.
    raw_watch = watch.Watch()
    raw_watch.get_return_type = lambda func: None
    for event in raw_watch.stream(lister, *args, **kwargs):
        raw = event.get("raw_object") or event["object"]
        meta = raw.get("metadata") or {}
        if meta.get("resourceVersion"):
            position["resourceVersion"] = meta["resourceVersion"]
        if event.get("type") in ("ADDED", "MODIFIED"):
            name = meta.get("name")
            if label:
                name = (meta.get("labels") or {}).get(label, name)
            seen.setdefault(name, time.monotonic())
        if stop.is_set():
            return


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def create_all(api_client, namespace: str, bodies: list[dict], create) -> float:
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(create, bodies))
    return time.monotonic() - started


def baseline(api_client, env: cluster.DevEnv, count: int) -> float:
    """Create `count` plain Jobs directly and wait until all exist: what the API server alone takes."""
    from kubernetes import client

    namespace = f"bench-base-{uuid.uuid4().hex[:6]}"
    cluster.kubectl(env, "create", "namespace", namespace)
    batch = client.BatchV1Api(api_client)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "spec": {
            "suspend": True,
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}},
        },
    }
    bodies = [dict(job, metadata={"name": f"job-{i:04d}"}) for i in range(count)]
    elapsed = create_all(api_client, namespace, bodies, lambda b: batch.create_namespaced_job(namespace, b))
    cluster.kubectl(env, "delete", "namespace", namespace, "--wait=false")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    from kubernetes import client, config

    env = cluster.load() or cluster.up()
    install_crds(env)
    api_client = config.new_client_from_config(config_file=str(env.kubeconfig))
    api_client.configuration.connection_pool_maxsize = 16
    base_seconds = baseline(api_client, env, args.count)

    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    cluster.kubectl(env, "create", "namespace", namespace)
    cluster.kubectl(
        env, "create", "secret", "generic", "minio-creds", "-n", namespace,
        f"--from-literal=accessKey={env.minio_access_key}", f"--from-literal=secretKey={env.minio_secret_key}",
    )  # fmt: skip
    # Preflight reads the base model's config.json and checks the training file before any Job exists.
    from minio import Minio

    minio = Minio(env.minio_endpoint, env.minio_access_key, env.minio_secret_key, secure=False)
    if not minio.bucket_exists("bench"):
        minio.make_bucket("bench")
    seed_inputs(minio, "bench")
    workdir = Path(tempfile.mkdtemp(prefix="kubelora-bench-"))
    os.environ["KUBELORA_COUNT_API_REQUESTS"] = "1"
    os.environ["KUBELORA_RECONCILE_INTERVAL"] = "10"  # the production default (tests use 1 s)
    # The chart's default: the tests' 1 s would poll every running LoRAJob's report every second.
    operator = OperatorProcess(env, namespace, workdir, progressIntervalSeconds=15)
    operator.start()
    process = psutil.Process(operator.process.pid)
    metrics_before = operator.metrics()
    requests_before = api_requests(metrics_before)
    cpu_before = process.cpu_times()

    stop = threading.Event()
    lorajob_seen: dict[str, float] = {}
    job_seen: dict[str, float] = {}
    watchers = [
        threading.Thread(
            target=watch_added, args=(api_client, namespace, "lorajobs", lorajob_seen, None, stop), daemon=True
        ),
        threading.Thread(
            target=watch_added,
            args=(api_client, namespace, "jobs", job_seen, "kubelora.dev/lorajob", stop),
            daemon=True,
        ),
    ]
    for watcher in watchers:
        watcher.start()
    peak_rss = [process.memory_info().rss]

    def sample_rss() -> None:
        while not stop.is_set():
            peak_rss[0] = max(peak_rss[0], process.memory_info().rss)
            stop.wait(0.2)

    threading.Thread(target=sample_rss, daemon=True).start()
    custom = client.CustomObjectsApi(api_client)
    bodies = [lorajob_manifest(f"job-{i:04d}", "bench", resources={"gpus": 0}) for i in range(args.count)]
    started = time.monotonic()
    create_seconds = create_all(
        api_client,
        namespace,
        bodies,
        lambda b: custom.create_namespaced_custom_object("kubelora.dev", "v1alpha1", namespace, "lorajobs", b),
    )
    deadline = started + args.timeout
    while len(job_seen) < args.count and time.monotonic() < deadline:
        time.sleep(0.2)
    all_jobs_seconds = time.monotonic() - started
    jobs_listed = len(client.BatchV1Api(api_client).list_namespaced_job(namespace).items)
    metrics_after = operator.metrics()
    cpu = process.cpu_times()
    requests_after = api_requests(metrics_after)
    by_method = {
        key: round((value - requests_by_method(metrics_before).get(key, 0.0)) / args.count, 2)
        for key, value in sorted(requests_by_method(metrics_after).items())
    }
    stop.set()
    latencies = [job_seen[n] - lorajob_seen[n] for n in job_seen if n in lorajob_seen]
    result = {
        "benchmark": "operator",
        "lorajobs": args.count,
        "jobs_created": jobs_listed,
        "seconds_to_all_jobs": round(all_jobs_seconds, 2),
        "seconds_to_create_lorajobs": round(create_seconds, 2),
        "latency_p50_seconds": round(percentile(latencies, 0.5), 3) if latencies else None,
        "latency_p99_seconds": round(percentile(latencies, 0.99), 3) if latencies else None,
        # CPU the operator spent over the run: near the wall time, the operator itself is the bottleneck.
        "operator_cpu_seconds": round(cpu.user + cpu.system - cpu_before.user - cpu_before.system, 2),
        "operator_peak_rss_mb": round(peak_rss[0] / 2**20, 1),
        "api_requests_per_lorajob": round((requests_after - requests_before) / args.count, 2),
        "api_requests_per_lorajob_by_client_and_method": by_method,
        "baseline_seconds_direct_job_creation": round(base_seconds, 2),
        "ratio_vs_direct_job_creation": round(all_jobs_seconds / base_seconds, 2),
        # The API server's own time to admit the LoRAJobs (CEL validation included) bounds the operator.
        "ratio_vs_creating_the_lorajobs": round(all_jobs_seconds / create_seconds, 2),
        "goal": {"all_jobs_within_seconds": 60, "rss_under_mb": 300},
    }
    operator.kill()
    cluster.kubectl(env, "delete", "namespace", namespace, "--wait=false")
    print(json.dumps(result, indent=2))
    return 0 if len(job_seen) == args.count else 1


def api_requests(metrics_text: str) -> float:
    return sum(requests_by_method(metrics_text).values())


def requests_by_method(metrics_text: str) -> dict[str, float]:
    """kubelora_api_requests_total by "client method" (kopf's watches and kubernetes' calls apart)."""
    counts: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("kubelora_api_requests_total{"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
            key = " ".join(labels.get(name, "").strip('"') for name in ("client", "method"))
            counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


if __name__ == "__main__":
    sys.exit(main())
