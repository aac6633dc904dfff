"""OpenAI's JSON shapes <-> engine types: request parsing, responses, stream chunks, errors.

Why a module of its own, with no web framework in it: the HTTP bridge should only read bodies,
check access and move bytes, while this mapping (which fields exist, which we refuse, what the
answer looks like) is testable on its own and reusable by a future `lmlink link` forwarder.

Tools, tool_choice, response_format and logprobs are parsed by lmlink.api.openai_agent and
enforced by the engine. Fields we cannot honour but that change the *shape* of an answer
(n > 1, legacy `functions`, echo, suffix) are refused with a 400 rather than silently ignored; knobs that
only nudge sampling and that we do not implement (presence/frequency penalties, logit_bias,
user, metadata, ...) are accepted and ignored, as most OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping, Protocol

from lmlink.engine.types import ChatTurn, GenerationRequest, SamplingOptions

from .errors import CallError, ErrorKind

Kind = Literal["chat", "text"]
MAX_REQUEST_ID_LENGTH = 128  # same bound as the gRPC path (lmlink.api.convert)

# OpenAI's error "type" per HTTP status; the Python SDK maps the status to an exception class.
_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "server_error",
}


_KIND_BY_STATUS: dict[int, ErrorKind] = {
    400: ErrorKind.INVALID_ARGUMENT, 401: ErrorKind.UNAUTHENTICATED,
    403: ErrorKind.PERMISSION_DENIED, 404: ErrorKind.NOT_FOUND, 409: ErrorKind.ALREADY_EXISTS,
    413: ErrorKind.TOO_LARGE, 415: ErrorKind.UNSUPPORTED_MEDIA, 429: ErrorKind.RESOURCE_EXHAUSTED,
    502: ErrorKind.UPSTREAM, 503: ErrorKind.UNAVAILABLE, 504: ErrorKind.DEADLINE_EXCEEDED,
}


class ApiError(CallError):
    """A CallError raised by HTTP-only code (body parsing, the link), named by its status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        kind = _KIND_BY_STATUS.get(status, ErrorKind.INTERNAL if status >= 500 else ErrorKind.INVALID_ARGUMENT)
        super().__init__(kind, message, code=code, param=param, retry_after=retry_after, extra=extra)
        self.status = status

    @property
    def http_status(self) -> int:
        return self.status


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(error: CallError) -> dict[str, Any]:
    """OpenAI's error body for any CallError (extra top-level fields kept, e.g. a partial answer)."""
    return {
        "error": {
            "message": error.message,
            "type": error_type(error.http_status),
            "param": error.param,
            "code": error.code,
        },
        **error.extra,
    }


