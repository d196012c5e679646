"""Step 3, model and tokenizer: load the base (safetensors only), quantize for QLoRA, attach LoRA/DoRA."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from kubelora.api.v1alpha1 import LoRAJobSpec
from kubelora.trainer.errors import BaseModelNotFoundError, QuantizationUnavailableError, UnsafeWeightsError
from kubelora.trainer.estimate import LinearShape, linear_layers_from_model
from kubelora.trainer.fetch import UNSAFE_WEIGHT_SUFFIXES
from kubelora.trainer.report import kv

log = logging.getLogger(__name__)


def quiet_libraries() -> None:
    """No download progress bars or deprecation chatter from the ML libraries in our logs."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with contextlib.suppress(Exception):
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@dataclasses.dataclass
class Runtime:
    """Where and in what precision training runs."""

    device: str  # "cuda" or "cpu"
    dtype: Any  # torch dtype of the frozen base (and autocast), e.g. torch.bfloat16
    quantized: bool
    bf16: bool
    fp16: bool

    @property
    def precision_name(self) -> str:
        if self.quantized:
            return "nf4"
        return (
            str(self.dtype)
            .removeprefix("torch.")
            .replace("bfloat16", "bf16")
            .replace("float32", "fp32")
            .replace("float16", "fp16")
        )


def choose_runtime(method: str) -> Runtime:
    import torch

    quantized = method == "qlora"
    if torch.cuda.is_available():
        # bf16 only where the GPU computes it natively (Ampere, compute capability 8.0, and later);
        # ``is_bf16_supported()`` also says yes for emulated bf16 on older GPUs, which is slow.
        bf16 = torch.cuda.get_device_capability()[0] >= 8
        dtype = torch.bfloat16 if bf16 else torch.float16
        return Runtime("cuda", dtype, quantized, bf16=bf16, fp16=not bf16)
    # CPU: full precision for LoRA/DoRA; QLoRA keeps the bf16 compute dtype of its 4-bit layers.
    if quantized:
        return Runtime("cpu", torch.bfloat16, True, bf16=False, fp16=False)
    return Runtime("cpu", torch.float32, False, bf16=False, fp16=False)


def configure_cpu_threads(base_config: dict[str, Any], rt: Runtime) -> int | None:
    """Intra-op threads on CPU: ``KUBELORA_CPU_THREADS``, else 1 for small models.

    Tiny matrices gain nothing from OpenMP, and on shared cores its spin-waiting threads make a step
    10-20x slower than one thread. Larger models keep torch's default. Returns the count set, if any.
    """
    if rt.device != "cpu":
        return None
    import torch

    raw = os.environ.get("KUBELORA_CPU_THREADS")
    if raw:
        n = max(1, int(raw))
    elif "OMP_NUM_THREADS" in os.environ:
        return None
    elif int(base_config.get("hidden_size") or 0) and int(base_config["hidden_size"]) <= 512:
        n = 1
    else:
        return None
    torch.set_num_threads(n)
    return n


def attn_implementation(rt: Runtime) -> str:
    """sdpa by default; flash-attention 2 on a GPU with ``flash_attn`` installed (fp16/bf16 only), else
    the Hub kernel through ``kernels`` when that is installed. Packed, padding-free batches are
    masked per row by all three (varlen kernels take the row boundaries from ``position_ids``)."""
    if rt.device == "cuda" and rt.dtype is not None and str(rt.dtype) != "torch.float32":
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        if importlib.util.find_spec("kernels") is not None:
            return "kernels-community/flash-attn2"
    return "sdpa"


def check_model_dir(model_dir: Path) -> None:
    """A usable base: config.json and safetensors weights (pickled weights are refused)."""
    if not (model_dir / "config.json").is_file():
        raise BaseModelNotFoundError(f"{model_dir}: no config.json")
    names = [p.name for p in model_dir.iterdir() if p.is_file()]
    if not any(n.endswith(".safetensors") for n in names):
        unsafe = [n for n in names if n.endswith(UNSAFE_WEIGHT_SUFFIXES)]
        if unsafe:
            raise UnsafeWeightsError(
                f"the base model has only pickled weights ({unsafe[0]}); only safetensors are loaded"
            )
        raise BaseModelNotFoundError("the base model has no *.safetensors weights")


def check_bitsandbytes(device: str) -> None:
    """QLoRA needs bitsandbytes that can quantize and run a 4-bit layer on this device."""
    try:
        import bitsandbytes as bnb
        import torch
    except Exception as e:  # ImportError, or a broken native library
        raise QuantizationUnavailableError(f"QLoRA needs bitsandbytes: {e}") from e
    try:
        layer = bnb.nn.Linear4bit(
            16, 16, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True
        )
        layer = layer.to(device)
        x = torch.randn(2, 16, dtype=torch.bfloat16, device=device, requires_grad=True)
        layer(x).float().sum().backward()
    except Exception as e:
        raise QuantizationUnavailableError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit NF4 on {device}: {e}"
        ) from e


def read_config(model_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((model_dir / "config.json").read_text()))
    except FileNotFoundError as e:
        raise BaseModelNotFoundError(f"{model_dir}: no config.json") from e
    except json.JSONDecodeError as e:
        raise BaseModelNotFoundError(f"{model_dir}/config.json is not valid JSON: {e}") from e


