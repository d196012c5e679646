"""kubelora vLLM stand-in: a DEVELOPMENT AND TEST server for CPUs. It is not vLLM and not a product.

vLLM cannot run on kubelora's development machines and CI (no GPU, no offline CPU build), so the
operator's tests and the demo talk to this small FastAPI server instead. It serves the parts of
vLLM's OpenAI-compatible HTTP API that kubelora uses, with vLLM's paths, request fields, response
bodies, status codes and error shapes:

- ``GET /health``, ``GET /version``, ``GET /v1/models``
- ``POST /v1/completions``, ``POST /v1/chat/completions`` (non-streaming, n=1)
- ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter`` (only when
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is ``1`` or ``true``, as in vLLM)

It loads a local Hugging Face causal LM directory (safetensors only) with transformers, applies LoRA
adapters with peft, and answers one request at a time. Greedy decoding is the default (temperature 0;
vLLM's default is 1.0 or the model's generation_config.json). See docs/standin-server.md.

Usage::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True python -m kubelora.serving.standin --model DIR \\
        --host 127.0.0.1 --port 8000 --enable-lora --max-loras 2 --max-lora-rank 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from importlib import metadata
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from kubelora.serving.standin_protocol import (
    STANDIN_NAME,
    STANDIN_NOTICE,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatMessage,
    ChatResponseMessage,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    ErrorInfo,
    ErrorResponse,
    LoadLoRAAdapterRequest,
    LoRAAdapterNotFoundError,
    ModelCard,
    ModelList,
    ModelPermission,
    StandinError,
    UnloadLoRAAdapterRequest,
    UsageInfo,
    error_response,
)

if TYPE_CHECKING:
    from kubelora.serving.standin_engine import LoRARequest, SamplingParams, StandinEngine

log = logging.getLogger("kubelora.serving.standin")

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # same as standin_engine, without importing torch


def standin_version() -> str:
    try:
        package_version = metadata.version("kubelora")
    except metadata.PackageNotFoundError:
        package_version = "0+unknown"
    return f"{package_version}+{STANDIN_NAME}"


def runtime_lora_updating_allowed(environ: dict[str, str] | None = None) -> bool:
    """vLLM's envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING: "1" or "true", any case, surrounding spaces ignored."""
    env = os.environ if environ is None else environ
    return env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() in ("1", "true")


@dataclass
class BaseModelPath:
    name: str
    model_path: str


@dataclass
class LoRAModulePath:
    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(value: str) -> LoRAModulePath:
    """One --lora-modules item: ``name=path`` or a JSON object with name, path and base_model_name."""
    value = value.strip()
    if value.startswith("{"):
        try:
            data = json.loads(value)
            return LoRAModulePath(name=data["name"], path=data["path"], base_model_name=data.get("base_model_name"))
        except (ValueError, KeyError, TypeError) as e:
            raise argparse.ArgumentTypeError(f"Invalid JSON format for --lora-modules: {value}") from e
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"Invalid format for --lora-modules: {value} (expected name=path or JSON)")
    return LoRAModulePath(name=name, path=path)


# ---------------------------------------------------------------------------------------------
# The served models and their adapters (vLLM's OpenAIServingModels)


