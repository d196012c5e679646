"""A per-key work queue for level-based controllers, after controller-runtime's (client-go's workqueue).

- ``add(key)`` asks for one reconcile of ``key``. Adding a key that is already waiting does nothing;
  adding one that is being reconciled marks it dirty, so it runs once more when the current run ends.
  One key never runs twice at once, and a burst of watch events becomes one reconcile.
- ``add_after(key, seconds)`` schedules a reconcile (a bake time, a deadline, a retry); an earlier
  request wins.
- The reconcile function returns the seconds until it wants to look again (``None``: only when
  something changes). An exception requeues the key with a per-key exponential backoff (``base`` doubling
  up to ``cap``); a run that returns resets it.
- Every run has a timeout: one stuck key (a tenant's dead endpoint) holds one worker for at most that
  long, and never the others.
- ``pause()``/``resume()``: while paused no run starts (a standby replica writes nothing); requests are
  kept and run on resume.
- ``resync(keys, every)``: adds every live key at that interval, the safety net for missed events.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

log = logging.getLogger("kubelora.workqueue")


class WorkQueue(Generic[K]):
    def __init__(
        self,
        name: str,
        reconcile: Callable[[K], Awaitable[float | None]],
        *,
        workers: int = 8,
        timeout: float = 120.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.reconcile = reconcile
        self.workers = workers
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.clock = clock
        self._ready: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()  # in _ready
        self._running: set[K] = set()
        self._dirty: set[K] = set()  # added while running: run again when done
        self._delayed: list[tuple[float, int, K]] = []  # (due, seq, key), a heap
        self._due: dict[K, float] = {}  # the earliest pending due time per key
        self._failures: dict[K, int] = {}
        self._seq = 0
        self._wake = asyncio.Event()
        self._active = asyncio.Event()
        self._active.set()
        self._tasks: list[asyncio.Task[None]] = []
        self.runs = 0
        self.errors = 0

    # ------------------------------------------------------------------------------------------------
    # Requests

    def add(self, key: K) -> None:
        self._due.pop(key, None)  # due now: an earlier request wins
        if key in self._running:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.put_nowait(key)

    def add_after(self, key: K, seconds: float) -> None:
        if seconds <= 0:
            self.add(key)
            return
        due = self.clock() + seconds
        if key in self._queued or self._due.get(key, float("inf")) <= due:
            return
        self._due[key] = due
        self._seq += 1
        heapq.heappush(self._delayed, (due, self._seq, key))
        self._wake.set()

    def add_rate_limited(self, key: K) -> float:
        """Requeue after this key's backoff; returns the delay."""
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        delay = min(self.backoff_cap, self.backoff_base * 2 ** (failures - 1))
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """Reset the key's backoff (and drop a scheduled retry): it reconciled, or it is gone."""
        self._failures.pop(key, None)
        self._due.pop(key, None)

    def pending(self) -> int:
        return len(self._queued) + len(self._due)

    def is_busy(self, key: K) -> bool:
        return key in self._running or key in self._queued

    # ------------------------------------------------------------------------------------------------
    # Pause (leader election by kopf peering)

    def pause(self) -> None:
        if self._active.is_set():
            log.info("Paused queue=%s", self.name)
        self._active.clear()

    def resume(self) -> None:
        if not self._active.is_set():
            log.info("Resumed queue=%s", self.name)
        self._active.set()

    @property
    def paused(self) -> bool:
        return not self._active.is_set()

    # ------------------------------------------------------------------------------------------------
    # Running

    def start(self) -> None:
        # Not `if self._tasks`: resync() may have added its task before start(), and the workers must still start.
        if any(task.get_name() == f"{self.name}-timer" for task in self._tasks):
            return
        self._tasks.append(asyncio.create_task(self._timer(), name=f"{self.name}-timer"))
        for i in range(self.workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"{self.name}-worker-{i}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    def resync(self, keys: Callable[[], Iterable[K]], every: float) -> None:
        """Add every key ``keys()`` returns, every ``every`` seconds (the first time after ``every``)."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(every)
                for key in list(keys()):
                    self.add(key)

        self._tasks.append(asyncio.create_task(loop(), name=f"{self.name}-resync"))

    async def _timer(self) -> None:
        while True:
            now = self.clock()
            while self._delayed and self._delayed[0][0] <= now:
                due, _, key = heapq.heappop(self._delayed)
                if self._due.get(key) == due:  # not superseded by add() or an earlier add_after()
                    del self._due[key]
                    self.add(key)
            self._wake.clear()
            timeout = self._delayed[0][0] - now if self._delayed else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _worker(self) -> None:
        while True:
            key = await self._ready.get()
            await self._active.wait()
            self._queued.discard(key)
            self._running.add(key)
            again: float | None = None
            try:
                self.runs += 1
                again = await asyncio.wait_for(self.reconcile(key), self.timeout)
                self._failures.pop(key, None)
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                self.errors += 1
                delay = self.add_rate_limited(key)
                log.warning("Reconcile timed out queue=%s key=%s timeout=%.0fs retryIn=%.1fs",
                            self.name, key, self.timeout, delay)  # fmt: skip
            except Exception:
                self.errors += 1
                delay = self.add_rate_limited(key)
                log.exception("Reconcile failed queue=%s key=%s retryIn=%.1fs", self.name, key, delay)
            finally:
                self._running.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self.add(key)
            elif again is not None:
                self.add_after(key, again)
