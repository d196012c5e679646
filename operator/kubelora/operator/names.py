"""Names, label values and ownership of a LoRAJob's children: deterministic, and short enough for Kubernetes.

A LoRAJob's name may have 253 characters (a DNS subdomain), but a Job's name ends up in its pods'
``job-name`` label (at most 63 characters) and every label value has at most 63. Identity never rests
on these names: children are found by the UID in their controller ownerReference. The names are for
people, and for a restarted operator to create the same Job rather than a second one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

LABEL_VALUE_MAX = 63
JOB_SUFFIX = "train"
HASH_LENGTH = 8


def short_hash(text: str, length: int = HASH_LENGTH) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _prefix(name: str, limit: int) -> str:
    """The start of `name`, at most `limit` characters, dots made dashes, ending in a letter or digit."""
    return name[:limit].replace(".", "-").rstrip("-")


def job_name(lorajob_name: str, lorajob_uid: str | None, nodes: int = 1) -> str:
    """``<name>-train-<8 hex digits of the UID's sha256>``, the name cut so the whole fits 63 characters.

    The UID makes a LoRAJob deleted and re-created under the same name get a Job of another name, so the
    new one never meets the old Job (still being garbage-collected) at all. A multi-node (Indexed) Job's pods
    are named and hostnamed ``<job>-<index>``, a DNS label too, so its name leaves room for ``-<nodes - 1>``.
    """
    tail = f"-{JOB_SUFFIX}-{short_hash(lorajob_uid or lorajob_name)}"
    reserve = len(f"-{nodes - 1}") if nodes > 1 else 0
    return _prefix(lorajob_name, LABEL_VALUE_MAX - len(tail) - reserve) + tail


def service_name(job: str) -> str:
    """The headless Service of a multi-node Job: the Job's name, which must start with a letter (DNS-1035)."""
    return job if job[:1].isalpha() else f"j{job}"[:LABEL_VALUE_MAX].rstrip("-")


def label_value(lorajob_name: str) -> str:
    """The name as a label value: itself up to 63 characters, else its start and a hash of the whole name."""
    if len(lorajob_name) <= LABEL_VALUE_MAX:
        return lorajob_name
    tail = f"-{short_hash(lorajob_name)}"
    return lorajob_name[: LABEL_VALUE_MAX - len(tail)].rstrip("-.") + tail


def run_directory(lorajob_name: str, lorajob_uid: str | None) -> str:
    """A file name for a local run: the name's start and the whole UID (file names have 255 bytes)."""
    return f"{_prefix(lorajob_name, 100)}-{lorajob_uid or short_hash(lorajob_name)}"


def controller_uid(metadata: Mapping[str, Any], api_version: str, kind: str) -> str | None:
    """The UID of the object's controller ownerReference, if that controller is of this kind."""
    for ref in metadata.get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == kind and ref.get("apiVersion") == api_version:
            uid = ref.get("uid")
            return str(uid) if uid else None
    return None
