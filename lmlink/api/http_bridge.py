"""The HTTP bridge: OpenAI-compatible endpoints and an iOS Shortcuts endpoint, in-process.

Why it exists: phones and existing tools speak HTTP + JSON (OpenAI's API, or a Shortcut's
"Get Contents of URL"), not gRPC. Why it is thin: it uses exactly the seam the gRPC servicer
uses -- `Gate` for who is calling and what they may do, `ModelRegistry` for which engine,
`StreamHub` queues (one asyncio wake per engine step) for events -- and only translates JSON
and bytes. Access, batching and cancellation therefore behave the same on both doors.

Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming as Server-Sent Events,
or one JSON answer), GET /v1/models[/{id}], POST /v1/shortcuts/ask, GET /health.

Identity comes from the listener (the transport peer, mapped by the Gate exactly as for
gRPC). A `BearerVerifier` can be plugged in for callers the listener cannot identify; it is
consulted only then, so a tool sending a placeholder API key over an identified connection
keeps working. A server built by `lmlink serve` passes a `limits.Guard` instead, which does the
same for lmlink's own bearer tokens (`lmk_...`, which name their holder on any connection) and
adds quotas, fair admission, revocation of running streams and the audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Protocol, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from lmlink.access.identity import Identity
from lmlink.engine.registry import ModelRegistry
from lmlink.engine.types import (
    ChatTurn,
    Completed,
    EngineError,
    Event,
    Failed,
    GenerationRequest,
    ModelNotFound,
    PromptProgress,
    SamplingOptions,
    TokenDelta,
    ToolCallEvent,
)

from .agent_doors import BridgeBackend, agent_routes
from .conversations import ConversationStore
from .door_common import ResponseStore
from .convert import merge_deltas
from .gate import Gate
from .limits import Caller, Guard, Lease, Refusal
from .openai_agent import Extras
from .openai_schema import (
    DONE,
    ApiError,
    ChunkEncoder,
    CompletionCall,
    check_request_id,
    completion_body,
    error_event,
    error_for,
    model_card,
    parse_chat,
    parse_completion,
    parse_json,
)
from .shortcuts import answer_body, error_text, parse_ask, wants_text
from .streams import EventQueue, StreamHub

log = logging.getLogger("lmlink.http")
T = TypeVar("T")
KEEPALIVE = b": keep-alive\n\n"


class BearerVerifier(Protocol):
    """Maps an `Authorization: Bearer` token to the identity it was issued to (None: invalid)."""

    def verify(self, token: str) -> Identity | None: ...


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
    bearer: BearerVerifier | None = None


def peer_string(scope: Scope) -> str:
    """The transport peer in grpc's `context.peer()` form, so one Gate serves both doors."""
    client = scope.get("client")
    if not client:
        return ""
    host, port = client[0], client[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was complete."""


@dataclass(eq=False)
class _Generation:
    """One submitted engine request as the bridge sees it; `close()` frees its slot if unfinished."""

    engine: Any
    queue: EventQueue
    request_id: str
    identity: Identity
    created: int = field(default_factory=lambda: int(time.time()))
    finished: bool = False
    parts: list[str] = field(default_factory=list)
    extras: Extras = field(default_factory=Extras)  # tool calls and logprobs, when collected
    lease: Lease | None = None  # quotas, revocation and the audit row (when a Guard is used)
    _stop: ApiError | None = None  # quota used up: raised after this step's tokens went out

    @property
    def model(self) -> str:
        return self.engine.model_id

    async def next(self, timeout: float | None = None) -> list[Event] | None:
        """This step's events (deltas merged); None if `timeout` passed with nothing new.

        Raises ApiError if the engine failed the request, or the Guard ended it.
        """
        if self._stop is not None:
            self.finished = True
            raise self._stop
        if timeout is None:
            events = await self.queue.drain()
        else:
            try:
                async with asyncio.timeout(timeout):
                    events = await self.queue.drain()
            except TimeoutError:
                return None
        merged = merge_deltas(events)
        refusal = self.lease.observe(merged) if self.lease is not None else None
        if refusal is not None:
            if refusal.kind != "resource_exhausted":  # access gone: nothing more is sent
                self.finished = True
                raise refusal.api_error()
            self._stop = refusal.api_error()  # quota: deliver this step, then stop
            merged = [e for e in merged if not isinstance(e, Completed)]
        for event in merged:
            if isinstance(event, Failed):
                self.finished = True
                if self.lease is not None:
                    self.lease.fail(str(event.error))
                raise error_for(event.error)
            if isinstance(event, Completed):
                self.finished = True
                if self.lease is not None:
                    self.lease.complete(event)
                _log_completion(self, event)
        return merged

    async def collect(self) -> Completed:
        """Wait for the whole answer; its text accumulates in `parts` (partial on timeout)."""
        while True:
            for event in await self.next() or ():
                self.extras.add(event)
                if isinstance(event, TokenDelta):
                    self.parts.append(event.text)
                elif isinstance(event, Completed):
                    return event

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def close(self) -> None:
        if not self.finished or self._stop is not None:  # client gone, timed out, or cut
            self.finished = True
            self.engine.cancel(self.request_id)
        if self.lease is not None:
            self.lease.close()


class _EventStream:
    """An SSE response driven by a coroutine that writes chunks; stops when the client leaves."""

    def __init__(self, write: Callable[[Send], Coroutine[Any, Any, None]], request_id: str) -> None:
        self._write = write
        self._headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            (b"x-request-id", request_id.encode("latin-1", "replace")),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self._headers})
        try:
            await _unless_disconnected(receive, self._write(send))
        except _ClientGone:
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class HttpBridge:
    """Builds the Starlette app; one instance per server, sharing the gRPC service's seam."""

    def __init__(
        self,
        registry: ModelRegistry,
        hub: StreamHub,
        gate: Gate,
        is_ready: Callable[[], bool] = lambda: True,
        options: BridgeOptions | None = None,
        guard: Guard | None = None,
    ) -> None:
        self._registry = registry
        self._hub = hub
        self._gate = gate
        self._is_ready = is_ready
        self._guard = guard  # quotas, fair admission, revocation, bearer tokens, audit
        self.options = options or BridgeOptions()
        self.conversations = ConversationStore(
            max_conversations=self.options.max_conversations,
            ttl_seconds=self.options.conversation_ttl_seconds,
        )
        self.responses = ResponseStore()  # previous_response_id state, bounded per caller
        self._started = int(time.time())

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
                Route("/v1/shortcuts/ask", self.shortcuts_ask, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
                # Responses and Anthropic Messages: separate door modules over the same path.
                *agent_routes(BridgeBackend(self), self.responses),
            ],
            exception_handlers={
                ApiError: _api_error_response,
                HTTPException: _http_error_response,
                Exception: _internal_error_response,
            },
        )

    # ----- access ---------------------------------------------------------------------------

    async def _caller(self, request: Request) -> Identity:
        return (await self._identified(request)).identity

    async def _identified(self, request: Request) -> Caller:
        if self._guard is not None:
            try:
                return await self._guard.identify(
                    peer_string(request.scope), request.headers.get("authorization")
                )
            except Refusal as refusal:
                raise refusal.api_error() from None
        identity = self._gate.identify(peer_string(request.scope))
        if identity is None and self.options.bearer is not None:
            token = _bearer_token(request.headers.get("authorization", ""))
            if token:
                identity = self.options.bearer.verify(token)
                if identity is None:
                    raise ApiError(401, "the bearer token is unknown or revoked", code="invalid_api_key")
        if identity is None:
            raise ApiError(401, "caller is not an authenticated peer", code="unauthenticated")
        return Caller(identity)

    def _require(self, identity: Identity, action: str, model: str = "") -> None:
        gate = self._guard if self._guard is not None else self._gate
        verdict = gate.check(identity, action, model)
        if not verdict.allowed:
            raise ApiError(403, verdict.reason or f"not allowed to {action}", code="permission_denied")

    def _require_ready(self) -> None:
        if not self._is_ready():
            raise ApiError(503, "the model is still loading", code="model_loading", retry_after=5)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refusing more than `max_body_bytes` before reading it all where possible."""
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _start(self, caller: Caller, model: str, request: GenerationRequest) -> _Generation:
        """Resolve, authorize and submit: the same steps, in the same order, as gRPC Generate."""
        identity = caller.identity
        self._require_ready()
        try:
            engine = self._registry.resolve(model)
        except ModelNotFound as exc:
            raise error_for(exc) from None
        lease: Lease | None = None
        if self._guard is None:
            self._require(identity, "generate", engine.model_id)
        else:  # grants + limits, then a fair wait for a batch slot
            try:
                lease = await self._guard.admit(caller, engine, request, "http")
            except Refusal as refusal:
                raise refusal.api_error() from None
            if lease.request is not None:
                request = lease.request  # max_tokens within the quota left
        queue = self._hub.open()
        try:
            request_id = engine.submit(request, queue)
        except EngineError as exc:
            if lease is not None:
                lease.fail(str(exc))
            raise error_for(exc) from None
        if lease is not None:
            lease.started(request_id)
        return _Generation(engine, queue, request_id, identity, lease=lease)

    # ----- OpenAI endpoints -----------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Any:
        return await self._complete(request, parse_chat)

    async def completions(self, request: Request) -> Any:
        return await self._complete(request, parse_completion)

    async def _complete(self, request: Request, parse: Callable[..., CompletionCall]) -> Any:
        caller = await self._identified(request)
        identity = caller.identity
        body = parse_json(await self._read_body(request))
        request_id = check_request_id(request.headers.get("x-request-id", ""))
        call = parse(body, request_id=request_id, owner=identity.login_name)
        gen = await self._start(caller, call.model, call.request)
        if call.stream:
            return _EventStream(self._streamer(gen, call), gen.request_id)
        try:
            done = await _unless_disconnected(request.receive, gen.collect())
        except _ClientGone:
            return Response(status_code=499)  # nobody is listening; the slot is already free
        finally:
            gen.close()
        body = completion_body(call.kind, gen.request_id, gen.created, gen.model, gen.text, done,
                               gen.extras)
        return JSONResponse(body, headers={"x-request-id": gen.request_id})

    def _streamer(self, gen: _Generation, call: CompletionCall) -> Callable[[Send], Coroutine[Any, Any, None]]:
        encoder = ChunkEncoder(call.kind, gen.request_id, gen.created, gen.model, call.include_usage)
        keepalive = self.options.keepalive_seconds

        async def write(send: Send) -> None:
            try:
                opening = encoder.role()
                if opening:
                    await send({"type": "http.response.body", "body": opening, "more_body": True})
                while not gen.finished:
                    out: list[bytes] = []
                    try:
                        events = await gen.next(keepalive)
                    except ApiError as error:  # the engine failed mid-stream
                        out += (error_event(error), DONE)
                        events = []
                    if events is None:
                        out.append(KEEPALIVE)
                    for event in events or ():
                        if isinstance(event, (TokenDelta, ToolCallEvent)):
                            chunk = encoder.event(event)
                            if chunk:
                                out.append(chunk)
                        elif isinstance(event, PromptProgress):
                            out.append(
                                b": prompt %d/%d\n\n" % (event.processed_tokens, event.total_tokens)
                            )
                        elif isinstance(event, Completed):
                            out.append(encoder.finish(event.finish_reason))
                            if call.include_usage:
                                out.append(encoder.usage(event))
                            out.append(DONE)
                    if out:  # one write per engine step, however many tokens it carried
                        body = out[0] if len(out) == 1 else b"".join(out)
                        await send({"type": "http.response.body", "body": body, "more_body": True})
            finally:
                gen.close()

        return write

    async def list_models(self, request: Request) -> Response:
        identity = await self._caller(request)
        self._require(identity, "list")
        data = [
            model_card(e.loaded.id, self._started, e.loaded.context_length)
            for e in self._registry.engines()
            if self._gate.check(identity, "generate", e.loaded.id).allowed
        ]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        identity = await self._caller(request)
        self._require(identity, "list")
        name = request.path_params["model"]
        try:
            engine = self._registry.resolve(name) if name else None
        except ModelNotFound:
            engine = None
        if engine is None or not self._gate.check(identity, "generate", engine.model_id).allowed:
            raise ApiError(404, f"model {name!r} is not served here", code="model_not_found", param="model")
        return JSONResponse(model_card(engine.model_id, self._started, engine.loaded.context_length))

    # ----- Shortcuts ------------------------------------------------------------------------

    async def shortcuts_ask(self, request: Request) -> Response:
        """One question in, the whole answer out; remembers the conversation for follow-ups."""
        plain = wants_text(request.headers.get("accept", ""), request.query_params)
        try:
            return await self._ask(request, plain)
        except ApiError as error:
            if plain:
                return PlainTextResponse(error_text(error), error.status, headers=error.headers())
            return _api_error_response(request, error)

    async def _ask(self, request: Request, plain: bool) -> Response:
        caller = await self._identified(request)
        identity = caller.identity
        raw = await self._read_body(request)
        ask = parse_ask(raw, request.headers.get("content-type", ""), request.query_params)
        conversation = ask.conversation or self.conversations.new_id()
        key = (_caller_key(identity), conversation)
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
                request_id,
                messages=(*system, *history, question),
                sampling=sampling,
                owner=identity.login_name,
            )
            try:
                gen = await self._start(caller, ask.model, engine_request)
                break
            except ApiError as error:
                # Too long for the model's context: drop the oldest exchange and try again.
                if error.code != "invalid_request" or not history:
                    raise
                history = history[2:]
        limit = self.options.shortcut_time_limit
        try:
            async with asyncio.timeout(limit):
                done = await _unless_disconnected(request.receive, gen.collect())
        except _ClientGone:
            return Response(status_code=499)
        except TimeoutError:
            raise ApiError(
                504,
                f"no complete answer within {limit:g} seconds; ask for a shorter answer",
                code="timeout",
                extra={"partial_answer": gen.text, "conversation": conversation},
            ) from None
        finally:
            gen.close()
        self.conversations.append(key, question, ChatTurn("assistant", gen.text))
        headers = {"x-request-id": gen.request_id, "x-conversation-id": conversation}
        if plain:
            return PlainTextResponse(gen.text, headers=headers)
        return JSONResponse(answer_body(gen.text, conversation, gen.model, done), headers=headers)

    # ----- health ---------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """503 while loading (or if an engine died), 200 when generation works; no identity needed."""
        if not self._is_ready():
            return JSONResponse({"status": "loading"}, 503, headers={"retry-after": "5"})
        if not all(e.healthy for e in self._registry.engines()):
            return JSONResponse({"status": "unavailable"}, 503)
        return JSONResponse({"status": "ok"})


# ----- helpers -----------------------------------------------------------------------------


async def _unless_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`, cancelling it if the client disconnects first (then raise _ClientGone).

    The request body must already have been read: after it, the next ASGI message is the
    disconnect.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise _ClientGone()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _bearer_token(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _caller_key(identity: Identity) -> str:
    """Conversations belong to a caller on a device: login plus node (device) name."""
    return f"{identity.source}:{identity.login_name}:{identity.node_name}"


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


def _api_error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), exc.status, headers=exc.headers())


def _http_error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
    return JSONResponse(error.body(), exc.status_code, headers=dict(exc.headers or {}))


def _internal_error_response(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
    error = ApiError(500, "internal server error", code="internal_error")
    return JSONResponse(error.body(), 500)


def _log_completion(gen: _Generation, done: Completed) -> None:
    # Counts and timings only: prompt and output text are never logged.
    log.info(
        "request %s by %s on %s (http): %s, %d prompt (+%d cached) / %d completion tokens, "
        "ttft %.0f ms, %.1f tok/s",
        gen.request_id,
        gen.identity.label,
        gen.model,
        done.finish_reason,
        done.prompt_tokens - done.cached_tokens,
        done.cached_tokens,
        done.completion_tokens,
        done.time_to_first_token_ms,
        done.tokens_per_second,
    )


# ----- the listener ------------------------------------------------------------------------


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the host process owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29 used this name
        pass


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind (port 0 = any) before serving, so errors carry the OS's reason and port 0 resolves."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class HttpListener:
    """uvicorn serving an ASGI app on an already bound socket, inside the running event loop."""

    def __init__(
        self, app: Any, sock: socket.socket, tls_files: tuple[Any, Any] | None = None
    ) -> None:
        cert_file, key_file = tls_files if tls_files else (None, None)
        config = uvicorn.Config(
            app,
            ssl_certfile=str(cert_file) if cert_file else None,
            ssl_keyfile=str(key_file) if key_file else None,
            http="auto",  # httptools when installed: the cheapest parser
            lifespan="off",
            log_config=None,  # keep the process's logging setup
            access_log=False,
            server_header=False,
            # Never trust X-Forwarded-For: identity comes from the real transport peer, and
            # on a relayed tailnet listener every peer is loopback.
            proxy_headers=False,
            timeout_graceful_shutdown=2,
        )
        # uvicorn's lifecycle lines ("Started server process", "Shutting down") would break the
        # CLI's one-line failure output; lmlink logs its own "serving on" line instead.
        uvicorn_log = logging.getLogger("uvicorn.error")
        if uvicorn_log.level == logging.NOTSET:
            uvicorn_log.setLevel(logging.WARNING)
        self._server = _EmbeddedUvicorn(config)
        self._sock = sock
        self._task: asyncio.Task[None] | None = None
        host, port = sock.getsockname()[:2]
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it could not start
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
