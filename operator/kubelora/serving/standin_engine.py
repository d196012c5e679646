"""Model, LoRA adapters and generation for the kubelora vLLM stand-in.

A development and test server, not vLLM and not a product: one process, one CPU model, one request
at a time. Every use of the model (generation, loading or removing an adapter) holds one lock, so
loading and unloading adapters while requests are being served is safe.

LoRA adapters follow vLLM's runtime semantics:

- an adapter is validated and loaded when it is registered (`add_lora`), so a bad adapter fails the
  load request, not a later completion;
- at most `max_cpu_loras` adapters are held in memory; registering more evicts the least recently
  used one, which is reloaded from its directory the next time a request names it (vLLM's
  `LRUCacheWorkerLoRAManager`). Registering more adapters than `max_loras` is not an error in vLLM,
  and it is not one here either;
- the adapter's `base_model_name_or_path` is not compared with the served model (vLLM does not
  compare it either); an adapter whose tensors do not fit the model fails to load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubelora.serving.standin_protocol import LoRAAdapterNotFoundError, StandinError

log = logging.getLogger("kubelora.serving.standin")

# vLLM's --max-lora-rank accepts only these values (vllm/config/lora.py MaxLoRARanks)
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's _SAMPLING_EPS: a temperature below this is greedy sampling
SAMPLING_EPS = 1e-5

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoRARequest:
    """vLLM's LoRARequest: the name clients use, a unique integer id and the adapter directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: int | str | None = None


def _adapter_rank(config: dict[str, Any]) -> int:
    """The largest rank in an adapter_config.json, as vLLM's PEFTHelper computes it."""
    ranks = [int(config.get("r", 0))]
    rank_pattern = config.get("rank_pattern") or {}
    if isinstance(rank_pattern, dict):
        ranks.extend(int(v) for v in rank_pattern.values())
    return max(ranks)


def _peft_key(lora_int_id: int, generation: int) -> str:
    # LoRA names may hold characters peft cannot use as module keys ("org/name-v1.2"), so the model
    # only ever sees these keys; the generation changes when an adapter is reloaded in place.
    return f"lora{lora_int_id}g{generation}"


