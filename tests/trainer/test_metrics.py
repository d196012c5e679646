"""Metrics and gate verdicts."""

from __future__ import annotations

import math

import pytest

from kubelora.api.v1alpha1 import Gate
from kubelora.trainer.metrics import exact_match, generation_metrics, judge, match_label, token_f1

pytestmark = pytest.mark.trainer


def test_exact_match_and_f1() -> None:
    assert exact_match(" The Billing. ", "billing") == 1.0
    assert exact_match("billing dept", "billing") == 0.0
    assert token_f1("billing dept", "billing") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_accuracy_maps_outputs_to_labels() -> None:
    labels = ["billing", "technical", "account"]
    assert match_label("It is a technical issue", labels) == "technical"
    assert match_label("account", labels) == "account"
    assert match_label("no idea", labels) is None
    m = generation_metrics(
        ["technical problem", "billing", "??"], ["technical", "account", "billing"], ["accuracy", "exact_match"], labels
    )
    assert m == {"exact_match": pytest.approx(0.0), "accuracy": pytest.approx(1 / 3)}


def test_json_metrics() -> None:
    preds = ['{"a": 1}', '```json\n{"a": 2}\n```', "not json"]
    golds = ['{"a":1}', '{"a": 1}', '{"a": 1}']
    m = generation_metrics(preds, golds, ["json_valid", "json_match"])
    assert m == {"json_valid": pytest.approx(2 / 3), "json_match": pytest.approx(1 / 3)}


def test_gates() -> None:
    base = {"exact_match": 0.25, "loss": 2.0}
    adapter = {"exact_match": 0.9, "loss": 1.5}
    v = judge(
        [
            Gate(metric="exact_match", min=0.8),
            Gate(metric="exact_match", min_improvement_over_base=0.7),
            Gate(metric="loss", max=1.0),
            Gate(metric="loss", min_improvement_over_base=0.4),
            Gate(metric="f1", min=0.1),
        ],
        base,
        adapter,
    )
    assert [(x.rule, x.passed) for x in v] == [
        ("min", True),
        ("minImprovementOverBase", False),  # 0.65 < 0.7
        ("max", False),
        ("minImprovementOverBase", True),  # loss fell by 0.5
        ("min", False),  # not measured
    ]
    assert v[1].base_value == 0.25 and math.isclose(v[1].value or 0, 0.9)
    assert "not measured" in v[4].message
