"""`lmlink link`: remote lmlink models on a loopback OpenAI-compatible endpoint.

Every request is parsed and checked with the same OpenAI schema code the server's HTTP bridge
uses (lmlink.api.openai_schema), then forwarded with lmlink's own gRPC client to the server the
Router picks, so tokens stream end to end, a client disconnect cancels the generation on the
server, and the server sees the laptop user's own identity (tailnet WhoIs / client cert).

Failover: if the chosen server fails before the first token, the request is retried once on the
next candidate. Once a token has been sent the answer cannot be moved without duplicating
output, so a failure then ends the stream with an in-band OpenAI error event and `[DONE]`.

Endpoints: GET /v1/models[/{id}], POST /v1/chat/completions, POST /v1/completions (streaming
or not), GET /health, GET /status (servers, their load and latency, preferences).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from importlib import resources
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import grpc
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from lmlink.api.agent_doors import AGENT_PATHS, agent_routes
from lmlink.api.agent_wire import request_to_wire
from lmlink.api.errors import CallError, kind_of_status
from lmlink.api.gate import is_loopback_peer
from lmlink.api.http_shell import (
    PAGE_HEADERS,
    LOOPBACK_NAMES,
    ClientGone,
    EventStream,
    openai_app,
    peer_string,
    read_body,
    unless_disconnected,
)
from lmlink.api.openai_agent import Extras
from lmlink.api.openai_schema import (
    DONE,
    ApiError,
    ChunkEncoder,
    CompletionCall,
    check_request_id,
    completion_body,
    error_event,
    parse_chat,
    parse_completion,
    parse_json,
)
from lmlink.client import events as ev
from lmlink.client.errors import LmlinkError
from lmlink.v1 import inference_pb2 as pb

from .doors import LinkBackend, from_client_event
from .router import DENIALS, NoServer, Router, Server

log = logging.getLogger("lmlink.link")
MAX_BODY = 4 * 1024 * 1024

# Worth another server: it is down, overloaded, no longer has the model, or refuses this user
# (another server may grant what this one does not).
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED, *DENIALS,
}


def api_error(exc: LmlinkError, server: Server) -> CallError:
    """The server's failure as the bridge itself would have reported it (same kind table)."""
    kind = kind_of_status(exc.code, exc.kind)
    return CallError(kind, f"{server.label}: {exc}", code=exc.reason or None,
                     retry_after=exc.retry_after if exc.retry_after is not None
                     else (2 if kind.http_status in (429, 503) else None))


@dataclass
class _Upstream:
    """An open generation on one server, with the events read before the first token."""

    server: Server
    stream: Any
    events: AsyncIterator[ev.Event]
    head: list[ev.Event]
    model: str
    released: bool = False

_PAGE = resources.files("lmlink.observe").joinpath("static/link.html")


class LinkStats:
    def __init__(self) -> None:
        self.requests = 0
        self.active = 0
        self.failovers = 0
        self.errors = 0
        self.routes: deque[dict[str, Any]] = deque(maxlen=20)  # recent routing choices

    def routed(self, model: str, server: str, why: str) -> None:
        self.routes.appendleft({"at": time.time(), "model": model, "server": server, "why": why})


