"""Resource estimate for a LoRA/QLoRA/DoRA run, from a base model's ``config.json``. No torch needed.

Used by the trainer (reported in every run, and to refuse a run that cannot fit on its GPU), by the
operator and by ``kubelora estimate``. The trainable-parameter count is exact: it equals what
peft reports for the same targets on the real model. Memory and GPU-hours are rough.

Dense decoder families (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, olmo2,
granite) are known by shape; for others the trainer passes the model's linear layers found on a
meta-device model (:func:`linear_layers_from_model`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

from kubelora.trainer.errors import TrainerError, UnknownTargetModulesError

GIB = 1 << 30

#: Dense bf16 tensor TFLOPS per GPU (no sparsity), matched as a substring of the GPU product label.
GPU_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "A6000": 155.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L4": 121.0,
    "4090": 165.0,
    "3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}
#: Memory in GiB when the label does not say (e.g. ``NVIDIA-A100-SXM4-80GB`` does).
GPU_MEMORY_GIB = {
    "H200": 141,
    "H100": 80,
    "GH200": 96,
    "B200": 180,
    "A100": 40,
    "L40S": 48,
    "L40": 48,
    "A6000": 48,
    "A10G": 24,
    "A10": 24,
    "L4": 24,
    "4090": 24,
    "3090": 24,
    "V100": 16,
    "T4": 16,
}
DEFAULT_TFLOPS = 100.0
#: Model FLOPs utilisation assumed for LoRA (QLoRA pays for dequantisation).
MFU = {"lora": 0.35, "dora": 0.25, "qlora": 0.2}

LLAMA_LIKE = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite"}
)
TIED_BY_DEFAULT = frozenset({"gemma", "gemma2", "gemma3_text"})
SUPPORTED = LLAMA_LIKE | {"phi3"}


class UnsupportedArchitectureError(TrainerError):
    reason = "UnsupportedArchitecture"


@dataclasses.dataclass(frozen=True)
class LinearShape:
    """A kind of linear layer: leaf ``name`` (e.g. ``q_proj``), full-name ``path`` pattern, and how many there are."""

    name: str
    in_features: int
    out_features: int
    count: int
    path: str = ""

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * self.count


def _get(config: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return default


def _dims(config: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
    try:
        h = int(_get(config, "hidden_size", "n_embd", "d_model"))
        layers = int(_get(config, "num_hidden_layers", "n_layer"))
        heads = int(_get(config, "num_attention_heads", "n_head"))
    except (TypeError, ValueError) as e:
        raise UnsupportedArchitectureError(
            "config.json lacks hidden_size, num_hidden_layers or num_attention_heads"
        ) from e
    kv = int(_get(config, "num_key_value_heads", default=heads))
    head_dim = int(_get(config, "head_dim", default=h // heads))
    inter = int(_get(config, "intermediate_size", default=4 * h))
    return h, layers, heads, kv, head_dim, inter


def linear_layers(config: dict[str, Any]) -> list[LinearShape]:
    """The linear layers peft's ``all-linear`` would consider (the output head excluded)."""
    mt = config.get("model_type")
    if mt not in SUPPORTED:
        raise UnsupportedArchitectureError(f"model_type {mt!r} is not known to the estimator")
    h, n, heads, kv, hd, inter = _dims(config)
    if mt == "phi3":
        return [
            LinearShape("qkv_proj", h, (heads + 2 * kv) * hd, n, "model.layers.*.self_attn.qkv_proj"),
            LinearShape("o_proj", heads * hd, h, n, "model.layers.*.self_attn.o_proj"),
            LinearShape("gate_up_proj", h, 2 * inter, n, "model.layers.*.mlp.gate_up_proj"),
            LinearShape("down_proj", inter, h, n, "model.layers.*.mlp.down_proj"),
        ]
    return [
        LinearShape("q_proj", h, heads * hd, n, "model.layers.*.self_attn.q_proj"),
        LinearShape("k_proj", h, kv * hd, n, "model.layers.*.self_attn.k_proj"),
        LinearShape("v_proj", h, kv * hd, n, "model.layers.*.self_attn.v_proj"),
        LinearShape("o_proj", heads * hd, h, n, "model.layers.*.self_attn.o_proj"),
        LinearShape("gate_proj", h, inter, n, "model.layers.*.mlp.gate_proj"),
        LinearShape("up_proj", h, inter, n, "model.layers.*.mlp.up_proj"),
        LinearShape("down_proj", inter, h, n, "model.layers.*.mlp.down_proj"),
    ]


