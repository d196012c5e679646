"""Tokenizers of real model families, built here: their published chat templates and special tokens on a tiny
word-level vocabulary, with a tiny random model of the family's architecture. No downloads.

Each family's tokenizer EOS and ``generation_config.eos_token_id`` are set as the family publishes them, in the
case that matters for evaluation: Llama 3 (first release), Qwen 2.5 (base) and Gemma name an EOS that is *not*
the end-of-turn token their chat template closes an assistant turn with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    template: str
    special: tuple[str, ...]  # special tokens, in id order from 0
    bos: str | None
    eos: str
    pad: str | None
    generation_eos: tuple[str, ...]  # generation_config.eos_token_id as published
    end_of_turn: str  # what the template closes an assistant turn with
    architecture: str  # transformers config class of the family
    added: tuple[str, ...] = ()  # added tokens that are not special (Qwen 3's <think>)
    extra_config: tuple[tuple[str, Any], ...] = ()


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llama3",
            LLAMA3_TEMPLATE,
            ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            bos="<|begin_of_text|>",
            eos="<|end_of_text|>",  # Meta-Llama-3-8B-Instruct as first released
            pad=None,
            generation_eos=("<|end_of_text|>",),
            end_of_turn="<|eot_id|>",
            architecture="LlamaConfig",
        ),
        Family(
            "qwen2.5",
            QWEN25_TEMPLATE,
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            bos=None,
            eos="<|endoftext|>",  # the base models' tokenizer, same chat template
            pad="<|endoftext|>",
            generation_eos=("<|endoftext|>",),
            end_of_turn="<|im_end|>",
            architecture="Qwen2Config",
        ),
        Family(
            "qwen3",
            QWEN3_TEMPLATE,
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            bos=None,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            generation_eos=("<|im_end|>", "<|endoftext|>"),
            end_of_turn="<|im_end|>",
            architecture="Qwen3Config",
            added=("<think>", "</think>"),
        ),
        Family(
            "mistral",
            MISTRAL_TEMPLATE,
            ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
            bos="<s>",
            eos="</s>",
            pad=None,
            generation_eos=("</s>",),
            end_of_turn="</s>",
            architecture="MistralConfig",
        ),
        Family(
            "gemma",
            GEMMA_TEMPLATE,
            ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            generation_eos=("<eos>",),
            end_of_turn="<end_of_turn>",
            architecture="Gemma2Config",
            extra_config=(("final_logit_softcapping", 30.0), ("query_pre_attn_scalar", 8)),
        ),
    )
}

WORDS = (
    "system",
    "user",
    "assistant",
    "model",
    "you",
    "are",
    "qwen",
    ",",
    "created",
    "by",
    "alibaba",
    "cloud",
    ".",
    "a",
    "helpful",
    "classify",
    "this",
    "ticket",
    ":",
    "my",
    "password",
    "is",
    "locked",
    "please",
    "help",
    "the",
    "invoice",
    "was",
    "charged",
    "twice",
    "account",
    "billing",
    "shipping",
    "technical",
    "delivery",
    "refund",
    "crash",
    "garbage",
    "more",
    "words",
)


def build_tokenizer(family: Family) -> Any:
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (*family.special, *family.added, "<unk-word>", *WORDS):
        vocab.setdefault(token, len(vocab))
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk-word>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.special])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.added])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=family.bos,
        eos_token=family.eos,
        unk_token="<unk-word>",
        pad_token=family.pad,
        additional_special_tokens=[t for t in family.special if t not in (family.bos, family.eos, family.pad)],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = family.template
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # as kubelora.trainer.modeling.load_tokenizer does
    return tok


def build_model(family: Family, tok: Any, seed: int = 0) -> Any:
    import torch
    import transformers

    config_class = getattr(transformers, family.architecture)
    config = config_class(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **dict(family.extra_config),
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = [tok.convert_tokens_to_ids(t) for t in family.generation_eos]
    model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()
    return model


def build(name: str, seed: int = 0) -> tuple[Family, Any, Any]:
    family = FAMILIES[name]
    tok = build_tokenizer(family)
    return family, tok, build_model(family, tok, seed)
