"""Evaluation metrics over (prediction, expected) pairs, and gate verdicts. Pure Python."""

from __future__ import annotations

import collections
import json
import math
import re
import string
from collections.abc import Sequence
from typing import Any

from kubelora.api.v1alpha1 import Gate, GateVerdict

LOWER_IS_BETTER = frozenset({"loss", "perplexity"})
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower case, no punctuation or articles, single spaces (as SQuAD scores answers)."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize(pred) == normalize(gold))


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p and not g:
        return 1.0
    if not p or not g:
        return 0.0
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def match_label(pred: str, labels: Sequence[str]) -> str | None:
    """The label a prediction names: an exact (normalized) match, else the first label mentioned in it."""
    norm = normalize(pred)
    by_norm = {normalize(label): label for label in labels}
    if norm in by_norm:
        return by_norm[norm]
    words = f" {norm} "
    best: tuple[int, str] | None = None
    for n, label in by_norm.items():
        if not n:
            continue
        i = words.find(f" {n} ")
        if i >= 0 and (best is None or i < best[0]):
            best = (i, label)
    return best[1] if best else None


def parse_json(text: str) -> tuple[bool, Any]:
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`")
        text = text.removeprefix("json").strip()
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return False, None


def generation_metrics(
    preds: Sequence[str], golds: Sequence[str], metrics: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, float]:
    """Mean of each requested generation metric; loss and perplexity are computed elsewhere."""
    n = len(preds)
    out: dict[str, float] = {}
    if n == 0:
        return out
    if "exact_match" in metrics:
        out["exact_match"] = sum(exact_match(p, g) for p, g in zip(preds, golds, strict=True)) / n
    if "f1" in metrics:
        out["f1"] = sum(token_f1(p, g) for p, g in zip(preds, golds, strict=True)) / n
    if "accuracy" in metrics:
        label_set = list(labels) if labels else sorted(set(golds))
        hits = 0
        for p, g in zip(preds, golds, strict=True):
            want = match_label(g, label_set) or g
            hits += int(match_label(p, label_set) == want)
        out["accuracy"] = hits / n
    if "json_valid" in metrics or "json_match" in metrics:
        parsed = [parse_json(p) for p in preds]
        if "json_valid" in metrics:
            out["json_valid"] = sum(ok for ok, _ in parsed) / n
        if "json_match" in metrics:
            hits = 0
            for (ok, value), g in zip(parsed, golds, strict=True):
                gok, gvalue = parse_json(g)
                hits += int(ok and gok and value == gvalue)
            out["json_match"] = hits / n
    return out


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def judge(gates: Sequence[Gate], base: dict[str, float], adapter: dict[str, float]) -> list[GateVerdict]:
    """One verdict per rule set on each gate (min, max, minImprovementOverBase)."""
    verdicts: list[GateVerdict] = []
    for gate in gates:
        value, base_value = adapter.get(gate.metric), base.get(gate.metric)
        rules: list[tuple[str, float]] = []
        if gate.min is not None:
            rules.append(("min", gate.min))
        if gate.max is not None:
            rules.append(("max", gate.max))
        if gate.min_improvement_over_base is not None:
            rules.append(("minImprovementOverBase", gate.min_improvement_over_base))
        for rule, threshold in rules:
            if value is None or math.isnan(value):
                verdicts.append(
                    GateVerdict(
                        metric=gate.metric,
                        rule=rule,
                        threshold=threshold,
                        value=None,
                        base_value=base_value,
                        passed=False,
                        message=f"{gate.metric} was not measured",
                    )
                )
                continue
            if rule == "min":
                passed = value >= threshold
                msg = f"{gate.metric} {value:.4g} {'>=' if passed else '<'} {threshold:.4g}"
            elif rule == "max":
                passed = value <= threshold
                msg = f"{gate.metric} {value:.4g} {'<=' if passed else '>'} {threshold:.4g}"
            else:
                if base_value is None:
                    verdicts.append(
                        GateVerdict(
                            metric=gate.metric,
                            rule=rule,
                            threshold=threshold,
                            value=value,
                            base_value=None,
                            passed=False,
                            message=f"{gate.metric} of the base was not measured",
                        )
                    )
                    continue
                gain = base_value - value if gate.metric in LOWER_IS_BETTER else value - base_value
                passed = gain >= threshold
                msg = f"{gate.metric} improved by {gain:.4g} over the base ({base_value:.4g} -> {value:.4g}), " + (
                    f"at least {threshold:.4g}" if passed else f"less than {threshold:.4g}"
                )
            verdicts.append(
                GateVerdict(
                    metric=gate.metric,
                    rule=rule,
                    threshold=threshold,
                    value=value,
                    base_value=base_value,
                    passed=passed,
                    message=msg,
                )
            )
    return verdicts