class StandinEngine:
    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        enable_lora: bool = False,
        max_loras: int = 1,
        max_cpu_loras: int | None = None,
        max_lora_rank: int = 16,
        chat_template: str | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.torch_dtype = torch.float32 if dtype == "auto" else _DTYPES[dtype]
        self.enable_lora = enable_lora
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras if max_cpu_loras is not None else max_loras
        self.max_lora_rank = max_lora_rank
        # One lock for everything that touches the model: the stand-in serves one request at a time.
        self.lock = threading.RLock()

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ValueError(f"{model_dir} is not a local Hugging Face model directory (no config.json)")
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"{model_dir} holds no *.safetensors weights (the stand-in loads safetensors only)")

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = self._load_base()
        self.chat_template = chat_template

        config_len = getattr(self.model.config, "max_position_embeddings", None)
        self.max_model_len = int(max_model_len or config_len or 2048)

        eos: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, list):
            eos.update(int(t) for t in gen_eos)
        self.eos_token_ids = eos

        self._peft: Any = None  # peft.PeftModel once the first adapter has been loaded
        self._registered: dict[int, LoRARequest] = {}
        self._resident: OrderedDict[int, str] = OrderedDict()  # LRU: lora_int_id -> peft key
        self._generation = 0

    # -----------------------------------------------------------------------------------------
    # loading

    def _load_base(self) -> Any:
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.torch_dtype, use_safetensors=True)
        model.eval()
        return model

    def _validate_adapter(self, request: LoRARequest) -> tuple[Path, dict[str, Any]]:
        """The checks vLLM's PEFTHelper.from_local_dir and validate_legal make before loading."""
        path = Path(request.lora_path)
        config_path = path / "adapter_config.json"
        if not config_path.is_file():
            raise LoRAAdapterNotFoundError(request.lora_name, request.lora_path)
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise StandinError(
                f"Loading lora {request.lora_name} failed: invalid adapter_config.json: {e}",
                "InternalServerError",
                HTTPStatus.INTERNAL_SERVER_ERROR,
            ) from e
        if not isinstance(config, dict):
            raise StandinError(
                f"Loading lora {request.lora_name} failed: adapter_config.json is not a JSON object",
                "InternalServerError",
                HTTPStatus.INTERNAL_SERVER_ERROR,
            )
        problems = []
        if config.get("peft_type", "LORA") != "LORA":
            problems.append(f"Only LoRA adapters are supported, got peft_type {config.get('peft_type')}.")
        if config.get("modules_to_save"):
            problems.append("vLLM only supports modules_to_save being None.")
        rank = _adapter_rank(config)
        if rank > self.max_lora_rank:
            problems.append(f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}.")
        if config.get("bias", "none") != "none":
            problems.append("Adapter bias is not supported.")
        if problems:
            raise StandinError(" ".join(problems), "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR)
        if not (path / "adapter_model.safetensors").is_file():
            raise StandinError(
                f"{request.lora_path} doesn't contain tensors (the stand-in loads adapter_model.safetensors only)",
                "InternalServerError",
                HTTPStatus.INTERNAL_SERVER_ERROR,
            )
        return path, config

    def _load_into_model(self, request: LoRARequest) -> str:
        """Load an adapter's weights under a fresh peft key; the model is unchanged if this fails."""
        path, config = self._validate_adapter(request)
        from peft import LoraConfig, PeftModel  # imported late: peft pulls in bitsandbytes and is slow

        self._generation += 1
        key = _peft_key(request.lora_int_id, self._generation)
        try:
            if self._peft is None:
                lora_config = LoraConfig.from_pretrained(str(path))
                lora_config.inference_mode = True
                self._peft = PeftModel(self.model, lora_config, adapter_name=key)
                self._peft.eval()
            load_result = self._peft.load_adapter(str(path), adapter_name=key, is_trainable=False)
            self._check_load_result(load_result)
        except Exception as e:
            self._discard_failed(key)
            if isinstance(e, StandinError):
                raise
            raise StandinError(
                f"Loading lora {request.lora_name} failed: {e}", "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR
            ) from e
        log.info(
            "Loaded LoRA adapter name=%s id=%d path=%s rank=%d adapterBaseModel=%s",
            request.lora_name,
            request.lora_int_id,
            request.lora_path,
            _adapter_rank(config),
            config.get("base_model_name_or_path"),
        )
        return key

    def _check_load_result(self, load_result: Any) -> None:
        unexpected = [k for k in getattr(load_result, "unexpected_keys", []) if "lora_" in k]
        missing = list(getattr(load_result, "missing_keys", []))
        if unexpected or missing:
            raise ValueError(
                "the adapter's tensors do not match the served model's modules "
                f"(unexpected={unexpected[:3]} missing={missing[:3]})"
            )

    def _discard_failed(self, key: str) -> None:
        """Undo a failed load so that the model serves exactly what it served before."""
        if self._peft is not None and key in self._peft.peft_config:
            try:
                self._delete_adapter(key)
                return
            except Exception:
                log.exception("Could not remove a partly loaded adapter, reloading the base model key=%s", key)
        elif self._peft is not None:
            return
        # The base model may have been changed in place: start again from a clean copy. Adapters that
        # were in memory are reloaded from their directories when a request names them.
        self._peft = None
        self._resident.clear()
        self.model = self._load_base()

    def _delete_adapter(self, key: str) -> None:
        self._peft.delete_adapter(key)
        if not self._peft.peft_config:
            # no adapter left: go back to the plain model (peft cannot disable an empty adapter set)
            self.model = self._peft.unload()
            self._peft = None

    def _evict_to_capacity(self, keep: int) -> None:
        while len(self._resident) > self.max_cpu_loras:
            oldest = next(i for i in self._resident if i != keep)
            key = self._resident.pop(oldest)
            self._delete_adapter(key)
            log.info("Evicted LoRA adapter from memory id=%d maxCpuLoras=%d", oldest, self.max_cpu_loras)

    def add_lora(self, request: LoRARequest) -> None:
        """Validate, load and register an adapter (replacing the one with the same id, if any)."""
        if not self.enable_lora:
            raise StandinError(
                "LoRA is not enabled. Use --enable-lora to enable LoRA.",
                "InternalServerError",
                HTTPStatus.INTERNAL_SERVER_ERROR,
            )
        with self.lock:
            key = self._load_into_model(request)
            old_key = self._resident.pop(request.lora_int_id, None)
            if old_key is not None:
                self._delete_adapter(old_key)
            self._resident[request.lora_int_id] = key
            self._registered[request.lora_int_id] = request
            self._evict_to_capacity(keep=request.lora_int_id)

    def remove_lora(self, lora_int_id: int) -> bool:
        with self.lock:
            request = self._registered.pop(lora_int_id, None)
            key = self._resident.pop(lora_int_id, None)
            if key is not None:
                self._delete_adapter(key)
            return request is not None

    def resident_lora_ids(self) -> list[int]:
        with self.lock:
            return list(self._resident)

    # -----------------------------------------------------------------------------------------
    # generation

    @contextlib.contextmanager
    def _activated(self, lora: LoRARequest | None) -> Iterator[Any]:
        """The module to run for this request, with the right adapter (or none) active."""
        if lora is None:
            if self._peft is None:
                yield self.model
            else:
                with self._peft.disable_adapter():
                    yield self._peft
            return
        if lora.lora_int_id not in self._registered:
            raise StandinError(
                f"The model `{lora.lora_name}` does not exist.", "NotFoundError", HTTPStatus.NOT_FOUND, "model"
            )
        key = self._resident.get(lora.lora_int_id)
        if key is None:
            # evicted from the in-memory cache earlier: reload it from its directory, as vLLM does
            key = self._load_into_model(lora)
            self._resident[lora.lora_int_id] = key
            self._evict_to_capacity(keep=lora.lora_int_id)
        self._resident.move_to_end(lora.lora_int_id)
        self._peft.set_adapter(key, inference_mode=True)
        yield self._peft

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        template_kwargs: dict[str, Any] | None,
    ) -> str:
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise StandinError(
                "As of transformers v4.44, default chat template is no longer allowed, so you must provide "
                "a chat template if the tokenizer does not define one."
            )
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **(template_kwargs or {}),
            )
        except Exception as e:
            raise StandinError(f"Could not render the chat template: {e}") from e
        return str(rendered)

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, lora: LoRARequest | None
    ) -> list[GenerationResult]:
        with self.lock, self._activated(lora) as module, torch.inference_mode():
            return [self._generate_one(module, ids, params) for ids in prompts]

    def _pick(self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
        if params.temperature < SAMPLING_EPS:
            return int(torch.argmax(logits).item())
        logits = logits / params.temperature
        if params.top_k and params.top_k > 0:
            k = min(params.top_k, logits.shape[-1])
            kth = torch.topk(logits, k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) > params.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator).item())

    def _decode(self, token_ids: list[int], params: SamplingParams) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens))

    def _generate_one(self, module: Any, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        generator = None
        if params.temperature >= SAMPLING_EPS:
            generator = torch.Generator()
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        stop_ids = set(params.stop_token_ids)
        eos_ids = set() if params.ignore_eos else self.eos_token_ids
        generated: list[int] = []
        text_ids: list[int] = []
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        past = None
        for _ in range(params.max_tokens):
            out = module(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = self._pick(out.logits[0, -1, :].float(), params, generator)
            generated.append(token)
            if token in eos_ids:
                return GenerationResult(self._decode(text_ids, params), generated, "stop", None)
            if token in stop_ids:
                return GenerationResult(self._decode(text_ids, params), generated, "stop", token)
            text_ids.append(token)
            if params.stop:
                text = self._decode(text_ids, params)
                hits = [(text.find(s), s) for s in params.stop if s and s in text]
                if hits:
                    index, stop = min(hits)
                    end = index + len(stop) if params.include_stop_str_in_output else index
                    return GenerationResult(text[:end], generated, "stop", stop)
            input_ids = torch.tensor([[token]], dtype=torch.long)
        return GenerationResult(self._decode(text_ids, params), generated, "length", None)