def linear_layers_from_model(model: Any) -> list[LinearShape]:
    """Linear layers of an instantiated (e.g. meta-device) torch model, grouped by leaf name, head excluded."""
    import torch

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    groups: dict[tuple[str, int, int], list[str]] = {}
    for full, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not out_emb:
            key = (full.rsplit(".", 1)[-1], mod.in_features, mod.out_features)
            groups.setdefault(key, []).append(full)
    layers = []
    for (name, i, o), paths in groups.items():
        pattern = re.sub(r"\.\d+\.", ".*.", paths[0])
        layers.append(LinearShape(name, i, o, len(paths), pattern))
    return layers


def _matches(layer: LinearShape, target: str) -> bool:
    if target == layer.name:
        return True
    full = layer.path or layer.name
    return bool(re.fullmatch(re.escape(full).replace(r"\*", r"\d+"), target)) or (
        "." in target
        and re.search(r"(^|\.)" + re.escape(target).replace(r"\*", r"\d+") + "$", full.replace("*", "0")) is not None
    )


def resolve_targets(layers: Sequence[LinearShape], target_modules: Iterable[str]) -> list[LinearShape]:
    """The layers the targets select; raises :class:`UnknownTargetModulesError` for names that match nothing."""
    targets = list(target_modules)
    if targets == ["all-linear"] or targets == "all-linear":
        return list(layers)
    chosen: list[LinearShape] = []
    unknown = []
    for t in targets:
        hit = [layer for layer in layers if _matches(layer, t)]
        if not hit:
            unknown.append(t)
        chosen.extend(x for x in hit if x not in chosen)
    if unknown:
        names = sorted({layer.name for layer in layers})
        raise UnknownTargetModulesError(
            f"target modules {unknown} are not linear layers of this model; it has {names} (or use all-linear)"
        )
    return chosen


def lora_params(layers: Sequence[LinearShape], rank: int, use_dora: bool = False) -> int:
    """A (r x in) + B (out x r) per layer, plus DoRA's magnitude vector (out) per layer."""
    total = 0
    for layer in layers:
        per = rank * (layer.in_features + layer.out_features) + (layer.out_features if use_dora else 0)
        total += per * layer.count
    return total


def total_params(config: dict[str, Any], layers: Sequence[LinearShape]) -> tuple[int, int]:
    """(all parameters, parameters in the linear layers) — norms and biases are approximated."""
    h, n, *_ = _dims(config)
    vocab = int(_get(config, "vocab_size", default=32000))
    tied = bool(_get(config, "tie_word_embeddings", default=config.get("model_type") in TIED_BY_DEFAULT))
    linear = sum(layer.params for layer in layers)
    embeddings = vocab * h * (1 if tied else 2)
    norms = (2 * n + 1) * h
    return linear + embeddings + norms, linear


#: How a run uses several processes: one process, DDP (every GPU holds the whole model) or FSDP (sharded).
STRATEGIES = ("Single", "DDP", "FSDP")
#: FSDP gathers one decoder layer at a time, and prefetches the next: this many layers are whole at once.
FSDP_GATHERED_LAYERS = 2


@dataclasses.dataclass
class Estimate:
    model_type: str
    total_parameters: int
    trainable_parameters: int
    target_modules: list[str]
    method: str
    weight_precision: str
    memory_bytes: dict[str, int]
    tokens: int | None
    gpu_hours: float | None
    gpu_type: str | None
    gpu_memory_bytes: int | None
    assumptions: dict[str, Any]
    #: Single, DDP or FSDP: what the run uses, and what memory_bytes (per GPU) is for.
    strategy: str = "Single"
    world_size: int = 1
    nodes: int = 1
    #: Sequences per optimizer step over every process.
    global_batch_size: int = 0
    #: Per GPU with the whole model on every GPU (Single, DDP), for comparison with FSDP.
    replicated_bytes: int = 0

    @property
    def total_memory_bytes(self) -> int:
        """Memory per GPU under the chosen strategy."""
        return self.memory_bytes["total"]

    def refusal(self) -> str | None:
        """Why the run cannot fit its GPUs, or None (fits, or the GPU's memory is unknown)."""
        if self.fits() is not False or self.gpu_memory_bytes is None:
            return None
        need, have = self.total_memory_bytes / GIB, self.gpu_memory_bytes / GIB
        where = f"{self.world_size} x {self.gpu_type or 'GPU'}" if self.world_size > 1 else (self.gpu_type or "the GPU")
        message = f"Estimated {need:.1f} GiB per GPU with {self.strategy} does not fit the {have:.1f} GiB of {where}"
        if self.strategy != "FSDP" or self.world_size == 1:
            message += "; more GPUs (spec.resources.gpus, spec.resources.nodes) let FSDP shard the model"
        return message

    def fits(self) -> bool | None:
        return None if self.gpu_memory_bytes is None else self.total_memory_bytes <= self.gpu_memory_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "modelType": self.model_type,
            "totalParameters": self.total_parameters,
            "trainableParameters": self.trainable_parameters,
            "trainablePercent": round(100.0 * self.trainable_parameters / max(1, self.total_parameters), 4),
            "targetModules": self.target_modules,
            "method": self.method,
            "weightPrecision": self.weight_precision,
            "memoryBytes": dict(self.memory_bytes),
            "totalBytes": self.total_memory_bytes,
            "totalBytesPerGpu": self.total_memory_bytes,
            "memoryGiB": round(self.total_memory_bytes / GIB, 3),
            "tokens": self.tokens,
            "gpuHours": None if self.gpu_hours is None else round(self.gpu_hours, 4),
            "gpuType": self.gpu_type,
            "gpuMemoryBytes": self.gpu_memory_bytes,
            "fits": self.fits(),
            "strategy": self.strategy,
            "worldSize": self.world_size,
            "nodes": self.nodes,
            "globalBatchSize": self.global_batch_size,
            "replicatedBytesPerGpu": self.replicated_bytes,
            "assumptions": self.assumptions,
        }


