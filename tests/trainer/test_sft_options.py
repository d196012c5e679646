"""Choices made for the machine: compute dtype, attention, optimizer, kernels, sampling; the loss figure."""

from __future__ import annotations

import pytest

from kubelora.trainer import modeling, train

pytestmark = pytest.mark.trainer


@pytest.mark.parametrize(("capability", "bf16"), [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_only_where_the_gpu_computes_it_natively(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], bf16: bool
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulated bf16 says yes too
    for method in ("lora", "qlora"):
        rt = modeling.choose_runtime(method)
        assert (rt.bf16, rt.fp16) == (bf16, not bf16)
        assert rt.dtype == (torch.bfloat16 if bf16 else torch.float16)


def test_speed_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    cpu = modeling.Runtime("cpu", torch.float32, False, bf16=False, fp16=False)
    gpu = modeling.Runtime("cuda", torch.bfloat16, False, bf16=True, fp16=False)
    qgpu = modeling.Runtime("cuda", torch.bfloat16, True, bf16=True, fp16=False)
    assert train.speed_options(cpu, packing=True) == {
        "optim": "adamw_torch",
        "use_liger_kernel": False,
        "group_by_length": False,
    }
    assert train.speed_options(cpu, packing=False)["group_by_length"] is True
    assert train.speed_options(gpu, packing=True)["optim"] == "adamw_torch_fused"
    assert train.speed_options(qgpu, packing=True)["optim"] == "paged_adamw_32bit"
    assert modeling.attn_implementation(cpu) == "sdpa"
    monkeypatch.setattr(train, "_has", lambda m: m == "liger_kernel")
    assert train.speed_options(gpu, packing=True)["use_liger_kernel"] is True
    assert train.speed_options(cpu, packing=True)["use_liger_kernel"] is False

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name))
    assert modeling.attn_implementation(gpu) == "flash_attention_2"
    assert modeling.attn_implementation(cpu) == "sdpa"


def test_mean_logged_loss_uses_the_whole_history() -> None:
    history = [{"loss": 4.0, "step": 1}, {"loss": 2.0, "step": 2}, {"eval_loss": 9.0, "step": 2}, {"loss": 3.0}]
    assert train.mean_logged_loss(history) == pytest.approx(3.0)
    assert train.mean_logged_loss([]) is None
