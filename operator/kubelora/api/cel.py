"""Validation rules that live next to the API fields they guard.

A :class:`Rule` carries the CEL expression the API server evaluates (emitted into the CRD as
``x-kubernetes-validations``) together with a Python predicate that checks the same thing offline,
so the operator, the trainer and ``kubectl apply`` reject the same objects with the same message.

Messages name the field and the rule, e.g. ``spec.training: epochs and maxSteps are mutually exclusive``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

Reason = Literal["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"]

VALIDATIONS_KEY = "x-kubernetes-validations"
IMMUTABLE_KEY = "x-kubelora-immutable"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One validation rule: a CEL expression for the API server and its Python mirror.

    ``check`` receives the validated model instance (``self`` in CEL) and returns True when the rule holds;
    for a ``transition`` rule (one that reads ``oldSelf``) it receives the old and the new instance.
    ``field_path`` is relative to the object the rule is attached to (``.resources.gpus``) and makes the API
    server report the error on that field rather than on the object.
    """

    cel: str
    message: str
    check: Callable[..., bool]
    field_path: str | None = None
    reason: Reason | None = None
    transition: bool = False

    def to_openapi(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.cel, "message": self.message}
        if self.field_path is not None:
            out["fieldPath"] = self.field_path
        if self.reason is not None:
            out["reason"] = self.reason
        return out


def immutable_rule(path: str) -> dict[str, Any]:
    """The transition rule that makes a field immutable once set (``self == oldSelf``).

    CEL only evaluates transition rules on updates where the field exists in both the old and the new object;
    removal and addition of optional fields are guarded by a rule on the parent.
    """
    return {"rule": "self == oldSelf", "message": f"{path}: is immutable once set", "reason": "FieldValueInvalid"}


def immutable(path: str) -> dict[str, Any]:
    """``json_schema_extra`` for a field that cannot change after the object is created."""
    return {VALIDATIONS_KEY: [immutable_rule(path)], IMMUTABLE_KEY: path}


def presence_fixed(field: str, attribute: str, path: str) -> Rule:
    """The parent's transition rule that an optional immutable field can be neither added nor removed.

    ``field`` is the JSON name (``secretRef``), ``attribute`` the model's (``secret_ref``), ``path`` the
    field's path in messages (``spec.output.secretRef``).
    """
    return Rule(
        cel=f"has(self.{field}) == has(oldSelf.{field})",
        message=f"{path}: is immutable once set; it cannot be added or removed after creation",
        check=lambda old, new: (getattr(old, attribute) is None) == (getattr(new, attribute) is None),
        transition=True,
    )
