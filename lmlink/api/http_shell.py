"""The OpenAI-style HTTP shell shared by the server's bridge and `lmlink link`.

Both speak OpenAI JSON over Starlette + uvicorn; everything that is not about *what* they
answer lives here once: error handlers (one exception, `CallError`, mapped at the edge),
reading a body with a size limit while it streams in, Server-Sent Events over an async
generator that stops when the client leaves, a public disconnect helper, the browser guard
(Host allow-list, foreign Origins refused, JSON required on POST), and the uvicorn listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any, AsyncIterator, Callable, Collection, Coroutine, Mapping, Sequence, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import CallError, ErrorKind
from .openai_schema import ApiError, error_body

log = logging.getLogger("lmlink.http")
T = TypeVar("T")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
KEEPALIVE = b": keep-alive\n\n"

# For the self-contained status pages: only their own inline script, talking only to us.
PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; "
                               "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was complete."""


def peer_string(scope: Scope) -> str:
    """The transport peer in grpc's `context.peer()` form, so one identify() serves both doors."""
    client = scope.get("client")
    if not client:
        return ""
    host, port = client[0], client[1]
    if host.startswith("/"):  # a unix peer name (the relay's inner hop, lmlink.net.inner)
        return f"unix:{host}"
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


# ----- bodies, disconnects, SSE ---------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit` bytes: from the
    declared length, else while it streams in; never held whole before the check."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


async def unless_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`, cancelling it if the client disconnects first (then raise ClientGone).

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
    raise ClientGone()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """SSE over an async generator of byte chunks. A client that leaves cancels the generator
    at once, even while it waits for the engine; `on_close` then runs however the response
    ended -- also when the generator never started, so its `finally` would not run."""

    def __init__(self, chunks: AsyncIterator[bytes], headers: Mapping[str, str] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no",
                                  **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with contextlib.suppress(ClientGone):
                await unless_disconnected(receive, self.stream_response(send))
        finally:
            if self._on_close is not None:
                self._on_close()


# ----- errors ---------------------------------------------------------------------------------


def error_response(error: CallError) -> JSONResponse:
    headers = {}
    if (s := error.retry_seconds()) is not None:
        headers["retry-after"] = str(s)
    return JSONResponse(error_body(error), error.http_status, headers=headers)


def _call_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CallError)
    return error_response(exc)


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
    response = error_response(error)
    response.headers.update(dict(exc.headers or {}))
    return response


def _internal_error(request: Request, exc: Exception) -> Response:
    # The type only: no prompt text, no traceback at the default level.
    log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
    log.debug("internal error", exc_info=exc)
    return error_response(CallError(ErrorKind.INTERNAL, "internal server error"))


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Response]] = {
    CallError: _call_error,
    HTTPException: _http_error,
    Exception: _internal_error,
}


# ----- the browser guard ------------------------------------------------------------------------


class BrowserGuard:
    """Keeps web pages out of an endpoint that acts with its user's identity.

    - Host must be one of `allowed_hosts` (None: any), so DNS rebinding cannot point a page's
      own name at this port; used where the transport is plaintext (TLS already pins names).
    - A request carrying an `Origin` (browsers add it to cross-origin and POST requests) is
      refused unless the origin is allow-listed (a browser UI the user trusts).
    - POSTs to `json_paths` must be `application/json`, which a page cannot send without a
      CORS preflight this server never approves.
    """

    def __init__(self, app: ASGIApp, *, allowed_hosts: Collection[str] | None = None,
                 allowed_origins: Collection[str] = (), json_paths: Collection[str] = ()) -> None:
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}
        self.json_paths = set(json_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refused = self.refusal(scope)
            if refused is not None:
                await error_response(refused)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> CallError | None:
        headers = Headers(scope=scope)
        if self.allowed_hosts is not None and "*" not in self.allowed_hosts:
            host = host_name(headers.get("host", ""))
            if host not in self.allowed_hosts:
                return CallError(ErrorKind.PERMISSION_DENIED,
                                 f"host {host or '(none)'!r} is not served here; use "
                                 f"{sorted(self.allowed_hosts)[0]}", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and "*" not in self.allowed_origins \
                and origin.rstrip("/").lower() not in self.allowed_origins:
            return CallError(ErrorKind.PERMISSION_DENIED,
                             f"requests from web pages ({origin[:80]}) are refused; allow a "
                             "trusted browser UI with LMLINK_ALLOWED_ORIGINS",
                             code="origin_not_allowed")
        if scope["method"] == "POST" and scope["path"] in self.json_paths:
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return CallError(ErrorKind.UNSUPPORTED_MEDIA,
                                 f"send the body as application/json, not {media or 'nothing'}",
                                 code="unsupported_media_type")
        return None


def host_name(host: str) -> str:
    """The name in a Host header, without port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def openai_app(routes: Sequence[Any], *, allowed_hosts: Collection[str] | None,
               allowed_origins: Collection[str] = (), json_paths: Collection[str] = ()) -> Any:
    """A Starlette app with lmlink's error handlers, behind the browser guard."""
    app = Starlette(routes=list(routes), exception_handlers=dict(EXCEPTION_HANDLERS))
    return BrowserGuard(app, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins,
                        json_paths=json_paths)


# ----- the listener ---------------------------------------------------------------------------


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


def uvicorn_config(app: Any, tls_files: tuple[Any, Any] | None = None,
                   options: dict[str, Any] | None = None) -> uvicorn.Config:
    """How every lmlink HTTP listener runs uvicorn (one place for its limits and hardening).

    `options`: extra uvicorn.Config kwargs from the server (connection limits, mTLS:
    lmlink.net.httpserver.uvicorn_options); they override the defaults here.
    """
    cert_file, key_file = tls_files if tls_files else (None, None)
    settings: dict[str, Any] = dict(
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
    settings.update(options or {})
    return uvicorn.Config(app, **settings)


class HttpListener:
    """uvicorn serving an ASGI app on an already bound socket, inside the running event loop."""

    def __init__(
        self, app: Any, sock: socket.socket, tls_files: tuple[Any, Any] | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        # uvicorn's lifecycle lines ("Started server process", "Shutting down") would break the
        # CLI's one-line failure output; lmlink logs its own "serving on" line instead.
        uvicorn_log = logging.getLogger("uvicorn.error")
        if uvicorn_log.level == logging.NOTSET:
            uvicorn_log.setLevel(logging.WARNING)
        self._server = _EmbeddedUvicorn(uvicorn_config(app, tls_files, options))
        self._sock = sock
        self._task: asyncio.Task[None] | None = None
        if sock.family == socket.AF_UNIX:  # the inner hop behind the relay
            self.port: Any = sock.getsockname()
            self.address = f"unix:{self.port}"
        else:
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
