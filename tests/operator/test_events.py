"""Events go out off the reconcile's worker, in order per object, and one failed post loses only itself."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from kubelora.operator import events as events_module
from kubelora.operator.events import EventPoster


@dataclass
class Ev:
    type: str
    reason: str
    message: str = ""


class Recorder:
    """Stands in for create_event: records (object, reason); `gate` holds the first post of `held` until set."""

    def __init__(self, held: str | None = None) -> None:
        self.posted: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.held = held

    def __call__(self, api_client: Any, body: dict[str, Any], kind: str, type_: str, reason: str, message: str) -> None:
        name = body["metadata"]["name"]
        if name == self.held and not self.gate.is_set():
            assert self.gate.wait(30)
        if reason == "Boom":
            raise RuntimeError("the API server said no")
        with self.lock:
            self.posted.append((name, reason))

    def of(self, name: str) -> list[str]:
        with self.lock:
            return [reason for n, reason in self.posted if n == name]


def obj(name: str, uid: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "t1", "uid": uid}}


def wait_until(check: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder(held="a")
    monkeypatch.setattr(events_module, "create_event", recorder)
    return recorder


def test_one_objects_events_keep_their_order_while_others_go_out(recorder: Recorder):
    poster = EventPoster(None, "LoRAJob", lanes=4)
    a = obj("a", "uid-a")
    b = next(obj("b", f"uid-b{i}") for i in range(100) if poster.lane(obj("b", f"uid-b{i}")) != poster.lane(a))
    try:
        reasons = [f"R{i}" for i in range(20)]
        for first, second in zip(reasons[::2], reasons[1::2], strict=True):
            poster.post(a, [Ev("Normal", first), Ev("Normal", second)])  # a pass at a time, as reconciles post
        poster.post(b, [Ev("Normal", "Other")])
        # a's first post is held: b's lane is not behind it, and none of a's later passes overtook it
        wait_until(lambda: recorder.of("b") == ["Other"], "another object's event waited behind a held one")
        assert recorder.of("a") == []
        recorder.gate.set()
        wait_until(lambda: len(recorder.of("a")) == len(reasons), "events were lost")
        assert recorder.of("a") == reasons
    finally:
        recorder.gate.set()
        poster.shutdown()


def test_a_failed_post_loses_only_itself(recorder: Recorder):
    recorder.gate.set()
    poster = EventPoster(None, "AdapterDeployment", lanes=2)
    try:
        poster.post(obj("c", "uid-c"), [Ev("Normal", "Before"), Ev("Warning", "Boom"), Ev("Normal", "After")])
        wait_until(lambda: recorder.of("c") == ["Before", "After"], "events after a failed one were dropped")
    finally:
        poster.shutdown()


def test_after_shutdown_and_without_lanes_events_are_posted_inline(recorder: Recorder):
    recorder.gate.set()
    poster = EventPoster(None, "LoRAJob", lanes=2)
    poster.shutdown()
    poster.post(obj("d", "uid-d"), [Ev("Normal", "Stopping")])
    assert recorder.of("d") == ["Stopping"], "posted before post() returned"
    EventPoster(None, "LoRAJob", lanes=0).post(obj("e", "uid-e"), [Ev("Normal", "Inline")])
    assert recorder.of("e") == ["Inline"]
