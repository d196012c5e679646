"""Preflight's Secret reads: one GET serves the LoRAJobs that name the same Secret within a short time."""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from kubernetes.client.exceptions import ApiException

from kubelora.operator.preflight import Cluster


class Secret:
    def __init__(self, data: dict[str, str]) -> None:
        self.data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}


class CountingCore:
    """Stands in for CoreV1Api: counts GETs; `hold` keeps them open, so concurrent readers pile up behind one."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.reads: list[tuple[str, str]] = []
        self.fail = False
        self.lock = threading.Lock()
        self.hold = threading.Event()
        self.hold.set()

    def read_namespaced_secret(self, name: str, namespace: str) -> Secret:
        with self.lock:
            self.reads.append((namespace, name))
        assert self.hold.wait(30)
        if self.fail:
            raise ApiException(status=500, reason="boom")
        data = self.secrets.get((namespace, name))
        if data is None:
            raise ApiException(status=404, reason="NotFound")
        return Secret(data)


def cluster(core: CountingCore, seconds: float) -> Cluster:
    shared = Cluster(None, shared_read_seconds=seconds)
    shared.core = core
    return shared


def test_concurrent_reads_of_one_secret_cost_one_get():
    core = CountingCore()
    core.secrets[("t1", "creds")] = {"accessKey": "a", "secretKey": "s"}
    shared = cluster(core, seconds=30)
    core.hold.clear()  # the API server answers only once every reader has asked
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(shared.read_secret, "t1", "creds") for _ in range(64)]
        core.hold.set()
        results = [f.result() for f in futures]
    assert results == [{"accessKey": "a", "secretKey": "s"}] * 64
    assert core.reads == [("t1", "creds")]
    results[0]["accessKey"] = "changed by a caller"
    assert shared.read_secret("t1", "creds") == {"accessKey": "a", "secretKey": "s"}, "callers get copies"


def test_namespaces_never_share_and_a_read_expires():
    core = CountingCore()
    core.secrets[("t1", "creds")] = {"accessKey": "one"}
    core.secrets[("t2", "creds")] = {"accessKey": "two"}
    shared = cluster(core, seconds=0.2)
    assert shared.read_secret("t1", "creds") == {"accessKey": "one"}
    assert shared.read_secret("t2", "creds") == {"accessKey": "two"}
    core.secrets[("t1", "creds")] = {"accessKey": "rotated"}
    deadline = time.monotonic() + 10
    while shared.read_secret("t1", "creds") != {"accessKey": "rotated"}:
        assert time.monotonic() < deadline, "a rotated Secret was never seen"
    assert core.reads.count(("t1", "creds")) >= 2


def test_a_missing_secret_is_shared_and_an_error_is_not():
    core = CountingCore()
    shared = cluster(core, seconds=30)
    assert shared.read_secret("t1", "nope") is None
    assert shared.read_secret("t1", "nope") is None
    assert core.reads == [("t1", "nope")]
    core.fail = True
    with pytest.raises(ApiException):
        shared.read_secret("t1", "other")
    with pytest.raises(ApiException):
        shared.read_secret("t1", "other")
    assert core.reads.count(("t1", "other")) == 2, "a failed read is asked again, never remembered"


def test_callers_waiting_on_a_failing_read_share_its_error():
    core = CountingCore()
    core.fail = True
    shared = cluster(core, seconds=30)
    core.hold.clear()  # every reader asks while the one GET is still open
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(shared.read_secret, "t1", "creds") for _ in range(16)]
        deadline = time.monotonic() + 10
        while len(core.reads) < 1:
            assert time.monotonic() < deadline, "no GET was made"
            time.sleep(0.01)
        core.hold.set()
        errors = [f.exception(timeout=30) for f in futures]
    assert all(isinstance(e, ApiException) and e.status == 500 for e in errors), errors
    # The readers that arrived while the GET was open shared it; only stragglers that came after it failed ask again.
    assert len(core.reads) < 16, core.reads
    core.fail = False
    core.secrets[("t1", "creds")] = {"accessKey": "a"}
    assert shared.read_secret("t1", "creds") == {"accessKey": "a"}, "the error was not remembered"


def test_zero_seconds_reads_every_time():
    core = CountingCore()
    core.secrets[("t1", "creds")] = {"accessKey": "a"}
    shared = cluster(core, seconds=0)
    for _ in range(3):
        shared.read_secret("t1", "creds")
    assert len(core.reads) == 3
