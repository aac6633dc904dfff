"""Turn a request's chat messages or raw prompt into token ids, with clear errors."""

from __future__ import annotations

from typing import Any

from .tools import render_chat
from .types import CHAT_ROLES, GenerationRequest, InvalidRequest

MAX_MESSAGES = 1024


def encode_prompt(tokenizer: Any, request: GenerationRequest) -> list[int]:
    """Token ids the model sees: the chat template applied to messages, or the raw prompt."""
    ids = _encode_request(tokenizer, request)
    limit = request.max_prompt_tokens
    if limit is not None and len(ids) > limit:
        raise InvalidRequest(f"the prompt is {len(ids)} tokens; your access allows at most "
                             f"{limit} tokens per prompt")
    return ids


def _encode_request(tokenizer: Any, request: GenerationRequest) -> list[int]:
    if (request.messages is None) == (request.prompt is None):
        raise InvalidRequest("send either chat messages or a raw prompt")
    if request.prompt is not None:
        if not request.prompt:
            raise InvalidRequest("prompt is empty")
        return _encode(tokenizer, request.prompt)
    messages = request.messages or ()
    if not messages:
        raise InvalidRequest("messages is empty; send at least one chat message")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"at most {MAX_MESSAGES} messages are allowed, got {len(messages)}")
    for i, turn in enumerate(messages):
        if turn.role not in CHAT_ROLES:
            raise InvalidRequest(
                f"message {i} has role {turn.role!r}; use system, user, assistant or tool"
            )
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model has no chat template; send a raw prompt instead")
    text = render_chat(tokenizer, request)  # tools, tool calls and results included
    ids = _encode(tokenizer, text)
    if not ids:
        raise InvalidRequest("the conversation encodes to no tokens")
    return ids


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text`; a tokenizer failure is the caller's bad input, not a server bug."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except Exception as exc:  # e.g. TypeError on a lone UTF-16 surrogate
        raise InvalidRequest(f"the text cannot be tokenized: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """One short line naming the failure, never the prompt text."""
    first = (str(exc).splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
