"""Input and output of the iOS Shortcuts endpoint: one question in, one whole answer out.

The Shortcuts app's "Get Contents of URL" action cannot read a stream and shows whatever body
comes back, so this endpoint accepts what that action can send (a JSON body, a form, or plain
text with options in the query string) and answers in one piece: JSON, or plain text when
the caller asks for it. Parsing lives here so the bridge stays a thin adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import parse_qsl

from lmlink.engine.types import Completed

from .errors import CallError
from .openai_schema import ApiError, parse_json, usage

MAX_CONVERSATION_ID = 64
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Ask:
    """One Shortcut question and its options."""

    question: str
    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    system: str | None = None
    conversation: str | None = None  # continue this conversation (created if unknown)
    new: bool = False  # forget the conversation's history first


def parse_ask(raw: bytes, content_type: str, query: Mapping[str, str]) -> Ask:
    """Read a question from JSON, a urlencoded form, or plain text (options in the query)."""
    media = content_type.split(";", 1)[0].strip().lower()
    fields: dict[str, Any] = dict(query)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text", code="invalid_request") from None
    if media == "application/json" or (not media and text.lstrip().startswith("{")):
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise ApiError(400, 'send a JSON object like {"question": "..."}', code="invalid_request")
        fields.update(body)
    elif media == "application/x-www-form-urlencoded":
        fields.update(parse_qsl(text, keep_blank_values=True))
    elif not media or media.startswith("text/"):
        fields["question"] = text
    else:
        raise ApiError(
            415,
            f"cannot read a {media} body; send JSON, a form, or plain text",
            code="unsupported_media_type",
        )
    return Ask(
        question=_question(fields.get("question")),
        model=_string(fields, "model") or "",
        max_tokens=_number(fields, "max_tokens", int),
        temperature=_number(fields, "temperature", float),
        system=_string(fields, "system") or None,
        conversation=_conversation(fields.get("conversation")),
        new=_flag(fields, "new"),
    )


def wants_text(accept: str, query: Mapping[str, str]) -> bool:
    """Plain text if `?format=text`, or if Accept names text/plain but not JSON."""
    if query.get("format") in ("text", "json"):
        return query["format"] == "text"
    accept = accept.lower()
    return "text/plain" in accept and "application/json" not in accept


def answer_body(answer: str, conversation: str, model: str, done: Completed) -> dict[str, Any]:
    return {
        "answer": answer,
        "conversation": conversation,
        "model": model,
        "finish_reason": done.finish_reason,
        "usage": usage(done),
    }


def error_text(error: CallError) -> str:
    """The whole body in plain-text mode: one sentence a Shortcut can show as it is."""
    return f"Error: {error.message}"


def _question(value: Any) -> str:
    if not isinstance(value, str):
        raise ApiError(400, "question must be a string", code="invalid_value", param="question")
    if not value.strip():
        raise ApiError(400, "question is empty", code="invalid_value", param="question")
    return value


def _string(fields: Mapping[str, Any], key: str) -> str | None:
    value = fields.get(key)
    if value is None or isinstance(value, str):
        return value
    raise ApiError(400, f"{key} must be a string", code="invalid_value", param=key)


def _number(fields: Mapping[str, Any], key: str, kind: type) -> Any:
    value = fields.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, str):  # from a query string or form
        try:
            return kind(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if kind is float or float(value).is_integer():
            return kind(value)
    raise ApiError(400, f"{key} must be a number", code="invalid_value", param=key)


def _flag(fields: Mapping[str, Any], key: str) -> bool:
    value = fields.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ApiError(400, f"{key} must be true or false", code="invalid_value", param=key)


def _conversation(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ApiError(400, "conversation must be a string", code="invalid_value", param="conversation")
    if len(value) > MAX_CONVERSATION_ID or not value.isprintable():
        raise ApiError(
            400,
            f"conversation must be printable and at most {MAX_CONVERSATION_ID} characters",
            code="invalid_value",
            param="conversation",
        )
    return value
