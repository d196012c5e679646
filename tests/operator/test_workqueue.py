"""The per-key work queue both controllers run on (no cluster)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from kubelora.operator.workqueue import WorkQueue


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), 30))


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


def test_a_burst_of_adds_is_one_run_and_a_key_never_runs_twice_at_once():
    async def scenario() -> None:
        runs: list[str] = []
        running: set[str] = set()
        release = asyncio.Event()

        async def reconcile(key: str) -> None:
            assert key not in running, "two runs of one key at once"
            running.add(key)
            runs.append(key)
            await release.wait()
            running.discard(key)

        queue = WorkQueue("t", reconcile, workers=4)
        queue.start()
        for _ in range(10):
            queue.add("a")
        await until(lambda: runs == ["a"])
        for _ in range(5):  # while "a" runs: one more run afterwards, not five
            queue.add("a")
        queue.add("b")
        await until(lambda: sorted(runs) == ["a", "b"])
        release.set()
        await until(lambda: runs.count("a") == 2 and not running)
        await asyncio.sleep(0.05)
        assert runs.count("a") == 2 and runs.count("b") == 1
        await queue.stop()

    run(scenario)


def test_a_returned_delay_and_add_after_schedule_a_run_and_the_earliest_wins():
    async def scenario() -> None:
        now = [0.0]
        runs: list[tuple[str, float]] = []

        async def reconcile(key: str) -> float | None:
            runs.append((key, now[0]))
            return 5.0 if key == "again" and len(runs) == 1 else None

        queue = WorkQueue("t", reconcile, clock=lambda: now[0])
        queue.start()
        queue.add("again")
        await until(lambda: len(runs) == 1)
        assert queue.pending() == 1  # due in 5 s
        queue.add_after("later", 10)
        queue.add_after("later", 3)  # earlier wins
        queue.add_after("later", 8)  # later loses
        now[0] = 3.0
        queue._wake.set()
        await until(lambda: len(runs) == 2)
        assert runs[1] == ("later", 3.0)
        now[0] = 5.0
        queue._wake.set()
        await until(lambda: len(runs) == 3)
        assert runs[2] == ("again", 5.0)
        now[0] = 20.0
        queue._wake.set()
        await asyncio.sleep(0.05)
        assert len(runs) == 3  # the superseded 8 s and 10 s requests never run
        await queue.stop()

    run(scenario)


def test_failures_back_off_per_key_and_a_success_resets_it():
    async def scenario() -> None:
        attempts: list[str] = []

        async def reconcile(key: str) -> None:
            attempts.append(key)
            if len(attempts) < 4:
                raise RuntimeError("storage unreachable")

        queue = WorkQueue("t", reconcile, backoff_base=0.01, backoff_cap=0.04)
        queue.start()
        queue.add("k")
        await until(lambda: len(attempts) == 4)
        assert queue._failures == {}
        assert queue.errors == 3
        assert queue.add_rate_limited("k") == 0.01  # reset: starts from the base again
        await queue.stop()

    run(scenario)


def test_a_stuck_key_times_out_and_never_holds_the_others():
    async def scenario() -> None:
        done: list[str] = []

        async def reconcile(key: str) -> None:
            if key == "blackhole":
                await asyncio.sleep(3600)
            done.append(key)

        queue = WorkQueue("t", reconcile, workers=2, timeout=0.1, backoff_base=60)
        queue.start()
        queue.add("blackhole")
        for i in range(20):
            queue.add(f"tenant-{i}")
        await until(lambda: len(done) == 20)
        await until(lambda: queue.errors == 1)  # the stuck run was cut off and scheduled for a retry
        assert queue.pending() == 1
        await queue.stop()

    run(scenario)


def test_nothing_runs_while_paused_and_requests_are_kept():
    async def scenario() -> None:
        runs: list[str] = []

        async def reconcile(key: str) -> None:
            runs.append(key)

        queue = WorkQueue("t", reconcile)
        queue.pause()
        queue.start()
        queue.add("a")
        await asyncio.sleep(0.05)
        assert runs == [] and queue.paused
        queue.resume()
        await until(lambda: runs == ["a"])
        await queue.stop()

    run(scenario)


def test_workers_start_even_when_resync_was_set_up_first():
    async def scenario() -> None:
        runs: list[str] = []

        async def reconcile(key: str) -> None:
            runs.append(key)

        queue = WorkQueue("t", reconcile)
        queue.resync(lambda: [], 3600)  # the controllers set the resync up before start()
        queue.start()
        queue.add("a")
        await until(lambda: runs == ["a"])
        await queue.stop()

    run(scenario)