def meta_model(model_dir: Path, trust_remote_code: bool) -> Any:
    """The model built from its config on the meta device: shapes and module names, no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def meta_linear_layers(model_dir: Path, trust_remote_code: bool) -> list[LinearShape]:
    try:
        return linear_layers_from_model(meta_model(model_dir, trust_remote_code))
    except (ValueError, OSError, ImportError) as e:
        raise BaseModelNotFoundError(f"cannot build the base model from its config.json: {e}") from e


def load_tokenizer(model_dir: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BaseModelNotFoundError(f"cannot load the tokenizer of the base model: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def device_for_process(rt: Runtime) -> str:
    """This process's device: its own GPU (``cuda:<LOCAL_RANK>``) under torchrun, or the CPU."""
    from kubelora.trainer.distributed import local_rank

    return f"cuda:{local_rank()}" if rt.device == "cuda" else "cpu"


def quantization_config(rt: Runtime, strategy: str = "Single") -> Any:
    """NF4 with double quantization, computing in the runtime's dtype. Under FSDP the 4-bit weights are stored
    in the compute dtype (``bnb_4bit_quant_storage``), so FSDP can shard them with the other weights (as peft's
    and bitsandbytes' FSDP-QLoRA guides do); otherwise in uint8."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = rt.dtype if rt.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute if strategy == "FSDP" else torch.uint8,
    )


def load_base(
    model_dir: Path,
    spec: LoRAJobSpec,
    rt: Runtime,
    *,
    quantized: bool | None = None,
    dtype: Any = None,
    strategy: str = "Single",
) -> Any:
    """The frozen base: in ``dtype`` (default the runtime's), or 4-bit NF4 (double quant) for QLoRA; on this
    process's GPU (its local rank) or the CPU. Under FSDP a quantized base is not placed: FSDP moves its shards."""
    from transformers import AutoModelForCausalLM

    check_model_dir(model_dir)
    quantized = rt.quantized if quantized is None else quantized
    dtype = dtype or rt.dtype
    kwargs: dict[str, Any] = {
        "trust_remote_code": spec.base_model.trust_remote_code,
        "use_safetensors": True,
        "dtype": dtype,
        "attn_implementation": attn_implementation(rt),
    }
    device = device_for_process(rt)
    if quantized:
        kwargs["quantization_config"] = quantization_config(rt, strategy)
        if strategy == "FSDP":
            kwargs["dtype"] = kwargs["quantization_config"].bnb_4bit_quant_storage
        else:
            kwargs["device_map"] = {"": local_device_index(device)}
    model: Any = None
    if kwargs["attn_implementation"] != "sdpa":
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        except (OSError, ValueError, ImportError) as e:
            # e.g. a Hub kernel that cannot be fetched offline, or a flash-attn build for another torch
            log.warning(kv("Fast attention unavailable, using sdpa", attention=kwargs["attn_implementation"], error=e))
            kwargs["attn_implementation"] = "sdpa"
    if model is None:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        except (OSError, ValueError) as e:
            raise BaseModelNotFoundError(f"cannot load the base model: {e}") from e
    if not quantized and strategy != "FSDP":
        model.to(device)
    model.config.use_cache = False
    return model


def lora_config(spec: LoRAJobSpec) -> Any:
    from peft import LoraConfig

    targets = spec.lora.target_modules
    alpha = spec.lora.alpha
    return LoraConfig(
        r=spec.lora.rank,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,  # type: ignore[arg-type]
        lora_dropout=spec.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        use_rslora=spec.lora.rs_lora,
        use_dora=spec.method == "dora",
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_adapter(model: Any, spec: LoRAJobSpec, rt: Runtime) -> Any:
    """Wrap the base in a trainable peft model (with k-bit preparation for QLoRA)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    gc = spec.training.gradient_checkpointing
    if rt.quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        cast_frozen_to_compute_dtype(model, rt.dtype)
    elif gc:
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config(spec))
    return peft_model


def cast_frozen_to_compute_dtype(model: Any, dtype: Any) -> int:
    """Cast what ``prepare_model_for_kbit_training`` upcast to fp32 back to the compute dtype.

    peft upcasts every non-quantized parameter (embeddings, ``lm_head``, norms) to fp32 for stability,
    which for a 0.5B-8B model with a 150k vocabulary costs gigabytes (and the memory estimate counts
    them at 2 bytes). The frozen ones go back to the compute dtype; norms compute in fp32 internally
    anyway (``x.to(float32)`` in RMSNorm). Returns the number of parameters cast.
    """
    import torch

    n = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            continue
        for p in module.parameters(recurse=False):
            if p.dtype == torch.float32 and not p.requires_grad:
                p.data = p.data.to(dtype)
                n += p.numel()
    return n


def trainable_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def quantized_layers(model: Any) -> int:
    """How many layers hold 4-bit weights (bitsandbytes ``Linear4bit``)."""
    return sum(
        1 for m in model.modules() if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
    )


def local_device_index(device: str) -> int | str:
    """``cuda:3`` → 3 (a device_map entry), ``cpu`` → ``"cpu"``."""
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else device


def load_for_training(
    model_dir: Path, spec: LoRAJobSpec, rt: Runtime, tok: Any = None, *, strategy: str = "Single"
) -> tuple[Any, Any]:
    """(peft model, tokenizer); pass the tokenizer when it was loaded before (to render the data). The seed is
    the same on every rank, so each starts from the same adapter weights (DDP broadcasts rank 0's anyway)."""
    import torch

    torch.manual_seed(spec.training.seed)
    if tok is None:
        tok = load_tokenizer(model_dir, spec.base_model.trust_remote_code)
    base = load_base(model_dir, spec, rt, strategy=strategy)
    model = attach_adapter(base, spec, rt)
    return model, tok
