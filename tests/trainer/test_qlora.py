"""QLoRA on CPU: 4-bit NF4 base (bitsandbytes), LoRA trained on it, evaluated on the bf16 and the 4-bit base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubelora.trainer import tiny
from tests.trainer.helpers import TinyKit, make_spec, run_trainer, s3_json

pytestmark = [pytest.mark.trainer, pytest.mark.filterwarnings("ignore::FutureWarning")]


def test_four_bit_load_forward_backward_on_cpu(tiny_kit: TinyKit) -> None:
    """The pieces QLoRA needs, in process: NF4 double-quant load, forward, LoRA backward."""
    import torch

    from kubelora.api.v1alpha1 import LoRAJobSpec
    from kubelora.trainer import modeling

    modeling.check_bitsandbytes("cpu")
    spec = LoRAJobSpec.model_validate(
        {
            "baseModel": {"uri": f"file://{tiny_kit.model}"},
            "dataset": {"train": "file:///x"},
            "method": "qlora",
            "output": {"uri": "file:///y"},
            "lora": {"rank": 4},
        }
    )
    rt = modeling.choose_runtime("qlora")
    model = modeling.attach_adapter(modeling.load_base(tiny_kit.model, spec, rt), spec, rt)
    assert modeling.quantized_layers(model) == 21  # 7 linear layers x 3 blocks; the head stays unquantized
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert q.weight.dtype == torch.uint8 and q.weight.quant_state.quant_type == "nf4"
    # prepare_model_for_kbit_training upcasts the rest to fp32; it goes back to the compute dtype (what the
    # estimate counts): embeddings, lm_head and every norm
    base = model.base_model.model
    assert rt.dtype == torch.bfloat16
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    norms = [m for n, m in base.named_modules() if n.endswith("norm")]
    assert len(norms) == 7 and all(m.weight.dtype == torch.bfloat16 for m in norms)
    assert not [n for n, p in model.named_parameters() if p.dtype == torch.float32 and not p.requires_grad]
    ids = torch.randint(10, 90, (2, 12))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    assert len(grads) == 42 and all("lora_" in n for n in grads)


@pytest.mark.e2e
def test_qlora_end_to_end_on_cpu(
    tiny_kit: TinyKit, tmp_path: Path, minio_client: Any, bucket: str, s3_env: dict[str, str]
) -> None:
    uris = {
        "base": tiny.upload_dir(minio_client, bucket, "models/tiny", tiny_kit.model),
        "train": tiny.upload_file(minio_client, bucket, "data/train.jsonl", tiny_kit.train),
        "test": tiny.upload_file(minio_client, bucket, "data/test.jsonl", tiny_kit.test),
    }
    spec = make_spec(output=f"s3://{bucket}/q/", method="qlora", **uris)
    run = run_trainer(tmp_path, spec, env=s3_env)
    assert run.returncode == 0, run.stderr[-3000:]
    model = run.of("model")[0]
    assert model["precision"] == "nf4" and model["quantizedLayers"] == 21
    assert run.of("estimate")[-1]["weightPrecision"] == "nf4"
    ev = run.result["eval"]
    # scored on the bf16 base it will be served on, and on the 4-bit base it was trained against
    assert ev["passed"] is True
    assert ev["base"]["exact_match"] <= 0.3
    assert ev["adapter"]["exact_match"] >= 0.8
    assert ev["adapterTrainingPrecision"]["exact_match"] >= 0.8
    key = f"q/sha256/{run.result['adapter']['digest'].removeprefix('sha256:')}"
    assert run.result["adapter"]["uri"] == f"s3://{bucket}/{key}/"
    manifest = s3_json(minio_client, bucket, f"{key}/kubelora-manifest.json")
    assert manifest["adapter"]["trainingPrecision"] == "nf4" and manifest["adapter"]["method"] == "qlora"
    assert s3_json(minio_client, bucket, f"{key}/eval/results.json")["servingPrecision"] == "bf16"
