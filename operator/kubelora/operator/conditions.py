"""Kubernetes-style conditions, keyed by type."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from kubelora.api.v1alpha1 import Condition


def now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool | str,
    reason: str,
    message: str = "",
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """Return conditions with `type_` set; lastTransitionTime moves only when the status changes."""
    status_text = status if isinstance(status, str) else ("True" if status else "False")
    previous = next((c for c in conditions if c.get("type") == type_), None)
    transition = now()
    if previous is not None and previous.get("status") == status_text:
        transition = previous.get("lastTransitionTime") or transition
    condition = Condition(
        type=type_,
        status=status_text,  # type: ignore[arg-type]
        reason=reason,
        message=message[:1024],
        last_transition_time=transition,
        observed_generation=generation,
    ).model_dump(by_alias=True, exclude_none=True)
    return [c for c in conditions if c.get("type") != type_] + [condition]


def get_condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def create_event(api_client: Any, obj: Mapping[str, Any], kind: str, type_: str, reason: str, message: str) -> None:
    """Post a core Event about ``obj`` through the API (outside kopf's handlers, kopf's poster is not there)."""
    from kubernetes import client

    meta = obj["metadata"]
    timestamp = now()
    manifest: Any = {
        "metadata": {"generateName": f"{meta['name'][:200]}."},
        "involvedObject": {
            "apiVersion": "kubelora.dev/v1alpha1",
            "kind": kind,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "kubelora"},
        "reportingComponent": "kubelora",
        "firstTimestamp": timestamp,
        "lastTimestamp": timestamp,
        "count": 1,
    }
    # The answer is not read: decoding it into V1Event models only costs CPU. Errors still raise.
    response: Any = client.CoreV1Api(api_client).create_namespaced_event(
        meta["namespace"], manifest, _preload_content=False
    )
    response.drain_conn()
