"""The call core: what every door (gRPC, HTTP bridge, and the doors to come) does once.

A door only translates: it turns its wire request into a `GenerationRequest`, asks the core,
and turns events and `CallError`s back into its wire form. The core decides:

- `identify(peer, credentials) -> Caller`: who is calling (the transport peer, or a bearer
  token). One call for every door; an instance attribute, so tests can swap it.
- `open(caller, model, request, via) -> Generation`: resolve the model, check grants and
  limits, wait fairly for a batch slot, bound the prompt, submit. The returned `Generation`
  always releases its lease and closes its audit row, however the call ends.
- `list_models`, `find_model`, `server_info`, `cancel`, `load`, `unload`.

Every failure is a `CallError` with an `ErrorKind` (lmlink.api.errors).
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator

import lmlink
from lmlink.access.identity import Identity
from lmlink.access.state import principal_of
from lmlink.engine.registry import ModelEntry
from lmlink.engine.types import Completed, Event, Failed, GenerationRequest, TokenDelta

from .convert import merge_deltas
from .errors import CallError, ErrorKind
from .limits import Caller, Guard, Lease
from .models import LoadStep, ModelManager, Unloaded
from .resume import ResumeOptions, ResumeStore, Tap
from .streams import EventQueue

log = logging.getLogger("lmlink.api")

# A token is rarely more than a few characters; a prompt longer than this many characters
# per token of context cannot fit, and is refused before anyone spends time tokenizing it.
MAX_CHARS_PER_TOKEN = 16
# Prompts longer than this are tokenized in a worker thread, off the event loop.
INLINE_TOKENIZE_CHARS = 16 * 1024


@dataclass(frozen=True)
class ServerFacts:
    """What GetServerInfo reports that the core cannot learn from the engines."""

    name: str
    listen_mode: str
    started_at: float = field(default_factory=time.time)
    shortcut_url: str = ""  # lmlink.net.phone: what a phone calls (tailnet modes)
    shortcut_needs_profile: bool = False


@dataclass(frozen=True)
class RankState:
    rank: int
    host: str
    address: str
    state: str
    message: str
    memory_bytes: int
    model_bytes: int
    tokens_per_second: float
    seconds_since_heartbeat: float


@dataclass(frozen=True)
class ServerSnapshot:
    """GetServerInfo's answer for one caller, in no wire's form."""

    name: str
    version: str
    protocol_version: int
    listen_mode: str
    models: list[str]
    active_streams: int
    queued_requests: int
    max_batch_size: int
    uptime_seconds: float
    platform: str
    generated_tokens: int
    recent_tokens_per_second: float
    caller: Identity
    ranks: list[RankState] = field(default_factory=list)
    cluster_backend: str = ""
    cluster_sharding: str = ""
    shortcut_url: str = ""
    shortcut_needs_profile: bool = False


def owner_key(identity: Identity) -> str:
    """Who owns a request for Cancel: the whole identity, the device for tagged nodes (whose
    login is the shared `tagged-devices`), never the login name alone."""
    return f"{identity.source}:{principal_of(identity)}"


def prompt_chars(request: GenerationRequest) -> int:
    if request.prompt is not None:
        return len(request.prompt)
    return sum(len(m.content) + len(m.role) for m in request.messages or ())


class Generation:
    """One admitted, submitted request. Iterate it (events) or call `next_step` (one engine
    step's events at a time); `close()` -- or leaving `async with` -- ends it: an unfinished
    request is cancelled in the engine, and the lease and its audit row are always released."""

    def __init__(self, engine: Any, queue: EventQueue, request_id: str, caller: Caller,
                 lease: Lease, via: str) -> None:
        self.engine = engine
        self.queue = queue
        self.request_id = request_id
        self.caller = caller
        self.lease = lease
        self.via = via
        self.created = int(time.time())
        self.finished = False
        self._stop: CallError | None = None  # quota used up: raised after this step's tokens
        self._closed = False

    @property
    def model(self) -> str:
        return self.engine.model_id

    async def next_step(self, timeout: float | None = None) -> list[Event] | None:
        """This step's events (deltas merged); None if `timeout` passed with nothing new.
        Raises CallError if the engine failed the request or the Guard ended it."""
        try:
            return await self._next(timeout)
        except BaseException:
            self.close()
            raise

    async def _next(self, timeout: float | None) -> list[Event] | None:
        if self._stop is not None:
            raise self._stop
        if self.finished:
            return []
        if timeout is None:
            events = await self.queue.drain()
        else:
            try:
                async with asyncio.timeout(timeout):
                    events = await self.queue.drain()
            except TimeoutError:
                return None
        merged = merge_deltas(events)
        refusal = self.lease.observe(merged)
        if refusal is not None:
            if refusal.kind != ErrorKind.RESOURCE_EXHAUSTED:  # access gone: nothing more is sent
                raise refusal
            self._stop = refusal  # quota: deliver this step, then stop
            merged = [e for e in merged if not isinstance(e, Completed)]
        for event in merged:
            if isinstance(event, Failed):
                self.finished = True
                self.lease.fail(str(event.error))
                raise CallError.of(event.error)
            if isinstance(event, Completed):
                self.finished = True
                self.lease.complete(event)
                _log_completion(self, event)
                self.close()
        return merged

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        try:
            while not self.finished or self._stop is not None:
                for event in await self.next_step() or ():
                    yield event
        finally:
            self.close()

    async def collect(self, parts: list[str] | None = None) -> tuple[str, Completed]:
        """The whole answer; its text accumulates in `parts` (a partial answer survives)."""
        parts = [] if parts is None else parts
        async for event in self:
            if isinstance(event, TokenDelta):
                parts.append(event.text)
            elif isinstance(event, Completed):
                return "".join(parts), event
        raise CallError(ErrorKind.INTERNAL, "the generation ended without completing")

    def close(self) -> None:
        """End the call however it went (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if not self.finished or self._stop is not None:  # caller gone, timed out, or cut
            self.finished = True
            self.engine.cancel(self.request_id)
        self.lease.close()

    async def __aenter__(self) -> "Generation":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Core:
    """The transport-neutral call path over a ModelManager and a Guard."""

    def __init__(self, models: ModelManager, guard: Guard, facts: ServerFacts,
                 resume: ResumeOptions | None = None) -> None:
        self.models = models
        self.guard = guard
        self.facts = facts
        self.streams = ResumeStore(resume)  # streamed answers, resumable (lmlink.api.resume)
        self.identify = self._identify  # swappable, like golink's currentUser(r)
        self.draining = False  # shutting down: no new calls, running ones may finish

    # ----- who and what ----------------------------------------------------------------------

    async def _identify(self, peer: str, credentials: str | None) -> Caller:
        """The caller behind a transport peer and an optional `Authorization` value."""
        return await self.guard.identify(peer, credentials)

    def require(self, caller: Caller, action: str, model: str = "") -> None:
        verdict = self.guard.check(caller.identity, action, model)
        if not verdict.allowed:
            raise CallError(ErrorKind.PERMISSION_DENIED,
                            verdict.reason or f"{caller.identity.label} may not {action}")

    def require_owner(self, caller: Caller, what: str) -> None:
        if not caller.identity.is_owner:
            raise CallError(ErrorKind.PERMISSION_DENIED,
                            f"{caller.identity.label} is not the owner of this server; "
                            f"only the owner may {what}")

    def may_use(self, caller: Caller, model_id: str) -> bool:
        return bool(self.guard.check(caller.identity, "generate", model_id).allowed)

    # ----- generation --------------------------------------------------------------------------

    async def open(self, caller: Caller, model: str, request: GenerationRequest,
                   via: str) -> Generation:
        """Admit and submit `request`; the Generation must be closed (or iterated to its end)."""
        if self.draining:
            raise CallError(ErrorKind.UNAVAILABLE, f"{self.facts.name} is shutting down and "
                            "takes no new requests; retry on another server or later",
                            retry_after=5.0)
        engine = self.models.resolve(model)
        request = replace(request, owner=owner_key(caller.identity))
        lease = await self.guard.admit(caller, engine, request, via)  # grants first: deny by default
        if lease.request is not None:
            request = lease.request  # max_tokens within the quota left
        queue = self.models.hub.open()
        try:
            _check_prompt_size(request, engine)
            request_id = await _submit(engine, request, queue)
        except BaseException as exc:
            error = _submit_error(exc, engine.model_id)
            if error is not None:
                lease.fail(error.message)
            lease.close()  # (without a failure: recorded as the caller going away)
            if error is None:
                raise
            raise error from None
        lease.started(request_id)
        return Generation(engine, queue, request_id, caller, lease, via)

    def list_models(self, caller: Caller) -> list[ModelEntry]:
        """Every model this caller may use, in any state but `unloading`."""
        self.require(caller, "list")
        return [e for e in self.models.entries()
                if e.state != "unloading" and self.may_use(caller, e.id)]

    def find_model(self, caller: Caller, name: str) -> Any:
        """The engine serving `name` if this caller may use it; NOT_FOUND otherwise."""
        self.require(caller, "list")
        try:
            engine = self.models.registry.resolve(name) if name else None
        except Exception:
            engine = None
        if engine is None or not self.may_use(caller, engine.model_id):
            raise CallError(ErrorKind.NOT_FOUND, f"model {name!r} is not served here",
                            param="model")
        return engine

    def server_info(self, caller: Caller) -> ServerSnapshot:
        self.require(caller, "info")
        engines = self.models.engines()
        stats = [e.stats() for e in engines]
        return ServerSnapshot(
            name=self.facts.name,
            version=lmlink.__version__,
            protocol_version=lmlink.PROTOCOL_VERSION,
            listen_mode=self.facts.listen_mode,
            models=[e.loaded.id for e in engines if self.may_use(caller, e.loaded.id)],
            active_streams=sum(s.active for s in stats),
            queued_requests=sum(s.queued for s in stats),
            max_batch_size=max((s.max_batch_size for s in stats), default=0),
            uptime_seconds=time.time() - self.facts.started_at,
            platform=f"{platform.system()} {platform.machine()}",
            generated_tokens=sum(s.generated_tokens for s in stats),
            recent_tokens_per_second=sum(s.recent_tokens_per_second for s in stats),
            caller=caller.identity,
            shortcut_url=self.facts.shortcut_url,
            shortcut_needs_profile=self.facts.shortcut_needs_profile,
            **_cluster_fields(engines),
        )

    def cancel(self, caller: Caller, request_id: str) -> bool:
        """Cancel a running request of this caller (the owner may cancel anyone's)."""
        self.require(caller, "cancel")
        if not request_id:
            raise CallError(ErrorKind.INVALID_ARGUMENT, "request_id is required",
                            param="request_id")
        owner = None if caller.identity.is_owner else owner_key(caller.identity)
        cancelled = any(e.cancel(request_id, owner) for e in self.models.engines())
        return self.streams.forget(request_id, owner) or cancelled  # cancelled: not kept

    def stream(self, gen: Generation, **meta: Any) -> Tap:
        """Hand a streamed Generation to the resume store; doors read the returned Tap."""
        return self.streams.start(gen, owner_key(gen.caller.identity), **meta)

    def resume(self, caller: Caller, request_id: str) -> Tap:
        """This caller's dropped stream (NOT_FOUND if unknown, expired or someone else's)."""
        if not request_id:
            raise CallError(ErrorKind.INVALID_ARGUMENT, "request_id is required",
                            param="request_id")
        tap = self.streams.find(request_id, owner_key(caller.identity))
        self.require(caller, "generate", tap.model)
        return tap

    # ----- model management (owner only) -------------------------------------------------------

    async def load(self, caller: Caller, spec: str, *, make_default: bool = False,
                   idle_ttl: float = 0.0) -> AsyncIterator[LoadStep | ModelEntry]:
        self.require_owner(caller, "load models")
        if not spec:
            raise CallError(ErrorKind.INVALID_ARGUMENT, "name the model to load", param="model")
        if idle_ttl < 0:
            raise CallError(ErrorKind.INVALID_ARGUMENT, "idle_ttl_seconds must be >= 0")
        log.info("load of %s requested by %s", spec, caller.identity.label)
        async for step in self.models.load(spec, make_default=make_default, idle_ttl=idle_ttl):
            yield step

    async def unload(self, caller: Caller, name: str, *, cancel_streams: bool = False,
                     drain_timeout: float = 0.0) -> Unloaded:
        self.require_owner(caller, "unload models")
        if drain_timeout < 0:
            raise CallError(ErrorKind.INVALID_ARGUMENT, "drain_timeout_seconds must be >= 0")
        log.info("unload of %s requested by %s", name, caller.identity.label)
        return await self.models.unload(
            name, drain_timeout=0.0 if cancel_streams else (drain_timeout or 30.0))


def _check_prompt_size(request: GenerationRequest, engine: Any) -> None:
    """Refuse a prompt that cannot fit the context before anyone tokenizes it."""
    context = int(getattr(engine.loaded, "context_length", 0) or 0)
    if context <= 0:
        return
    limit = context * MAX_CHARS_PER_TOKEN
    n = prompt_chars(request)
    if n > limit:
        raise CallError(ErrorKind.INVALID_ARGUMENT,
                        f"the prompt is {n} characters; {engine.model_id}'s context of {context} "
                        f"tokens cannot hold more than about {limit} characters")


async def _submit(engine: Any, request: GenerationRequest, queue: EventQueue) -> str:
    """`engine.submit`, in a worker thread for long prompts (tokenizing is the slow part)."""
    if prompt_chars(request) <= INLINE_TOKENIZE_CHARS:
        return engine.submit(request, queue)
    job = asyncio.ensure_future(asyncio.to_thread(engine.submit, request, queue))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        # The caller left while the prompt was tokenized: cancel it once it is queued.
        job.add_done_callback(lambda j: j.cancelled() or j.exception() is not None
                              or engine.cancel(j.result()))
        raise


def _submit_error(exc: BaseException, model: str) -> CallError | None:
    """The CallError a failed submit becomes (None: not an error, e.g. cancellation)."""
    if not isinstance(exc, Exception):
        return None
    error = CallError.of(exc)
    if error.kind is ErrorKind.INTERNAL:
        # Never the prompt, never a traceback at the default level.
        log.error("submitting a request to %s failed: %s", model, type(exc).__name__)
        log.debug("submit failure", exc_info=exc)
    return error


def _cluster_fields(engines: list[Any]) -> dict[str, Any]:
    """Cluster mode (rank 0): backend, sharding and every rank as the heartbeats last said."""
    for engine in engines:
        facts = getattr(engine, "cluster", None)  # lmlink.cluster.rank.ClusterFacts
        if facts is None:
            continue
        own_rate = engine.stats().recent_tokens_per_second  # also refreshes rank 0's memory
        now = time.monotonic()
        ranks = [
            RankState(r.rank, r.host, r.address, r.state, r.message, r.memory_bytes,
                      r.model_bytes, own_rate if r.rank == 0 else r.tokens_per_second,
                      0.0 if r.rank == 0 else max(0.0, now - r.last_seen))
            for r in facts.ranks()
        ]
        return {"ranks": ranks, "cluster_backend": facts.backend,
                "cluster_sharding": facts.sharding}
    return {}


def _log_completion(gen: Generation, done: Completed) -> None:
    # Counts and timings only: prompt and output text are never logged.
    log.info(
        "request %s by %s on %s (%s): %s, %d prompt (+%d cached) / %d completion tokens, "
        "ttft %.0f ms, %.1f tok/s",
        gen.request_id, gen.caller.identity.label, gen.model, gen.via, done.finish_reason,
        done.prompt_tokens - done.cached_tokens, done.cached_tokens, done.completion_tokens,
        done.time_to_first_token_ms, done.tokens_per_second,
    )
