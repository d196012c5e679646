"""Step 3, model and tokenizer: load the base (safetensors only), quantize for QLoRA, attach LoRA/DoRA."""

from __future__ import annotations

import contextlib
import dataclasses
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
        bf16 = torch.cuda.is_bf16_supported()
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


def load_base(
    model_dir: Path, spec: LoRAJobSpec, rt: Runtime, *, quantized: bool | None = None, dtype: Any = None
) -> Any:
    """The frozen base: in ``dtype`` (default the runtime's), or 4-bit NF4 (double quant) for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_model_dir(model_dir)
    quantized = rt.quantized if quantized is None else quantized
    dtype = dtype or rt.dtype
    kwargs: dict[str, Any] = {
        "trust_remote_code": spec.base_model.trust_remote_code,
        "use_safetensors": True,
        "dtype": dtype,
    }
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["device_map"] = {"": 0} if rt.device == "cuda" else {"": "cpu"}
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as e:
        raise BaseModelNotFoundError(f"cannot load the base model: {e}") from e
    if not quantized:
        model.to(rt.device)
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
    elif gc:
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config(spec))
    return peft_model


def trainable_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def quantized_layers(model: Any) -> int:
    """How many layers hold 4-bit weights (bitsandbytes ``Linear4bit``)."""
    return sum(
        1 for m in model.modules() if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
    )


def load_for_training(model_dir: Path, spec: LoRAJobSpec, rt: Runtime) -> tuple[Any, Any]:
    """(peft model, tokenizer)."""
    import torch

    torch.manual_seed(spec.training.seed)
    tok = load_tokenizer(model_dir, spec.base_model.trust_remote_code)
    base = load_base(model_dir, spec, rt)
    model = attach_adapter(base, spec, rt)
    return model, tok