class LinkApp:
    def __init__(self, router: Router, *, allowed_origins: tuple[str, ...] = ()) -> None:
        self.router = router
        self.stats = LinkStats()
        self.allowed_origins = allowed_origins
        self._started = int(time.time())

    def app(self) -> Any:
        return openai_app(
            [
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/status", self.status, methods=["GET"]),
                Route("/", self.page, methods=["GET"]),
                *agent_routes(LinkBackend(self)),  # Responses and Anthropic Messages
            ],
            # The link speaks with this user's tailnet identity over plaintext loopback: a web
            # page must not reach it, by rebinding a name or by a cross-origin POST.
            allowed_hosts=LOOPBACK_NAMES,
            allowed_origins=self.allowed_origins,
            json_paths=("/v1/chat/completions", "/v1/completions", *AGENT_PATHS),
        )

    # ----- models ------------------------------------------------------------------------------

    def _cards(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = []
        for model, servers in self.router.models():
            ctx = servers[0].context.get(model, 0)
            data.append({"id": model, "object": "model", "created": self._started,
                         "owned_by": servers[0].label, "context_length": ctx,
                         "servers": [s.label for s in servers]})
            for s in servers:  # `model@server` pins a request to that server
                data.append({"id": f"{model}@{s.label}", "object": "model",
                             "created": self._started, "owned_by": s.label,
                             "context_length": s.context.get(model, 0), "servers": [s.label]})
        return data

    async def list_models(self, request: Request) -> Response:
        _local_only(request)
        # Tools list models to offer a choice: show what is loaded now (probe if > 1 s old).
        if time.monotonic() - self.router.last_refresh > 1.0:
            await self.router.refresh(timeout=1.0)
        return JSONResponse({"object": "list", "data": self._cards()})

    async def get_model(self, request: Request) -> Response:
        _local_only(request)
        name = request.path_params["model"]
        for card in self._cards():
            if card["id"] == name:
                return JSONResponse(card)
        raise ApiError(404, f"model {name!r} is not loaded on any reachable server",
                       code="model_not_found", param="model")

    async def health(self, request: Request) -> Response:
        up = [s.label for s in self.router.servers.values() if s.up]
        if not up:
            return JSONResponse({"status": "no_server", "message": self.router.unreachable_message()},
                                503, headers={"retry-after": "2"})
        return JSONResponse({"status": "ok", "servers_up": up})

    async def status(self, request: Request) -> Response:
        _local_only(request)
        s = self.stats
        return JSONResponse({**self.router.status(), "requests": s.requests,
                             "active": s.active, "failovers": s.failovers, "errors": s.errors,
                             "recent_routes": list(s.routes)})

    async def page(self, request: Request) -> Response:
        """The laptop side's status page: servers, paths, latency, routing choices."""
        _local_only(request)
        return HTMLResponse(_PAGE.read_text(encoding="utf-8"), headers=PAGE_HEADERS)

    # ----- completions ---------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Any:
        return await self._complete(request, parse_chat)

    async def completions(self, request: Request) -> Any:
        return await self._complete(request, parse_completion)

    async def _complete(self, request: Request, parse: Callable[..., CompletionCall]) -> Any:
        _local_only(request)
        call = parse(parse_json(await read_body(request, MAX_BODY)))
        request_id = check_request_id(request.headers.get("x-request-id", "")) or uuid.uuid4().hex
        self.stats.requests += 1
        try:
            up = await unless_disconnected(request.receive, self._open(call, request_id))
        except ClientGone:
            return Response(status_code=499)
        headers = {"x-request-id": request_id, "x-lmlink-server": up.server.label}
        created = int(time.time())
        if call.stream:
            return EventStream(self._chunks(up, call, request_id, created), headers,
                               on_close=lambda: self._release(up))
        extras = Extras()  # tool calls and logprobs
        try:
            text, done = await unless_disconnected(request.receive, self._collect(up, extras))
        except ClientGone:
            return Response(status_code=499)
        finally:
            self._release(up)
        body = completion_body(call.kind, request_id, created, up.model, text,
                               _finish(done), done.usage, extras)
        return JSONResponse(body, headers=headers)

    async def _open(self, call: CompletionCall, request_id: str) -> _Upstream:
        """Start the generation on the best server, up to its first token; one retry before it."""
        try:
            servers, pinned = self.router.candidates(call.model)
        except NoServer as exc:
            if exc.status == 503:  # maybe one just came back: look again before refusing
                await self.router.refresh(only_down=True, timeout=1.0)
                try:
                    servers, pinned = self.router.candidates(call.model)
                except NoServer as again:
                    raise _no_server(again) from None
            else:
                raise _no_server(exc) from None
        options = request_to_wire(call.request)  # every field, forwarded unchanged
        name = self.router.split_pin(call.model)[0]
        tried: list[str] = []
        refusals: list[int] = []  # HTTP status of each attempt a server refused
        attempts = servers[:1] if pinned else servers[:2]
        for i, server in enumerate(attempts):
            model = (server.model_id(name) or name) if name else ""
            try:
                up = await self._first_token(server, model, request_id, options)
                self.stats.routed(call.model, server.label,
                                  "preferred" if pinned else f"after {len(tried)} failed" if tried
                                  else "best path, latency and load")
                return up
            except LmlinkError as exc:
                retry = exc.code in _RETRYABLE and i + 1 < len(attempts)
                tried.append(f"{server.label} ({server.target}): {exc}")
                if exc.code in DENIALS:
                    refusals.append(DENIALS[exc.code])
                if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.router.mark_failed(server, str(exc))
                if not retry:
                    self.stats.errors += 1
                    if len(tried) > 1 and len(refusals) == len(tried):  # all refused this user
                        raise ApiError(403 if 403 in refusals else 401,
                                       "refused by " + "; ".join(tried),
                                       code=DENIAL_CODES[403 if 403 in refusals else 401]) from None
                    if len(tried) > 1 or exc.code == grpc.StatusCode.UNAVAILABLE:
                        down = [f"{s.label} ({s.target}): {s.error}"
                                for s in self.router.servers.values()
                                if not s.up and s not in attempts]
                        raise ApiError(503, "no server could take the request; tried "
                                       + "; ".join(tried)
                                       + (f"; also down: {'; '.join(down)}" if down else ""),
                                       code="no_server_available", retry_after=2) from None
                    raise api_error(exc, server) from None
                self.stats.failovers += 1
                log.info("request %s: %s failed before its first token (%s); trying %s",
                         request_id, server.label, exc, attempts[i + 1].label)
        raise ApiError(503, "no server could take the request", code="no_server_available")

    async def _first_token(self, server: Server, model: str, request_id: str,
                           options: pb.GenerateRequest) -> _Upstream:
        client = await self.router.client(server)
        wire = pb.GenerateRequest()
        wire.CopyFrom(options)
        wire.model, wire.request_id = model, request_id
        # Before the first event the link fails over to another server itself; after it, a
        # dropped connection is resumed (lmlink.client.resume) instead of failing the answer.
        stream = client.stream_request(wire, retry_before_first_event=False)
        events = stream.__aiter__()
        head: list[ev.Event] = []
        server.inflight += 1
        try:
            async for event in events:
                head.append(event)
                if isinstance(event, (ev.TokenDelta, ev.Completed)):
                    break
        except BaseException:
            server.inflight -= 1
            stream.cancel()
            raise
        started = next((e for e in head if isinstance(e, ev.Started)), None)
        return _Upstream(server, stream, events, head, started.model if started else model)

    async def _events(self, up: _Upstream) -> AsyncIterator[ev.Event]:
        """The head events, then the rest of the stream; always releases the upstream."""
        self.stats.active += 1
        try:
            for event in up.head:
                yield event
            if up.head and isinstance(up.head[-1], ev.Completed):
                return
            async for event in up.events:
                yield event
        finally:
            self.stats.active -= 1
            self._release(up)

    def _release(self, up: _Upstream) -> None:
        """Give the upstream back (idempotent): cancels it on the server unless it finished."""
        if not up.released:
            up.released = True
            up.server.inflight -= 1
            up.stream.cancel()  # no-op when finished

    async def _collect(self, up: _Upstream, extras: Extras | None = None) -> tuple[str, ev.Completed]:
        parts: list[str] = []
        try:
            async for event in self._events(up):
                if extras is not None and (agent := from_client_event(event)) is not None:
                    extras.add(agent)
                if isinstance(event, ev.TokenDelta):
                    parts.append(event.text)
                elif isinstance(event, ev.Completed):
                    return "".join(parts), event
        except LmlinkError as exc:
            self.stats.errors += 1
            raise ApiError(502, f"{up.server.label} failed after the answer started: {exc}; "
                           "not retried elsewhere (the answer would be duplicated)",
                           code="upstream_failed") from None
        raise ApiError(502, f"{up.server.label} ended the answer without completing it",
                       code="upstream_failed")

    async def _chunks(self, up: _Upstream, call: CompletionCall, request_id: str,
                      created: int) -> AsyncIterator[bytes]:
        """SSE chunks of the upstream stream; a failure after the first token ends it in-band."""
        encoder = ChunkEncoder(call.kind, request_id, created, up.model, call.include_usage)
        opening = encoder.role()
        if opening:
            yield opening
        try:
            async for event in self._events(up):
                if isinstance(event, (ev.TokenDelta, ev.ToolCall)):
                    chunk = encoder.event(from_client_event(event))  # text (+ logprobs) or a call
                    if chunk:
                        yield chunk
                elif isinstance(event, ev.Completed):
                    chunk = encoder.finish(_finish(event))
                    if call.include_usage:
                        chunk += encoder.usage(event.usage)
                    yield chunk + DONE
                    return
        except LmlinkError as exc:
            self.stats.errors += 1
            error = ApiError(502, f"{up.server.label} failed after the answer started: {exc}; "
                             "the answer is incomplete and was not retried elsewhere "
                             "(that would duplicate output)", code="upstream_failed")
            yield error_event(error) + DONE
            return
        error = ApiError(502, f"{up.server.label} ended the stream without completing it",
                         code="upstream_failed")
        yield error_event(error) + DONE


def _finish(done: ev.Completed) -> str:
    return done.finish_reason if done.finish_reason != "unspecified" else "stop"


def _local_only(request: Request) -> None:
    """The link speaks for this laptop's user: only processes on this machine may use it."""
    if not is_loopback_peer(peer_string(request.scope)):
        raise ApiError(403, "lmlink link only serves this machine (loopback)",
                       code="permission_denied")


DENIAL_CODES = {403: "permission_denied", 401: "unauthenticated"}


def _no_server(exc: NoServer) -> ApiError:
    if exc.status == 404:
        return ApiError(404, exc.message, code="model_not_found", param="model")
    if exc.status in DENIAL_CODES:
        return ApiError(exc.status, exc.message, code=DENIAL_CODES[exc.status])
    return ApiError(503, exc.message, code="no_server_reachable", retry_after=2)
