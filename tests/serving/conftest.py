"""Fixtures for the vLLM stand-in tests: a tiny Llama model, LoRA adapters and running stand-ins.

Everything is built locally (no hub downloads). The stand-ins are real subprocesses bound to
127.0.0.x addresses, the way the operator's tests use them as fake pod IPs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]

WORDS = [
    *("the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "over", "under", "mat", "tree", "house"),
    *("big", "small", "red", "blue", "green", "happy", "sad", "sun", "moon", "star", "hello", "world", "yes"),
    *("no", "one", "two", "three", "four", "five", "and", "or", "but", "is", "was", "will", "be", "very"),
    *("quite", "quick", "slow", "jumps", "sleeps", "eats", "reads", "book", "code", "model", "tiny", "lora"),
    *("adapter", "test", "server", "answer", "question"),
]
CHAT_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_model(out: Path, *, hidden_size: int = 32, seed: int = 0) -> Path:
    """A tiny random LlamaForCausalLM with a word-level tokenizer, saved as safetensors."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for word in [*CHAT_MARKERS, *WORDS]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_adapter(
    base_dir: Path,
    out: Path,
    *,
    r: int = 4,
    seed: int = 1,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    base_model_name_or_path: str | None = None,
) -> Path:
    """A LoRA adapter made with peft, with random non-zero lora_A and lora_B so that it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), lora_dropout=0.0)
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(str(out))
    if base_model_name_or_path is not None:
        config_path = out / "adapter_config.json"
        data = json.loads(config_path.read_text())
        data["base_model_name_or_path"] = base_model_name_or_path
        config_path.write_text(json.dumps(data))
    assert (out / "adapter_model.safetensors").is_file()
    return out


@dataclass
class TinyArtifacts:
    model: Path
    adapter_a: Path
    adapter_b: Path
    adapter_rank32: Path
    adapter_other_base_name: Path
    adapter_wrong_shape: Path
    _cache: dict[Any, list[int]] = field(default_factory=dict)

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model)

    def reference(self, adapter: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """peft's (or the bare model's) own greedy continuation: the ids generate() adds to the prompt."""
        key = (adapter, tuple(prompt_ids), max_new_tokens)
        if key not in self._cache:
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            model: Any = AutoModelForCausalLM.from_pretrained(self.model)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, str(adapter))
            model.eval()
            ids = torch.tensor([prompt_ids])
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=3,
                )
            self._cache[key] = out[0, len(prompt_ids) :].tolist()
        return self._cache[key]

    def reference_text(self, adapter: Path | None, prompt_ids: list[int], max_new_tokens: int) -> str:
        ids = self.reference(adapter, prompt_ids, max_new_tokens)
        return str(self.tokenizer().decode(ids, skip_special_tokens=True))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyArtifacts:
    root = tmp_path_factory.mktemp("standin-tiny")
    model = build_tiny_model(root / "model")
    other = build_tiny_model(root / "other-model", hidden_size=48, seed=5)
    return TinyArtifacts(
        model=model,
        adapter_a=build_adapter(model, root / "adapter-a", seed=1),
        adapter_b=build_adapter(model, root / "adapter-b", seed=2, target_modules=("q_proj", "k_proj", "v_proj")),
        adapter_rank32=build_adapter(model, root / "adapter-r32", r=32, seed=3),
        adapter_other_base_name=build_adapter(
            model, root / "adapter-other-name", seed=4, base_model_name_or_path="someone/another-model"
        ),
        adapter_wrong_shape=build_adapter(other, root / "adapter-wrong-shape", seed=6),
    )


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Standin:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_standin(
    model: Path,
    host: str,
    log_dir: Path,
    *extra: str,
    runtime_updating: bool = True,
    timeout: float = 120.0,
) -> Standin:
    """Start `python -m kubelora.serving.standin` and wait until /health answers 200."""
    port = free_port(host)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer"), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)
    if runtime_updating:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    log_path = log_dir / f"standin-{host}-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "kubelora.serving.standin",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        *extra,
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    standin = Standin(host, port, process, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"stand-in exited with {process.returncode}:\n{standin.log()}")
        try:
            if httpx.get(f"{standin.url}/health", timeout=2).status_code == 200:
                return standin
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            standin.stop()
            raise AssertionError(f"stand-in not healthy after {timeout}s:\n{standin.log()}")
        time.sleep(0.2)  # polling interval while waiting for /health, not synchronisation


@pytest.fixture(scope="module")
def standin_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Standin]]:
    started: list[Standin] = []
    log_dir = tmp_path_factory.mktemp("standin-logs")

    def factory(model: Path, host: str, *extra: str, runtime_updating: bool = True) -> Standin:
        standin = start_standin(model, host, log_dir, *extra, runtime_updating=runtime_updating)
        started.append(standin)
        return standin

    yield factory
    for standin in started:
        standin.stop()
