"""The Responses and Anthropic doors on `lmlink link`: their neutral requests are forwarded
whole (every agent field) over gRPC by the link's router, with its failover before the first
token; the server applies access rules, limits and the audit trail."""

from __future__ import annotations

import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request

from lmlink.api.openai_schema import ApiError, CompletionCall
from lmlink.client import events as ev
from lmlink.client.errors import LmlinkError
from lmlink.engine.types import (
    Completed,
    Event,
    GenerationRequest,
    Started,
    TokenDelta,
    TokenLogprob,
    ToolCall,
    ToolCallEvent,
    TopLogprob,
)


def from_client_event(event: Any) -> Event | None:
    """The client's TokenDelta / ToolCall as the engine events the OpenAI renderers take."""
    if isinstance(event, ev.TokenDelta):
        lps = [
            TokenLogprob(lp.token_id, lp.token, lp.logprob, lp.bytes,
                         tuple(TopLogprob(t.token_id, t.token, t.logprob, t.bytes) for t in lp.top))
            for lp in event.logprobs
        ] or None
        return TokenDelta(event.text, list(event.token_ids), lps)
    if isinstance(event, ev.ToolCall):
        return ToolCallEvent(ToolCall(event.id, event.name, event.arguments, event.index))
    return None


def _completed(done: ev.Completed) -> Completed:
    u, t = done.usage, done.timings
    reason = done.finish_reason if done.finish_reason != "unspecified" else "stop"
    return Completed(reason, u.prompt_tokens, u.completion_tokens, u.cached_tokens,  # type: ignore[arg-type]
                     t.time_to_first_token_ms, t.total_ms, t.tokens_per_second,
                     t.prompt_tokens_per_second, t.queued_ms)


class _LinkCall:
    def __init__(self, app: Any, up: Any, request_id: str) -> None:
        self._app, self._up = app, up
        self.model = up.model
        self.request_id = request_id

    async def events(self) -> AsyncIterator[Any]:
        try:
            async for event in self._app._events(self._up):
                if isinstance(event, ev.Started):
                    yield Started(event.model, event.prompt_tokens, event.cached_tokens)
                elif isinstance(event, ev.Completed):
                    yield _completed(event)
                    return
                elif (agent := from_client_event(event)) is not None:
                    yield agent
        except LmlinkError as exc:
            raise ApiError(502, f"{self._up.server.label} failed after the answer started: {exc}",
                           code="upstream_failed") from None
        raise ApiError(502, f"{self._up.server.label} ended the answer without completing it",
                       code="upstream_failed")

    def close(self) -> None:
        self._app._release(self._up)  # idempotent; cancels on the server unless finished


class LinkBackend:
    def __init__(self, app: Any) -> None:
        self._app = app

    async def open(self, request: Request, model: str, gen: GenerationRequest) -> _LinkCall:
        from .app import _local_only

        _local_only(request)
        kind = "chat" if gen.messages is not None else "text"
        request_id = uuid.uuid4().hex
        self._app.stats.requests += 1
        up = await self._app._open(CompletionCall(kind, model, gen), request_id)
        return _LinkCall(self._app, up, request_id)

    async def caller_key(self, request: Request) -> str:
        from .app import _local_only

        _local_only(request)
        return "local"  # the link serves its own user only (loopback)
