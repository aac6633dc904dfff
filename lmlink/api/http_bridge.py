"""The HTTP bridge: OpenAI-compatible endpoints and an iOS Shortcuts endpoint, in-process.

Why it exists: phones and existing tools speak HTTP + JSON (OpenAI's API, or a Shortcut's
"Get Contents of URL"), not gRPC. Why it is thin: it only translates JSON and bytes; who is
calling, grants, limits, fair admission, the engine and the audit trail are the call core's
(lmlink.api.core), exactly as for gRPC. Errors are the core's `CallError`s, mapped to
OpenAI's error shape by the shared HTTP shell (lmlink.api.http_shell).

Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming as Server-Sent Events,
or one JSON answer), GET /v1/models[/{id}], POST /v1/shortcuts/ask, GET /health.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from lmlink.access.identity import Identity
from lmlink.engine.types import (
    ChatTurn,
    GenerationRequest,
    SamplingOptions,
)

from .agent_doors import AGENT_PATHS, agent_routes
from .conversations import ConversationStore
from .core_backend import CoreBackend
from .core import Core, Generation
from .errors import CallError, ErrorKind
from .http_shell import (
    LOOPBACK_NAMES,
    ClientGone,
    EventStream,
    error_response,
    openai_app,
    peer_string,
    read_body,
    unless_disconnected,
)
from .door_common import ResponseStore
from .http_resume import StreamRoutes, sse
from .limits import Caller
from .openai_agent import Extras
from .openai_schema import (
    ApiError,
    CompletionCall,
    check_request_id,
    completion_body,
    model_card,
    parse_chat,
    parse_completion,
    parse_json,
)
from .status_door import StatusViews
from .shortcuts import answer_body, error_text, parse_ask, wants_text


@dataclass(frozen=True)
class BridgeOptions:
    """Limits of the HTTP door; defaults suit phones on a tailnet and local tools."""

    max_body_bytes: int = 4 * 1024 * 1024
    # An SSE comment after this much silence keeps proxies and clients from timing out
    # while a long prompt is processed or the request waits for a batch slot.
    keepalive_seconds: float = 10.0
    # Shortcuts give up on a request after roughly a minute; answer (with an error) before.
    shortcut_time_limit: float = 55.0
    conversation_ttl_seconds: float = 15 * 60
    max_conversations: int = 1024
    # Host names a request may name (None: any; TLS listeners pin names already).
    allowed_hosts: Collection[str] | None = LOOPBACK_NAMES
    allowed_origins: Collection[str] = ()  # browser UIs allowed to call (default: none)


class HttpBridge:
    """Builds the Starlette app over the call core; one instance per server."""

    def __init__(self, core: Core, options: BridgeOptions | None = None,
                 views: StatusViews | None = None) -> None:
        self.core = core
        self.options = options or BridgeOptions()
        self.conversations = ConversationStore(
            max_conversations=self.options.max_conversations,
            ttl_seconds=self.options.conversation_ttl_seconds,
        )
        self.responses = ResponseStore()  # previous_response_id state, bounded per caller
        self._started = int(time.time())
        self.views = views or StatusViews(core)

    def app(self) -> Any:
        return openai_app(
            [
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
                Route("/v1/shortcuts/ask", self.shortcuts_ask, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
                *StreamRoutes(self.core, self.options.keepalive_seconds).routes(),
                # Responses and Anthropic Messages: door modules over the same call core.
                *agent_routes(CoreBackend(self.core, self.options.keepalive_seconds), self.responses),
                *self.views.routes(self._caller),
            ],
            allowed_hosts=self.options.allowed_hosts,
            allowed_origins=self.options.allowed_origins,
            # The Shortcut endpoint also takes forms and text; the Origin check guards it.
            json_paths=("/v1/chat/completions", "/v1/completions", *AGENT_PATHS),
        )

    async def _caller(self, request: Request) -> Caller:
        return await self.core.identify(peer_string(request.scope),
                                        request.headers.get("authorization"))

    # ----- for other doors mounted on this app (Responses, Anthropic Messages) -----------------

    async def open(self, request: Request, model: str, gen: GenerationRequest) -> Generation:
        """Identify the caller of an HTTP request and open `gen` for it through the core."""
        return await self.core.open(await self._caller(request), model, gen, "http")

    async def caller_key(self, request: Request) -> str:
        """A stable key for the caller (state kept per caller, e.g. conversations)."""
        return _caller_key((await self._caller(request)).identity)

    # ----- OpenAI endpoints -----------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Any:
        return await self._complete(request, parse_chat)

    async def completions(self, request: Request) -> Any:
        return await self._complete(request, parse_completion)

    async def _complete(self, request: Request, parse: Callable[..., CompletionCall]) -> Any:
        caller = await self._caller(request)
        body = parse_json(await read_body(request, self.options.max_body_bytes))
        request_id = check_request_id(request.headers.get("x-request-id", ""))
        call = parse(body, request_id=request_id)
        gen = await self.core.open(caller, call.model, call.request, "http")
        headers = {"x-request-id": gen.request_id}
        if call.stream:  # resumable (lmlink.api.http_resume), one write per engine step
            tap = self.core.stream(gen, kind=call.kind, include_usage=call.include_usage)
            return EventStream(sse(tap, 0, self.options.keepalive_seconds, opening=True),
                               headers, on_close=tap.release)
        extras = Extras()  # text, tool calls and logprobs
        async with gen:
            try:
                done = await unless_disconnected(request.receive, extras.collect(gen))
            except ClientGone:
                return Response(status_code=499)  # nobody is listening; the slot is already free
        body = completion_body(call.kind, gen.request_id, gen.created, gen.model, extras.text,
                               done.finish_reason, done, extras)
        return JSONResponse(body, headers=headers)

    async def list_models(self, request: Request) -> Response:
        caller = await self._caller(request)
        data = [model_card(e.id, self._started, e.context_length)
                for e in self.core.list_models(caller) if e.state == "loaded"]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        caller = await self._caller(request)
        engine = self.core.find_model(caller, request.path_params["model"])
        return JSONResponse(model_card(engine.model_id, self._started, engine.loaded.context_length))

    # ----- Shortcuts ------------------------------------------------------------------------

    async def shortcuts_ask(self, request: Request) -> Response:
        """One question in, the whole answer out; remembers the conversation for follow-ups."""
        plain = wants_text(request.headers.get("accept", ""), request.query_params)
        try:
            return await self._ask(request, plain)
        except CallError as error:
            if plain:
                response = error_response(error)
                return PlainTextResponse(error_text(error), error.http_status,
                                         headers={k: v for k, v in response.headers.items()
                                                  if k == "retry-after"})
            return error_response(error)

    async def _ask(self, request: Request, plain: bool) -> Response:
        caller = await self._caller(request)
        raw = await read_body(request, self.options.max_body_bytes)
        ask = parse_ask(raw, request.headers.get("content-type", ""), request.query_params)
        conversation = ask.conversation or self.conversations.new_id()
        key = (_caller_key(caller.identity), conversation)
        if ask.new:
            self.conversations.forget(key)
        question = ChatTurn("user", ask.question)
        system = [ChatTurn("system", ask.system)] if ask.system else []
        history = self.conversations.history(key)
        defaults = SamplingOptions()
        sampling = SamplingOptions(
            temperature=defaults.temperature if ask.temperature is None else ask.temperature,
            max_tokens=ask.max_tokens,
        )
        request_id = check_request_id(request.headers.get("x-request-id", ""))
        while True:
            engine_request = GenerationRequest(
                request_id, messages=(*system, *history, question), sampling=sampling)
            try:
                gen = await self.core.open(caller, ask.model, engine_request, "http")
                break
            except CallError as error:
                # Too long for the model's context: drop the oldest exchange and try again.
                if error.kind is not ErrorKind.INVALID_ARGUMENT or not history:
                    raise
                history = history[2:]
        limit = self.options.shortcut_time_limit
        parts: list[str] = []
        async with gen:
            try:
                async with asyncio.timeout(limit):
                    text, done = await unless_disconnected(request.receive, gen.collect(parts))
            except ClientGone:
                return Response(status_code=499)
            except TimeoutError:
                raise ApiError(
                    504,
                    f"no complete answer within {limit:g} seconds; ask for a shorter answer",
                    code="timeout",
                    extra={"partial_answer": "".join(parts), "conversation": conversation},
                ) from None
        self.conversations.append(key, question, ChatTurn("assistant", text))
        headers = {"x-request-id": gen.request_id, "x-conversation-id": conversation}
        if plain:
            return PlainTextResponse(text, headers=headers)
        return JSONResponse(answer_body(text, conversation, gen.model, done), headers=headers)

    # ----- health ---------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """503 while loading (or if an engine died), 200 when generation works; no identity needed."""
        models = self.core.models
        if not models.ready.is_set():
            return JSONResponse({"status": "loading"}, 503, headers={"retry-after": "5"})
        if not models.healthy:
            return JSONResponse({"status": "unavailable"}, 503)
        return JSONResponse({"status": "ok"})


def _caller_key(identity: Identity) -> str:
    """Conversations belong to a caller on a device: login plus node (device) name."""
    return f"{identity.source}:{identity.login_name}:{identity.node_name}"
