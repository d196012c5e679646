"""Reading a LoRAJob manifest or bare spec, YAML or JSON, and resolving defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubelora.trainer import config
from kubelora.trainer.errors import InvalidSpecError, RankTooLargeError

pytestmark = pytest.mark.trainer

SPEC = {
    "baseModel": {"uri": "s3://models/tiny/"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://adapters/a/"},
}


def test_manifest_yaml_and_bare_json(tmp_path: Path) -> None:
    manifest = {
        "apiVersion": "kubelora.dev/v1alpha1",
        "kind": "LoRAJob",
        "metadata": {"name": "j", "namespace": "ns"},
        "spec": SPEC,
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    (tmp_path / "s.json").write_text(json.dumps(SPEC))
    a = config.load(tmp_path / "m.yaml", workdir=tmp_path)
    b = config.load(tmp_path / "s.json", workdir=tmp_path)
    assert (a.job_name, a.namespace) == ("j", "ns") and b.job_name is None
    assert a.spec == b.spec
    assert a.epochs == 1.0 and a.max_steps is None  # neither set: one epoch


def test_max_steps_kept(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**SPEC, "training": {"maxSteps": 7}}))
    cfg = config.load(tmp_path / "s.yaml", workdir=tmp_path)
    assert cfg.max_steps == 7 and cfg.epochs is None
    assert cfg.hyperparameters()["maxSteps"] == 7


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({**SPEC, "lora": {"rank": 1024}}, "spec.lora.rank: Input should be less than or equal to 512"),
        ({**SPEC, "method": "full"}, "spec.method: Input should be 'lora', 'qlora' or 'dora'"),
        ({**SPEC, "bogus": 1}, "spec.bogus: Extra inputs are not permitted"),
        ({k: v for k, v in SPEC.items() if k != "output"}, "spec.output: Field required"),
        ({**SPEC, "training": {"epochs": 1, "maxSteps": 3}}, "epochs and maxSteps are mutually exclusive"),
    ],
)
def test_invalid_specs(tmp_path: Path, body: dict[str, object], message: str) -> None:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(body))
    with pytest.raises(InvalidSpecError) as e:
        config.load(tmp_path / "s.yaml", workdir=tmp_path)
    assert message in str(e.value)
    assert e.value.exit_code == 3


def test_rank_limit_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**SPEC, "lora": {"rank": 128}}))
    monkeypatch.setenv("KUBELORA_MAX_LORA_RANK", "64")
    with pytest.raises(RankTooLargeError, match="128 is above the limit of 64"):
        config.load(tmp_path / "s.yaml", workdir=tmp_path)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpecError, match="Cannot read spec file"):
        config.load(tmp_path / "missing.yaml", workdir=tmp_path)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(InvalidSpecError, match="expected a LoRAJob manifest or a spec mapping"):
        config.load(tmp_path / "list.yaml", workdir=tmp_path)
    (tmp_path / "kind.yaml").write_text(yaml.safe_dump({"kind": "AdapterDeployment", "spec": SPEC}))
    with pytest.raises(InvalidSpecError, match="Expected kind LoRAJob"):
        config.load(tmp_path / "kind.yaml", workdir=tmp_path)
