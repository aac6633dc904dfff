"""The backend of the Responses and Anthropic doors on the server: their neutral requests go
through the call core (identify -> grants, quotas, fair admission, audit -> engine), so they
obey exactly the rules every other door obeys."""

from __future__ import annotations

from typing import Any, AsyncIterator

from starlette.requests import Request

from lmlink.engine.types import GenerationRequest

from .core import Core, Generation, owner_key
from .door_common import with_api_key
from .http_shell import peer_string


class _CoreCall:
    def __init__(self, gen: Generation, keepalive: float) -> None:
        self._gen = gen
        self._keepalive = keepalive
        self.model = gen.model
        self.request_id = gen.request_id

    async def events(self) -> AsyncIterator[Any]:
        """Engine events; None after `keepalive` seconds of silence (doors send a ping)."""
        while not self._gen.finished:
            events = await self._gen.next_step(self._keepalive)
            if events is None:
                yield None
                continue
            for event in events:
                yield event

    def close(self) -> None:
        self._gen.close()


class CoreBackend:
    """DoorBackend over the call core; `via` names the door in the audit trail."""

    def __init__(self, core: Core, keepalive_seconds: float = 10.0) -> None:
        self._core = core
        self._keepalive = keepalive_seconds

    async def _caller(self, request: Request) -> Any:
        request = with_api_key(request)
        return await self._core.identify(peer_string(request.scope), request.headers.get("authorization"))

    async def open(self, request: Request, model: str, gen: GenerationRequest) -> _CoreCall:
        caller = await self._caller(request)
        via = "anthropic" if request.url.path.startswith("/v1/messages") else "responses"
        return _CoreCall(await self._core.open(caller, model, gen, via), self._keepalive)

    async def caller_key(self, request: Request) -> str:
        return owner_key((await self._caller(request)).identity)
