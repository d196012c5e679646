"""Where kopf keeps its own state on our objects, shared by the full operator and the standalone adapter one.

Either process can take over the other's objects, so both must read and write the same annotations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import kopf

from kubelora.api.v1alpha1 import GROUP

PREFIX = "kubelora.dev"
FINALIZER = "kubelora.dev/cleanup"


class OwnKindsDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's last-handled-configuration, built only where a change handler can use it.

    kopf builds this essence, a deep copy of the whole body, for every event of every kind it watches. Only
    our own kinds have change (create/update/delete) handlers; for pods, Jobs and Deployments, watched for
    events and indexes alone, the copy was thrown away, and it was a sixth of the operator's CPU with a
    thousand LoRAJobs starting (bench/operator.py). Our own kinds' status, which the essence drops anyway, is
    left out before the copy.
    """

    def build(self, *, body: Any, extra_fields: Iterable[Any] | None = None) -> Any:
        if not str(body.get("apiVersion", "")).startswith(f"{GROUP}/"):
            return {}
        if not extra_fields:
            metadata = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
            stripped: Any = {**{k: v for k, v in body.items() if k != "status"}, "metadata": metadata}
            body = kopf.Body(stripped)
        return super().build(body=body, extra_fields=extra_fields)


def configure(settings: kopf.OperatorSettings) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = OwnKindsDiffBase(prefix=PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