class ServingModels:
    def __init__(self, engine: StandinEngine, base_model_paths: list[BaseModelPath]) -> None:
        self.engine = engine
        self.base_model_paths = base_model_paths
        self.lora_requests: dict[str, LoRARequest] = {}
        self._next_id = 0
        # load and unload are serialised (vLLM locks per name; one lock is enough for a test server)
        self.lock = asyncio.Lock()

    def is_base_model(self, name: str | None) -> bool:
        return any(m.name == name for m in self.base_model_paths)

    def model_name(self, lora: LoRARequest | None) -> str:
        return lora.lora_name if lora is not None else self.base_model_paths[0].name

    def check_model(self, name: str | None) -> LoRARequest | None:
        """The adapter a request names (None for the base model); 404 for anything else."""
        if not name or self.is_base_model(name):
            return None
        if name in self.lora_requests:
            return self.lora_requests[name]
        raise StandinError(f"The model `{name}` does not exist.", "NotFoundError", HTTPStatus.NOT_FOUND, "model")

    def show_available_models(self) -> ModelList:
        cards = [
            ModelCard(
                id=base.name,
                root=base.model_path,
                max_model_len=self.engine.max_model_len,
                permission=[ModelPermission()],
            )
            for base in self.base_model_paths
        ]
        cards.extend(
            ModelCard(
                id=lora.lora_name,
                root=lora.lora_path,
                parent=lora.base_model_name or self.base_model_paths[0].name,
                permission=[ModelPermission()],
            )
            for lora in self.lora_requests.values()
        )
        return ModelList(data=cards)

    async def load_lora_adapter(self, request: LoadLoRAAdapterRequest, base_model_name: str | None = None) -> str:
        from kubelora.serving.standin_engine import LoRARequest

        async with self.lock:
            if not request.lora_name or not request.lora_path:
                raise StandinError("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
            if not request.load_inplace and request.lora_name in self.lora_requests:
                raise StandinError(
                    f"The lora adapter '{request.lora_name}' has already been loaded. If you want to load the "
                    "adapter in place, set 'load_inplace' to True.",
                    "InvalidUserInput",
                )
            existing = self.lora_requests.get(request.lora_name)
            if existing is not None:
                lora_int_id = existing.lora_int_id
            else:
                self._next_id += 1
                lora_int_id = self._next_id
            lora = LoRARequest(
                lora_name=request.lora_name,
                lora_int_id=lora_int_id,
                lora_path=request.lora_path,
                base_model_name=base_model_name if self.is_base_model(base_model_name) else None,
            )
            try:
                await asyncio.to_thread(self.engine.add_lora, lora)
            except StandinError:
                raise
            except Exception as e:  # what vLLM answers for any other failure of add_lora
                raise StandinError(str(e), "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR) from e
            self.lora_requests[request.lora_name] = lora
            log.info("Registered LoRA adapter name=%s path=%s", request.lora_name, request.lora_path)
            return f"Success: LoRA adapter '{request.lora_name}' added successfully."

    async def unload_lora_adapter(self, request: UnloadLoRAAdapterRequest) -> str:
        async with self.lock:
            if not request.lora_name:
                raise StandinError("'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
            lora = self.lora_requests.get(request.lora_name)
            if lora is None:
                raise StandinError(
                    f"The lora adapter '{request.lora_name}' cannot be found.", "NotFoundError", HTTPStatus.NOT_FOUND
                )
            await asyncio.to_thread(self.engine.remove_lora, lora.lora_int_id)
            del self.lora_requests[request.lora_name]
            log.info("Removed LoRA adapter name=%s", request.lora_name)
            return f"Success: LoRA adapter '{request.lora_name}' removed successfully."


# ---------------------------------------------------------------------------------------------
# Request handling


def _validation_error(message: str, parameter: str, value: Any) -> StandinError:
    # vLLM raises VLLMValidationError, whose str() appends the parameter and value
    return StandinError(f"{message} (parameter={parameter}, value={value})", "BadRequestError", param=parameter)


def _unsupported(feature: str) -> StandinError:
    return StandinError(f"{feature} is not supported by the kubelora vLLM stand-in (a development and test server).")


def _sampling_params(request: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    from kubelora.serving.standin_engine import SamplingParams

    if request.stream:
        raise _unsupported("Streaming (stream=true)")
    if request.n != 1:
        raise _unsupported(f"n={request.n} (only n=1)")
    if request.logprobs not in (None, False):
        raise _unsupported("logprobs")
    temperature = 0.0 if request.temperature is None else float(request.temperature)
    if temperature < 0:
        raise _validation_error(f"temperature must be non-negative, got {temperature}.", "temperature", temperature)
    top_p = 1.0 if request.top_p is None else float(request.top_p)
    if not 0.0 < top_p <= 1.0:
        raise _validation_error(f"top_p must be in (0, 1], got {top_p}.", "top_p", top_p)
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=int(request.top_k or 0),
        seed=request.seed,
        stop=[s for s in stop if s],
        stop_token_ids=list(request.stop_token_ids or []),
        ignore_eos=request.ignore_eos,
        include_stop_str_in_output=request.include_stop_str_in_output,
        skip_special_tokens=request.skip_special_tokens,
    )


def _check_lengths(max_model_len: int, prompt_ids: list[int], max_tokens: int | None) -> int:
    """vLLM's OpenAIServing._validate_input; answers the max_tokens to use."""
    n = len(prompt_ids)
    if n == 0:
        raise StandinError("Prompt cannot be empty", param="prompt")
    if n >= max_model_len:
        raise _validation_error(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{n} input tokens. Please reduce the length of the input messages.",
            "input_tokens",
            n,
        )
    if max_tokens is None:
        return max_model_len - n
    if max_tokens < 1:
        raise _validation_error(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens)
    if n + max_tokens > max_model_len:
        raise _validation_error(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum context "
            f"length is {max_model_len} tokens and your request has {n} input tokens "
            f"({max_tokens} > {max_model_len} - {n}).",
            "max_tokens",
            max_tokens,
        )
    return max_tokens


def _prompt_token_lists(engine: StandinEngine, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [engine.encode(prompt, add_special_tokens=True)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if isinstance(prompt, list) and prompt:
        return [
            engine.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
            for p in prompt  # list[str] or list[list[int]]
        ]
    raise StandinError("Prompt cannot be empty", param="prompt")


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    data: dict[str, Any] = message.model_dump(exclude_none=True)
    content = data.get("content")
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        data["content"] = "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return data


async def create_completion(models: ServingModels, request: CompletionRequest) -> CompletionResponse:
    engine = models.engine
    lora = models.check_model(request.model)
    if request.echo:
        raise _unsupported("echo")
    prompts = _prompt_token_lists(engine, request.prompt)
    max_tokens = min(_check_lengths(engine.max_model_len, ids, request.max_tokens) for ids in prompts)
    params = _sampling_params(request, max_tokens)
    results = await asyncio.to_thread(engine.generate, prompts, params, lora)
    prompt_tokens = sum(len(ids) for ids in prompts)
    completion_tokens = sum(len(r.token_ids) for r in results)
    return CompletionResponse(
        model=models.model_name(lora),
        choices=[
            CompletionResponseChoice(index=i, text=r.text, finish_reason=r.finish_reason, stop_reason=r.stop_reason)
            for i, r in enumerate(results)
        ],
        usage=UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


async def create_chat_completion(models: ServingModels, request: ChatCompletionRequest) -> ChatCompletionResponse:
    engine = models.engine
    lora = models.check_model(request.model)
    rendered = engine.render_chat(
        [_message_dict(m) for m in request.messages],
        add_generation_prompt=request.add_generation_prompt,
        continue_final_message=request.continue_final_message,
        template_kwargs=request.chat_template_kwargs,
    )
    # the template already holds any BOS token, so vLLM tokenizes chat prompts without special tokens
    prompt_ids = engine.encode(rendered, add_special_tokens=False)
    requested = request.max_completion_tokens or request.max_tokens
    params = _sampling_params(request, _check_lengths(engine.max_model_len, prompt_ids, requested))
    (result,) = await asyncio.to_thread(engine.generate, [prompt_ids], params, lora)
    return ChatCompletionResponse(
        model=models.model_name(lora),
        choices=[
            ChatCompletionResponseChoice(
                index=0,
                message=ChatResponseMessage(content=result.text),
                finish_reason=result.finish_reason,
                stop_reason=result.stop_reason,
            )
        ],
        usage=UsageInfo(
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(result.token_ids),
            total_tokens=len(prompt_ids) + len(result.token_ids),
        ),
    )


# ---------------------------------------------------------------------------------------------
# The FastAPI application


def _json(model: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(content=model.model_dump(), status_code=status)


def _error_json(error: ErrorResponse) -> JSONResponse:
    return JSONResponse(content=error.model_dump(), status_code=error.error.code)


def build_app(models: ServingModels, *, allow_runtime_lora_updating: bool) -> FastAPI:
    app = FastAPI(
        title="kubelora vLLM stand-in (development and test server, not vLLM)",
        description=STANDIN_NOTICE,
        version=standin_version(),
    )

    @app.middleware("http")
    async def label(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["X-Served-By"] = f"{STANDIN_NAME} (development and test server, not vLLM)"
        return response

    @app.exception_handler(StandinError)
    async def standin_error(_: Request, exc: StandinError) -> JSONResponse:
        return _error_json(exc.response())

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # vLLM answers 400 (not FastAPI's 422) with type "Bad Request" and the first error's location
        errors = exc.errors()
        param = None
        if errors and errors[0].get("loc"):
            param = ".".join(str(p) for p in errors[0]["loc"])
        label = "error" if len(errors) == 1 else "errors"
        # like vLLM: at most 10 errors, each cut to 1000 characters
        message = f"{len(errors)} validation {label}:\n" + "".join(
            f"  {str({k: v for k, v in e.items() if k != 'ctx'})[:1000]}\n" for e in errors[:10]
        )
        body = ErrorResponse(
            error=ErrorInfo(message=message.rstrip(), type=HTTPStatus.BAD_REQUEST.phrase, param=param, code=400)
        )
        return JSONResponse(body.model_dump(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("Request failed")
        return _error_json(error_response(str(exc), "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse(content={"version": standin_version(), "server": STANDIN_NAME, "notice": STANDIN_NOTICE})

    @app.get("/v1/models")
    async def show_available_models() -> JSONResponse:
        return _json(models.show_available_models())

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> JSONResponse:
        return _json(await create_completion(models, request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest) -> JSONResponse:
        return _json(await create_chat_completion(models, request))

    if allow_runtime_lora_updating:
        # vLLM registers these routes only when VLLM_ALLOW_RUNTIME_LORA_UPDATING is set; otherwise
        # they do not exist and FastAPI answers 404 {"detail": "Not Found"}.
        log.warning(
            "LoRA dynamic loading & unloading is enabled in the API server. This should ONLY be used for "
            "local development!"
        )

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> Response:
            try:
                message = await models.load_lora_adapter(request)
            except LoRAAdapterNotFoundError as e:
                return _error_json(e.response())
            return Response(status_code=200, content=message)

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> Response:
            return Response(status_code=200, content=await models.unload_lora_adapter(request))

    return app


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kubelora.serving.standin",
        description=(
            "kubelora vLLM stand-in: a DEVELOPMENT AND TEST server for CPUs that mimics vLLM's OpenAI-compatible "
            "API (models, completions, chat completions, runtime LoRA loading). It is not vLLM and not a product. "
            "Set VLLM_ALLOW_RUNTIME_LORA_UPDATING=True to enable /v1/load_lora_adapter and /v1/unload_lora_adapter."
        ),
    )
    parser.add_argument("--model", required=True, help="Local Hugging Face model directory (safetensors weights)")
    parser.add_argument("--host", default="0.0.0.0", help="Address to bind (default 0.0.0.0, as vLLM)")  # noqa: S104
    parser.add_argument("--port", type=int, default=8000, help="Port to bind (default 8000)")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="Name(s) of the base model in the API; the first is used in responses (default: --model)",
    )
    parser.add_argument("--enable-lora", action="store_true", help="Allow LoRA adapters")
    parser.add_argument(
        "--max-loras", type=int, default=1, help="vLLM: LoRAs in one batch (default 1); not a registration limit"
    )
    parser.add_argument(
        "--max-lora-rank",
        type=int,
        default=16,
        choices=MAX_LORA_RANKS,
        help="Largest LoRA rank accepted (default 16)",
    )
    parser.add_argument(
        "--max-cpu-loras",
        type=int,
        default=None,
        help="LoRAs kept in memory; more are evicted (least recently used) and reloaded on demand "
        "(default: --max-loras)",
    )
    parser.add_argument(
        "--lora-modules",
        nargs="+",
        type=parse_lora_module,
        default=None,
        help="Adapters loaded at startup: name=path or JSON {name, path, base_model_name}",
    )
    parser.add_argument("--max-model-len", type=int, default=None, help="Context length (default: from config.json)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--chat-template", default=None, help="Chat template file or inline Jinja template")
    parser.add_argument("--uvicorn-log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--torch-threads", type=int, default=1, help="Stand-in only: torch CPU threads (default 1)")
    return parser


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_loras < 1:
        parser.error(f"max_loras ({args.max_loras}) must be >= 1")
    if args.max_cpu_loras is not None and args.max_cpu_loras < args.max_loras:
        parser.error(f"max_cpu_loras ({args.max_cpu_loras}) must be >= max_loras ({args.max_loras})")
    if args.lora_modules and not args.enable_lora:
        parser.error("--lora-modules requires --enable-lora")


def _read_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


def _preimport_peft() -> None:
    started = time.monotonic()
    try:
        import peft  # noqa: F401
    except Exception:
        log.exception("Could not import peft")
        return
    log.info("Imported peft seconds=%.1f", time.monotonic() - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    allow_updating = runtime_lora_updating_allowed()
    log.warning(
        "Starting kubelora vLLM stand-in, a development and test server (not vLLM, not a product) "
        "version=%s model=%s host=%s port=%d enableLora=%s maxLoras=%d maxLoraRank=%d runtimeLoraUpdating=%s",
        standin_version(),
        args.model,
        args.host,
        args.port,
        args.enable_lora,
        args.max_loras,
        args.max_lora_rank,
        allow_updating,
    )
    started = time.monotonic()

    import torch
    import uvicorn

    from kubelora.serving.standin_engine import StandinEngine

    torch.set_num_threads(max(1, args.torch_threads))
    try:
        engine = StandinEngine(
            args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            enable_lora=args.enable_lora,
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
            max_lora_rank=args.max_lora_rank,
            chat_template=_read_chat_template(args.chat_template),
        )
    except (OSError, ValueError) as e:
        log.error("Could not load the model model=%s error=%s", args.model, e)
        return 2
    names = args.served_model_name or [args.model]
    models = ServingModels(engine, [BaseModelPath(name=n, model_path=args.model) for n in names])

    for module in args.lora_modules or []:
        request = LoadLoRAAdapterRequest(lora_name=module.name, lora_path=module.path)
        try:
            asyncio.run(models.load_lora_adapter(request, base_model_name=module.base_model_name))
        except StandinError as e:
            log.error("Could not load a --lora-modules adapter name=%s error=%s", module.name, e.message)
            return 2
        models.lock = asyncio.Lock()  # the lock belonged to the event loop that just closed

    app = build_app(models, allow_runtime_lora_updating=allow_updating)
    if args.enable_lora and not args.lora_modules:
        # peft is slow to import; import it now, in the background, rather than in the first load request
        threading.Thread(target=_preimport_peft, name="preimport-peft", daemon=True).start()
    log.info(
        "Model loaded seconds=%.1f servedModelName=%s maxModelLen=%d",
        time.monotonic() - started,
        names[0],
        engine.max_model_len,
    )
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
