"""Events posted off the reconcile's worker, in order per object.

The status is the record; an Event only tells of it. A worker that waited for its events would take a third
longer per LoRAJob started, and with a thousand applied at once the queue would fall behind them. So events go
out from a few threads of their own. One object's events always go through the same thread (its lane, chosen by
its uid), so ``Created Job`` never lands after ``Succeeded``; different objects' events go out in parallel.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from kubelora.operator.conditions import create_event

log = logging.getLogger(__name__)


class EventLike(Protocol):
    type: str
    reason: str
    message: str


class EventPoster:
    """Posts core Events about objects of one ``kind`` through ``lanes`` single-thread executors.

    With no lanes, or after :meth:`shutdown`, events are posted inline by the caller (the operator is stopping,
    and what it says last is still worth saying).
    """

    def __init__(self, api_client: Any, kind: str, lanes: int = 4) -> None:
        self.api_client = api_client
        self.kind = kind
        self._lanes = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{kind.lower()}-events-{i}") for i in range(lanes)
        ]
        self._shut = False
        self._lock = threading.Lock()

    def lane(self, obj: Mapping[str, Any]) -> int:
        """The lane of ``obj``: by uid (stable for the object's life; its name when it has none yet)."""
        meta = obj["metadata"]
        key = meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"
        return zlib.crc32(str(key).encode()) % len(self._lanes)

    def post(self, obj: Mapping[str, Any], events: Sequence[EventLike]) -> None:
        if not events:
            return
        body = {"metadata": dict(obj["metadata"])}  # the object may change under the lane; its identity does not
        batch = list(events)
        with self._lock:
            if not self._shut and self._lanes:
                try:
                    self._lanes[self.lane(obj)].submit(self._post_in_order, body, batch)
                    return
                except RuntimeError:
                    pass  # the interpreter is shutting down: post below
        self._post_in_order(body, batch)

    def _post_in_order(self, body: Mapping[str, Any], events: Sequence[EventLike]) -> None:
        for event in events:
            try:
                create_event(self.api_client, body, self.kind, event.type, event.reason, event.message)
            except Exception as exc:  # one lost Event is logged; the ones after it still go out
                log.warning(
                    "Could not post an event kind=%s name=%s reason=%s error=%s",
                    self.kind,
                    body["metadata"].get("name"),
                    event.reason,
                    str(exc)[:300],
                )

    def shutdown(self) -> None:
        """Stop taking events on the lanes; those already asked for still go out."""
        with self._lock:
            self._shut = True
        for lane in self._lanes:
            lane.shutdown(wait=False)
