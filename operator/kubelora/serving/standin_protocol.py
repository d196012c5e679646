"""Wire shapes of the kubelora vLLM stand-in (a development and test server, not vLLM, not a product).

The request and response models mirror vLLM's OpenAI-compatible server closely enough that the
official `openai` client and the kubelora operator cannot tell the difference for the endpoints the
stand-in implements. See docs/standin-server.md for the vLLM sources each shape follows.
"""

from __future__ import annotations

import time
import uuid
from http import HTTPStatus
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

STANDIN_NAME = "kubelora-standin"
STANDIN_NOTICE = "Development and test stand-in for vLLM's OpenAI-compatible server; not vLLM and not a product"


def random_id() -> str:
    return uuid.uuid4().hex[:16]


class OpenAIBaseModel(BaseModel):
    # vLLM's OpenAIBaseModel allows (and only logs) unknown fields, as the OpenAI API does.
    model_config = ConfigDict(extra="allow")


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


def error_response(
    message: str,
    err_type: str = "BadRequestError",
    status: HTTPStatus = HTTPStatus.BAD_REQUEST,
    param: str | None = None,
) -> ErrorResponse:
    """Same fields as vLLM's `create_error_response`: `code` is the HTTP status as an integer."""
    return ErrorResponse(error=ErrorInfo(message=message, type=err_type, param=param, code=status.value))


class StandinError(Exception):
    """An error that becomes an OpenAI-style error body with its HTTP status."""

    def __init__(
        self,
        message: str,
        err_type: str = "BadRequestError",
        status: HTTPStatus = HTTPStatus.BAD_REQUEST,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.err_type = err_type
        self.status = status
        self.param = param

    def response(self) -> ErrorResponse:
        return error_response(self.message, self.err_type, self.status, self.param)


class LoRAAdapterNotFoundError(StandinError):
    """vLLM's `LoRAAdapterNotFoundError`: the adapter directory (or its adapter_config.json) is missing."""

    def __init__(self, lora_name: str, lora_path: str) -> None:
        super().__init__(
            f"Loading lora {lora_name} failed: No adapter found for {lora_path}",
            "NotFoundError",
            HTTPStatus.NOT_FOUND,
        )


# ---------------------------------------------------------------------------------------------
# /v1/models


class ModelPermission(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"modelperm-{random_id()}")
    object: str = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(OpenAIBaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    # vLLM answers "vllm" here; the stand-in keeps the value so that clients see the same shape.
    owned_by: str = "vllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(OpenAIBaseModel):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# LoRA management


class LoadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str
    lora_int_id: int | None = None


# ---------------------------------------------------------------------------------------------
# Completions and chat completions


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: dict[str, Any] | None = None


class _SamplingFields(OpenAIBaseModel):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool | None = False
    logprobs: Any = None
    user: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    # vLLM's CompletionRequest defaults max_tokens to 16, like the OpenAI API
    max_tokens: int | None = 16
    echo: bool | None = False


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: Any = None


class CompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{random_id()}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo


class ChatResponseMessage(OpenAIBaseModel):
    role: str = "assistant"
    content: str | None = None
    refusal: str | None = None
    annotations: Any = None
    audio: Any = None
    function_call: Any = None
    tool_calls: list[Any] = Field(default_factory=list)
    reasoning_content: str | None = None


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Any = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{random_id()}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo
    prompt_logprobs: Any = None
