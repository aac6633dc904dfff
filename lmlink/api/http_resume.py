"""Server-Sent Events over a resumable stream, and the HTTP routes that resume or cancel one.

Every SSE event that carries data also carries `id: REQUEST_ID:N` (N = the event's number in
lmlink.api.resume; the opening role chunk is `:0`). A client whose connection dropped sends
`GET /v1/streams/REQUEST_ID` with `Last-Event-ID: REQUEST_ID:N` (what EventSource does by
itself) or `?after=N`, and receives the same chunks that would have followed event N.
`DELETE /v1/streams/REQUEST_ID` cancels a stream (the HTTP form of gRPC Cancel): it is not
kept for resuming.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmlink.engine.types import Completed, PromptProgress, TokenDelta, ToolCallEvent

from .core import Core
from .errors import CallError, ErrorKind
from .http_shell import EventStream, peer_string
from .openai_schema import DONE, ChunkEncoder, error_event
from .resume import Tap


def event_id(request_id: str, n: int) -> bytes:
    """The SSE `id:` line (none for ids an SSE field cannot carry)."""
    if "\n" in request_id or "\r" in request_id:
        return b""
    return b"id: %s:%d\n" % (request_id.encode(), n)


# Comments as single lines, never followed by a blank line: once an `id:` has been sent, some
# SSE decoders (the openai package's among them) turn any blank line into an empty event, since
# the last event id is never reset; a comment block ending in a blank line would reach them as
# `data: ""` and fail to parse. A comment line alone is valid SSE and keeps proxies awake.
COMMENT_KEEPALIVE = b": keep-alive\n"


async def sse(tap: Tap, after: int, keepalive: float, *, opening: bool) -> AsyncIterator[bytes]:
    """The stream's OpenAI chunks after event `after`, one write per engine step."""
    kind = tap.meta.get("kind", "chat")
    include_usage = bool(tap.meta.get("include_usage", False))
    encoder = ChunkEncoder(kind, tap.request_id, tap.created, tap.model, include_usage)
    rid = tap.request_id
    try:
        with tap.reader(after) as reader:
            if opening and (role := encoder.role()):
                yield event_id(rid, 0) + role
            while True:
                out: list[bytes] = []
                batch = await reader.next(keepalive)
                if batch is None:
                    yield COMMENT_KEEPALIVE
                    continue
                if not batch:
                    if tap.error is not None:  # failed or cut mid-stream: OpenAI's in-band error
                        yield error_event(tap.error) + DONE
                    return
                for n, event in batch:
                    if isinstance(event, (TokenDelta, ToolCallEvent)):
                        chunk = encoder.event(event)  # text (+ logprobs) or a tool call
                        if chunk:
                            out.append(event_id(rid, n) + chunk)
                    elif isinstance(event, PromptProgress):
                        out.append(b": prompt %d/%d\n" % (event.processed_tokens,
                                                           event.total_tokens))
                    elif isinstance(event, Completed):
                        out.append(event_id(rid, n) + encoder.finish(event.finish_reason))
                        if include_usage:
                            out.append(encoder.usage(event))
                        out.append(DONE)
                if out:
                    yield b"".join(out)
    except CallError as error:  # e.g. resuming after events the server no longer holds
        yield error_event(error) + DONE


def parse_after(request: Request, request_id: str) -> int:
    """Where to continue: `Last-Event-ID: REQUEST_ID:N` (EventSource), else `?after=N`, else 0."""
    last = request.headers.get("last-event-id")
    if last:
        rid, sep, n = last.strip().rpartition(":")
        if not sep or rid != request_id or not n.isdigit():
            raise CallError(ErrorKind.INVALID_ARGUMENT,
                            f"Last-Event-ID must be {request_id}:N, the id of the last event "
                            "received", param="last-event-id")
        return int(n)
    after = request.query_params.get("after", "0")
    if not after.isdigit():
        raise CallError(ErrorKind.INVALID_ARGUMENT, "after must be an event number",
                        param="after")
    return int(after)


class StreamRoutes:
    """`GET` (resume) and `DELETE` (cancel) on /v1/streams/{request_id}."""

    def __init__(self, core: Core, keepalive: float) -> None:
        self.core = core
        self.keepalive = keepalive

    def routes(self) -> list[Route]:
        return [Route("/v1/streams/{request_id}", self.resume, methods=["GET"]),
                Route("/v1/streams/{request_id}", self.cancel, methods=["DELETE"])]

    async def _caller(self, request: Request) -> Any:
        return await self.core.identify(peer_string(request.scope),
                                        request.headers.get("authorization"))

    async def resume(self, request: Request) -> Response:
        caller = await self._caller(request)
        request_id = request.path_params["request_id"]
        after = parse_after(request, request_id)
        tap = self.core.resume(caller, request_id)
        tap.check(after)  # refuse an impossible position before the 200 is sent
        return EventStream(sse(tap, after, self.keepalive, opening=False),
                           {"x-request-id": request_id}, on_close=tap.release)

    async def cancel(self, request: Request) -> Response:
        caller = await self._caller(request)
        cancelled = self.core.cancel(caller, request.path_params["request_id"])
        return JSONResponse({"cancelled": cancelled})