# ----- request parsing ---------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionCall:
    """A parsed /v1/chat/completions or /v1/completions body, ready for `Engine.submit`."""

    kind: Kind
    model: str
    request: GenerationRequest
    stream: bool = False
    include_usage: bool = False


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes) -> Any:
    """The body as JSON; 400 for bad JSON, nesting too deep, or text that is not Unicode
    (a lone UTF-16 surrogate such as "\\ud800" cannot be encoded or tokenized)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(raw):  # pairs are fine; only a lone half is not text
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the request body contains a lone UTF-16 surrogate (\\ud800-"
                           "\\udfff); it is not text", code="invalid_json") from None
    return body


def parse_chat(body: Any, *, request_id: str = "", owner: str = "") -> CompletionCall:
    """POST /v1/chat/completions."""
    body = _object(body)
    _refuse_unsupported(body)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _invalid("messages must be a non-empty list of chat messages", "messages")
    messages = tuple(_chat_turn(m, i) for i, m in enumerate(raw))
    from . import openai_agent as agent

    sampling = replace(_sampling(body), logprobs=agent.parse_chat_logprobs(body))
    request = GenerationRequest(
        request_id, messages=messages, sampling=sampling, owner=owner,
        tools=agent.parse_tools(body.get("tools")),
        tool_choice=agent.parse_tool_choice(body.get("tool_choice")),
        response_format=agent.parse_response_format(body.get("response_format")),
    )
    return _call("chat", body, request)


def parse_completion(body: Any, *, request_id: str = "", owner: str = "") -> CompletionCall:
    """POST /v1/completions (legacy text completions; a string prompt)."""
    body = _object(body)
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # some SDKs always send a list
    if not isinstance(prompt, str):
        raise _invalid("prompt must be a string (token arrays and batches are not supported)", "prompt")
    if body.get("echo"):
        raise _unsupported("echo is not supported", "echo")
    if body.get("suffix"):
        raise _unsupported("suffix is not supported", "suffix")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise _unsupported("only best_of=1 is supported", "best_of")
    from . import openai_agent as agent

    sampling = replace(_sampling(body), logprobs=agent.parse_completion_logprobs(body))
    request = GenerationRequest(
        request_id, prompt=prompt, sampling=sampling, owner=owner,
        response_format=agent.parse_response_format(body.get("response_format")),
    )
    return _call("text", body, request)


def check_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise ApiError(
            400, f"request id is longer than {MAX_REQUEST_ID_LENGTH} characters", code="invalid_request"
        )
    return request_id


def _call(kind: Kind, body: Mapping[str, Any], request: GenerationRequest) -> CompletionCall:
    model = _opt(body, "model", str) or ""
    stream = bool(_opt(body, "stream", bool))
    include_usage = False
    options = body.get("stream_options")
    if stream and options is not None:
        if not isinstance(options, dict):
            raise _invalid("stream_options must be an object", "stream_options")
        include_usage = bool(_opt(options, "include_usage", bool, "stream_options.include_usage"))
    return CompletionCall(kind, model, request, stream=stream, include_usage=include_usage)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    return body


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    n = _opt(body, "n", int)
    if n is not None and n != 1:
        raise _unsupported("only n=1 is supported", "n")
    if body.get("functions") or body.get("function_call"):
        raise _unsupported("legacy functions are not supported; use tools", "functions")


def _chat_turn(raw: Any, i: int) -> ChatTurn:
    where = f"messages[{i}]"
    if not isinstance(raw, dict):
        raise _invalid(f"{where} must be an object with role and content", where)
    role = raw.get("role")
    if not isinstance(role, str):
        raise _invalid(f"{where}.role must be a string", f"{where}.role")
    if role == "developer":  # OpenAI's newer name for the system role
        role = "system"
    content = _content(raw.get("content"), role, f"{where}.content")
    if role in ("assistant", "tool"):
        from .openai_agent import parse_turn_tools

        return parse_turn_tools(raw, role, content, where)
    return ChatTurn(role, content)


def _content(content: Any, role: str, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role in ("assistant", "tool"):
        return ""
    if isinstance(content, list):
        texts: list[str] = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _invalid(f"{where}[{j}] must be a content part object with a type", where)
            if part["type"] != "text":
                raise _unsupported(
                    f"{where}[{j}] is a {part['type']!r} part; only text parts are supported", where
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise _invalid(f"{where}[{j}].text must be a string", where)
            texts.append(text)
        return "".join(texts)
    raise _invalid(f"{where} must be a string or a list of text parts", where)


def _sampling(body: Mapping[str, Any]) -> SamplingOptions:
    defaults = SamplingOptions()
    max_tokens = _opt(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _opt(body, "max_tokens", int)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise _invalid("stop must be a string or a list of strings", "stop")
    temperature = _opt(body, "temperature", float)
    top_p = _opt(body, "top_p", float)
    # top_k, min_p, repetition_penalty, ignore_eos: not OpenAI's, accepted as vLLM does.
    top_k = _opt(body, "top_k", int)
    min_p = _opt(body, "min_p", float)
    return SamplingOptions(
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        top_k=defaults.top_k if top_k is None else top_k,
        min_p=defaults.min_p if min_p is None else min_p,
        max_tokens=max_tokens,
        stop=stops,
        seed=_opt(body, "seed", int),
        repetition_penalty=_opt(body, "repetition_penalty", float),
        ignore_eos=bool(_opt(body, "ignore_eos", bool)),  # vLLM's extension, for load tests
        speculate=_opt(body, "speculate", bool),  # lmlink's: speculative decoding on/off
    )


_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number"}


def _opt(body: Mapping[str, Any], key: str, kind: type, param: str | None = None) -> Any:
    """body[key] if present and not null, checked against `kind` (bool is not a number here)."""
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not ok:
        name = param or key
        raise _invalid(f"{name} must be {_TYPE_NAMES[kind]}, got {json.dumps(value)[:40]}", name)
    return value


def _invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, code="invalid_value" if param else "invalid_request", param=param)


def _unsupported(message: str, param: str) -> ApiError:
    return ApiError(400, message, code="unsupported_parameter", param=param)


# ----- responses ---------------------------------------------------------------------------


class UsageCounts(Protocol):
    """Token counts of a finished generation: the engine's `Completed` and the client's
    `Usage` both have them, so the bridge and the link encode the same way."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


