"""What the Responses and Anthropic doors share: the backend they call, SSE framing, sampling.

A door only translates its JSON into a neutral `GenerationRequest` and engine events back
into its JSON. Where the request goes is a `DoorBackend`: on the server, the bridge's own
access + admission + engine path (so grants, quotas, fair admission and the audit trail apply
exactly as for the OpenAI endpoints); in `lmlink link`, the gRPC forwarder. Errors are the
core's `CallError`s and each door renders them in its own error shape.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Protocol

from starlette.requests import Request

from lmlink.engine.types import ChatTurn, GenerationRequest, SamplingOptions

from .openai_schema import ApiError


def bad_request(message: str, param: str | None = None) -> ApiError:
    """400 for a value the door cannot take (naming the parameter when there is one)."""
    return ApiError(400, message, code="invalid_value" if param else "invalid_request", param=param)


class DoorCall(Protocol):
    """One open generation: engine events (Started, TokenDelta, ToolCallEvent, Completed)."""

    model: str
    request_id: str

    def events(self) -> AsyncIterator[Any]: ...

    def close(self) -> None: ...


class DoorBackend(Protocol):
    async def open(self, request: Request, model: str, gen: GenerationRequest) -> DoorCall:
        """Identify the caller, check access and limits, submit; raise CallError if refused."""

    async def caller_key(self, request: Request) -> str:
        """A stable key for the caller (server-side state is kept per caller)."""


def with_api_key(request: Request) -> Request:
    """Anthropic clients send `x-api-key`; treat it as `Authorization: Bearer` when that is absent."""
    key = request.headers.get("x-api-key")
    if not key or request.headers.get("authorization"):
        return request
    scope = dict(request.scope)
    scope["headers"] = [*request.scope["headers"], (b"authorization", f"Bearer {key}".encode("latin-1"))]
    return Request(scope, request.receive)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def sse(event: str, data: Mapping[str, Any]) -> bytes:
    """One named Server-Sent Event (both APIs name their events)."""
    return b"event: " + event.encode() + b"\ndata: " + dumps(data) + b"\n\n"


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def number(body: Mapping[str, Any], key: str, kind: type, lo: float | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{key} must be a number", code="invalid_value", param=key)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ApiError(400, f"{key} must be an integer", code="invalid_value", param=key)
        value = int(value)
    if lo is not None and value < lo:
        raise ApiError(400, f"{key} must be >= {lo}", code="invalid_value", param=key)
    return kind(value)


def sampling(body: Mapping[str, Any], *, max_key: str, stop_key: str = "stop") -> SamplingOptions:
    """Temperature, top_p, top_k, max tokens, stop strings, seed from either API's body."""
    stop = body.get(stop_key)
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise ApiError(400, f"{stop_key} must be a list of strings", code="invalid_value", param=stop_key)
    d = SamplingOptions()
    t, p, k = number(body, "temperature", float), number(body, "top_p", float), number(body, "top_k", int)
    return SamplingOptions(
        temperature=d.temperature if t is None else t,
        top_p=d.top_p if p is None else p,
        top_k=d.top_k if k is None else k,
        max_tokens=number(body, max_key, int, 1),
        stop=stops,
        seed=number(body, "seed", int),
    )


@dataclass
class _Stored:
    turns: tuple[ChatTurn, ...]
    at: float
    chars: int


def _chars(turns: tuple[ChatTurn, ...]) -> int:
    return sum(len(t.content) + sum(len(c.arguments) for c in t.tool_calls) for t in turns)


class ResponseStore:
    """Conversations behind `previous_response_id`, per caller, bounded in count and age.

    Why bounded: the state lives in server memory for any caller who asks; each caller keeps at
    most `per_caller` responses, everyone together `total` responses and `max_chars` characters
    of text, none older than `ttl_seconds`. A caller can only continue its own responses.
    """

    def __init__(self, per_caller: int = 64, total: int = 2048, ttl_seconds: float = 3600.0,
                 max_chars: int = 64 * 1024 * 1024) -> None:
        self.per_caller, self.total, self.ttl, self.max_chars = per_caller, total, ttl_seconds, max_chars
        self._items: OrderedDict[tuple[str, str], _Stored] = OrderedDict()
        self._counts: dict[str, int] = {}
        self._chars = 0

    def get(self, caller: str, response_id: str) -> tuple[ChatTurn, ...] | None:
        self._expire()
        item = self._items.get((caller, response_id))
        return None if item is None else item.turns

    def put(self, caller: str, response_id: str, turns: tuple[ChatTurn, ...]) -> None:
        self._expire()
        item = _Stored(turns, time.monotonic(), _chars(turns))
        self._items[(caller, response_id)] = item
        self._chars += item.chars
        self._counts[caller] = self._counts.get(caller, 0) + 1
        while self._counts[caller] > self.per_caller:
            self._drop(next(k for k in self._items if k[0] == caller))
        while len(self._items) > self.total or (self._chars > self.max_chars and len(self._items) > 1):
            self._drop(next(iter(self._items)))

    def __len__(self) -> int:
        return len(self._items)

    def _drop(self, key: tuple[str, str]) -> None:
        self._chars -= self._items.pop(key).chars
        self._counts[key[0]] -= 1
        if not self._counts[key[0]]:
            del self._counts[key[0]]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items:
            key, item = next(iter(self._items.items()))
            if now - item.at <= self.ttl:
                break
            self._drop(key)