def _lookup(table: dict[str, Any], gpu_type: str | None) -> Any:
    if not gpu_type:
        return None
    label = gpu_type.upper()
    for key in sorted(table, key=len, reverse=True):
        if key in label:
            return table[key]
    return None


def gpu_memory_bytes(gpu_type: str | None) -> int | None:
    """Memory of a GPU product label, e.g. ``NVIDIA-A100-SXM4-80GB`` → 80 GiB; None if unknown."""
    if not gpu_type:
        return None
    m = re.search(r"(\d+)\s*G(I)?B", gpu_type.upper())
    if m:
        return int(m.group(1)) * GIB
    gib = _lookup(GPU_MEMORY_GIB, gpu_type)
    return None if gib is None else int(gib) * GIB


def estimate(
    config: dict[str, Any],
    *,
    method: str = "lora",
    rank: int = 16,
    target_modules: Sequence[str] = ("all-linear",),
    batch_size: int = 8,
    seq_len: int = 2048,
    gradient_checkpointing: bool = True,
    gradient_accumulation: int = 1,
    epochs: float | None = None,
    max_steps: int | None = None,
    train_tokens: int | None = None,
    train_examples: int | None = None,
    gpus: int = 1,
    gpu_type: str | None = None,
    gpu_memory: int | None = None,
    precision: str | None = None,
    layers: Sequence[LinearShape] | None = None,
    nodes: int = 1,
    strategy: str | None = None,
) -> Estimate:
    """Estimate a run. ``train_tokens``/``train_examples``: one pass over the training set, if known.

    ``precision`` of the frozen weights defaults to bf16 (nf4 for qlora); ``layers`` overrides the
    shape table (for architectures it does not know). ``gpus`` per node (pod) and ``nodes`` make the world
    size, one process per GPU. ``strategy`` (Single, DDP, FSDP) is chosen when not given: DDP when the whole
    model and its training state fit one GPU (or the GPU is unknown), FSDP otherwise, QLoRA included (its
    4-bit weights stored in a sharded dtype). Memory is per GPU under that strategy.
    """
    all_layers = list(layers) if layers is not None else linear_layers(config)
    chosen = resolve_targets(all_layers, target_modules)
    use_dora = method == "dora"
    trainable = lora_params(chosen, rank, use_dora)
    total, linear = total_params(config, all_layers)
    h, n, _heads, _kv, _hd, inter = _dims(config)
    vocab = int(_get(config, "vocab_size", default=32000))
    precision = precision or ("nf4" if method == "qlora" else "bf16")
    width = {"fp32": 4.0, "float32": 4.0, "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0, "float16": 2.0}
    if precision == "nf4":
        # 4-bit weights + double-quantised absmax (8-bit per block of 64, fp32 per 256 blocks); rest in bf16.
        weights = int(linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + (total - linear) * 2)
    else:
        weights = int(total * width.get(precision, 2.0))
    act_bytes = 2 if precision != "fp32" else 4
    b, s = batch_size, seq_len
    per_layer = b * s * h * 34 // 2 * act_bytes + b * s * inter * 2 * act_bytes  # rough: attention + MLP buffers
    activations = (n * b * s * h * act_bytes + per_layer) if gradient_checkpointing else n * per_layer
    logits = b * s * vocab * 4 * 2  # fp32 logits and their gradient
    memory = {
        "weights": weights,
        "loraParameters": trainable * 4,
        "gradients": trainable * 4,
        "optimizerState": trainable * 8,
        "activations": int(activations),
        "logits": int(logits),
    }
    memory["total"] = sum(memory.values())
    replicated = memory["total"]
    world = max(1, gpus) * max(1, nodes)
    gpu_bytes = gpu_memory if gpu_memory is not None else gpu_memory_bytes(gpu_type)
    if strategy is None:
        if world == 1:
            strategy = "Single"
        elif gpu_bytes is None or replicated <= gpu_bytes:
            strategy = "DDP"
        else:
            strategy = "FSDP"
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {STRATEGIES}")
    if strategy == "FSDP":
        # FULL_SHARD: weights, adapter, its gradients and optimizer state are split over the world; a layer (and
        # the prefetched next one) is gathered whole for its forward and backward; activations stay per GPU.
        sharded = {k: -(-memory[k] // world) for k in ("weights", "loraParameters", "gradients", "optimizerState")}
        gathered = int(min(n, FSDP_GATHERED_LAYERS) * memory["weights"] / max(1, n) * (world - 1) / world)
        memory = {**memory, **sharded, "fsdpGatheredLayers": gathered}
        memory.pop("total")
        memory["total"] = sum(memory.values())

    tokens = None
    if max_steps is not None:
        per_example = seq_len if not (train_tokens and train_examples) else train_tokens / train_examples
        # The global batch is the spec's batchSize x gradientAccumulation at any world size: each process
        # keeps batchSize and accumulates gradientAccumulation / world (see kubelora.trainer.distributed).
        tokens = int(max_steps * batch_size * gradient_accumulation * per_example)
    elif train_tokens is not None:
        tokens = int(train_tokens * (epochs or 1.0))
    gpu_hours = None
    if tokens is not None:
        # forward 2N, backward through activations 2N, recompute under checkpointing 2N; LoRA's own grads ignored
        flops_per_token = (6 if gradient_checkpointing else 4) * total + 6 * trainable
        tflops = _lookup(GPU_TFLOPS, gpu_type) or DEFAULT_TFLOPS
        seconds = tokens * flops_per_token / (tflops * 1e12 * MFU.get(method, 0.3))
        gpu_hours = seconds / 3600.0  # total GPU-hours, whatever the number of GPUs
    return Estimate(
        model_type=str(config.get("model_type")),
        total_parameters=total,
        trainable_parameters=trainable,
        target_modules=sorted({layer.name for layer in chosen}),
        method=method,
        weight_precision=precision,
        memory_bytes=memory,
        tokens=tokens,
        gpu_hours=gpu_hours,
        gpu_type=gpu_type,
        gpu_memory_bytes=gpu_bytes,
        strategy=strategy,
        world_size=world,
        nodes=max(1, nodes),
        global_batch_size=batch_size * gradient_accumulation,
        replicated_bytes=replicated,
        assumptions={
            "perDeviceBatch": batch_size,
            "sequenceLength": seq_len,
            "gradientCheckpointing": gradient_checkpointing,
            "optimizer": "AdamW (32-bit states)",
            "mfu": MFU.get(method, 0.3),
            "gpuTflops": _lookup(GPU_TFLOPS, gpu_type) or DEFAULT_TFLOPS,
        },
    )


def estimate_for_spec(
    config: dict[str, Any],
    spec: Any,
    *,
    train_tokens: int | None = None,
    train_examples: int | None = None,
    gpu_memory: int | None = None,
    precision: str | None = None,
    layers: Sequence[LinearShape] | None = None,
) -> Estimate:
    """:func:`estimate` with the settings of a ``LoRAJobSpec`` (epochs default to 1)."""
    tr = spec.training
    epochs = tr.epochs if (tr.epochs is not None or tr.max_steps is not None) else 1.0
    return estimate(
        config,
        method=spec.method,
        rank=spec.lora.rank,
        target_modules=spec.lora.target_modules,
        batch_size=tr.batch_size,
        seq_len=tr.max_seq_length,
        gradient_checkpointing=tr.gradient_checkpointing,
        gradient_accumulation=tr.gradient_accumulation,
        epochs=epochs,
        max_steps=tr.max_steps,
        train_tokens=train_tokens,
        train_examples=train_examples,
        gpus=spec.resources.gpus,
        nodes=spec.resources.nodes,
        gpu_type=spec.resources.gpu_type,
        gpu_memory=gpu_memory,
        precision=precision,
        layers=layers,
    )