def usage(counts: UsageCounts) -> dict[str, Any]:
    return {
        "prompt_tokens": counts.prompt_tokens,
        "completion_tokens": counts.completion_tokens,
        "total_tokens": counts.prompt_tokens + counts.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": counts.cached_tokens},
    }


def response_id(kind: Kind, request_id: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id


def completion_body(
    kind: Kind, request_id: str, created: int, model: str, text: str, finish_reason: str,
    counts: UsageCounts, extras: Any = None,
) -> dict[str, Any]:
    """The non-streaming answer (`extras`: an openai_agent.Extras with tool calls / logprobs)."""
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if extras is not None and extras.tool_calls:
            message["content"] = text or None
            message["tool_calls"] = extras.tool_calls_json()
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "logprobs": extras.logprobs_json(kind) if extras is not None else None,
            "finish_reason": finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text,
                  "logprobs": extras.logprobs_json(kind) if extras is not None else None,
                  "finish_reason": finish_reason}
        obj = "text_completion"
    return {
        "id": response_id(kind, request_id),
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": usage(counts),
    }


def model_card(model_id: str, created: int, context_length: int) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "lmlink",
        "context_length": context_length,
    }


DONE = b"data: [DONE]\n\n"


@dataclass
class ChunkEncoder:
    """Server-Sent Event bytes for one stream, from a precomputed template.

    Every chunk of a stream shares its id, object, created and model, so those are encoded
    once; a token delta then costs one `json.dumps` of its text and a few byte joins.
    """

    kind: Kind
    request_id: str
    created: int
    model: str
    include_usage: bool = False
    _head: bytes = field(init=False, repr=False)
    _tail: bytes = field(init=False, repr=False)
    _usage_null: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        head = {
            "id": response_id(self.kind, self.request_id),
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }
        self._head = b"data: " + _dumps(head)[:-1] + b',"choices":[{"index":0,'
        self._tail = b',"logprobs":null,"finish_reason":'
        self._usage_null = b',"usage":null' if self.include_usage else b""

    def _chunk(self, payload: bytes, finish: str | None) -> bytes:
        reason = b"null" if finish is None else _dumps(finish)
        return self._head + payload + self._tail + reason + b"}]" + self._usage_null + b"}\n\n"

    def role(self) -> bytes:
        """Chat streams open with the assistant role, as OpenAI's do."""
        if self.kind != "chat":
            return b""
        return self._chunk(b'"delta":{"role":"assistant","content":""}', None)

    def delta(self, text: str) -> bytes:
        if self.kind == "chat":
            return self._chunk(b'"delta":{"content":' + _dumps(text) + b"}", None)
        return self._chunk(b'"text":' + _dumps(text), None)

    def event(self, event: Any) -> bytes:
        """Chunk bytes for a token delta (with logprobs if any) or a tool call; b"" if none."""
        from .openai_agent import agent_chunk

        return agent_chunk(self, event)

    def finish(self, reason: str) -> bytes:
        payload = b'"delta":{}' if self.kind == "chat" else b'"text":""'
        return self._chunk(payload, reason)

    def usage(self, counts: UsageCounts) -> bytes:
        """The extra final chunk `stream_options.include_usage` asks for: no choices, usage."""
        head = self._head[: -len(b'"choices":[{"index":0,')]
        return head + b'"choices":[],"usage":' + _dumps(usage(counts)) + b"}\n\n"


def error_event(error: CallError) -> bytes:
    """An error after the stream started (the status is already 200): OpenAI's in-band form."""
    return b"data: " + _dumps(error_body(error)) + b"\n\n"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
