"""The Responses and Anthropic doors on the server's HTTP bridge: routes and the backend that
sends their neutral requests down the bridge's own path (identify -> grants, quotas, fair
admission, audit -> engine), so they obey exactly the rules the OpenAI endpoints obey."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.routing import Route

from lmlink.engine.types import GenerationRequest

from .anthropic_door import AnthropicDoor
from .door_common import DoorBackend, ResponseStore, with_api_key
from .responses_door import ResponsesDoor


def agent_routes(backend: DoorBackend, store: ResponseStore | None = None) -> list[Route]:
    responses = ResponsesDoor(backend, store)
    anthropic = AnthropicDoor(backend)
    return [
        Route("/v1/responses", responses.create, methods=["POST"]),
        Route("/v1/messages", anthropic.messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", anthropic.count_tokens, methods=["POST"]),
    ]


class _BridgeCall:
    def __init__(self, gen: Any, keepalive: float) -> None:
        self._gen = gen
        self._keepalive = keepalive
        self.model = gen.model
        self.request_id = gen.request_id

    async def events(self) -> AsyncIterator[Any]:
        """Engine events; None after `keepalive` seconds of silence (doors send a ping)."""
        while not self._gen.finished:
            events = await self._gen.next(self._keepalive)
            if events is None:
                yield None
                continue
            for event in events:
                yield event

    def close(self) -> None:
        self._gen.close()


class BridgeBackend:
    """DoorBackend over an HttpBridge (its private seam, on purpose: one path for every door)."""

    def __init__(self, bridge: Any) -> None:
        self._bridge = bridge

    async def open(self, request: Request, model: str, gen: GenerationRequest) -> _BridgeCall:
        request = with_api_key(request)
        caller = await self._bridge._identified(request)
        gen = replace(gen, owner=caller.identity.login_name)
        started = await self._bridge._start(caller, model, gen)
        return _BridgeCall(started, self._bridge.options.keepalive_seconds)

    async def caller_key(self, request: Request) -> str:
        from .http_bridge import _caller_key

        caller = await self._bridge._identified(with_api_key(request))
        return _caller_key(caller.identity)
