"""The gRPC `lmlink.v1.Inference` servicer: wire <-> engine, with access enforced per call."""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import grpc

import lmlink
from lmlink.access.identity import Identity
from lmlink.engine.registry import ModelRegistry
from lmlink.engine.types import (
    Completed,
    DuplicateRequestId,
    EngineError,
    EngineStopped,
    Failed,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
)
from lmlink.v1 import inference_pb2 as pb
from lmlink.v1 import inference_pb2_grpc as pb_grpc

from .convert import event_to_wire, merge_deltas, request_from_wire
from .gate import Gate
from .limits import Caller, Guard, Lease, Refusal
from .streams import StreamHub

log = logging.getLogger("lmlink.api")

_STATUS: list[tuple[type[EngineError], grpc.StatusCode]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DuplicateRequestId, grpc.StatusCode.ALREADY_EXISTS),
    (EngineStopped, grpc.StatusCode.UNAVAILABLE),
]


def status_for(error: EngineError) -> grpc.StatusCode:
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class ServerFacts:
    """What GetServerInfo reports that the API cannot learn from the engines."""

    name: str
    listen_mode: str
    started_at: float


def _cluster_fields(engines: list[Any]) -> dict[str, Any]:
    """Cluster mode (rank 0): backend, sharding and every rank as the heartbeats last said."""
    for engine in engines:
        facts = getattr(engine, "cluster", None)  # lmlink.cluster.rank.ClusterFacts
        if facts is None:
            continue
        own_rate = engine.stats().recent_tokens_per_second  # also refreshes rank 0's memory
        now = time.monotonic()
        ranks = [
            pb.RankInfo(
                rank=r.rank, host=r.host, address=r.address, state=r.state, message=r.message,
                memory_bytes=r.memory_bytes, model_bytes=r.model_bytes,
                tokens_per_second=own_rate if r.rank == 0 else r.tokens_per_second,
                seconds_since_heartbeat=0.0 if r.rank == 0 else max(0.0, now - r.last_seen),
            )
            for r in facts.ranks()
        ]
        return {"ranks": ranks, "cluster_backend": facts.backend,
                "cluster_sharding": facts.sharding}
    return {}


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        hub: StreamHub,
        gate: Gate,
        facts: ServerFacts,
        is_ready: Callable[[], bool] = lambda: True,
        guard: Guard | None = None,
    ) -> None:
        self._registry = registry
        self._hub = hub
        self._gate = gate
        self._facts = facts
        self._is_ready = is_ready
        self._guard = guard  # quotas, fair admission, revocation, bearer tokens, audit
        self._running: dict[str, set[str]] = {}  # model id -> gRPC request ids (for unload)
        self._loads: set[asyncio.Task[None]] = set()

    async def _caller(self, context: grpc.aio.ServicerContext) -> Identity:
        return (await self._identified(context)).identity

    async def _identified(self, context: grpc.aio.ServicerContext) -> Caller:
        if self._guard is not None:
            metadata = dict(context.invocation_metadata() or ())
            try:
                return await self._guard.identify(context.peer(), metadata.get("authorization"))
            except Refusal as refusal:
                await _abort(context, refusal)
        identity = self._gate.identify(context.peer())
        if identity is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "caller is not an authenticated peer"
            )
        return Caller(identity)  # type: ignore[arg-type]

    async def _require(
        self, context: grpc.aio.ServicerContext, identity: Identity, action: str, model: str = ""
    ) -> None:
        gate = self._guard if self._guard is not None else self._gate
        verdict = gate.check(identity, action, model)
        if not verdict.allowed:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, verdict.reason)

    async def _require_ready(self, context: grpc.aio.ServicerContext) -> None:
        if not self._is_ready():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        caller = await self._identified(context)
        identity = caller.identity
        await self._require_ready(context)
        try:
            engine = self._registry.resolve(request.model)
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        lease: Lease | None = None
        if self._guard is None:
            await self._require(context, identity, "generate", engine.model_id)
        try:
            engine_request = request_from_wire(request, owner=identity.login_name)
        except EngineError as exc:
            await context.abort(status_for(exc), str(exc))
        if self._guard is not None:  # grants + limits, then a fair wait for a batch slot
            try:
                lease = await self._guard.admit(caller, engine, engine_request, "grpc")
            except Refusal as refused:
                await _abort(context, refused)
            if lease is not None and lease.request is not None:
                engine_request = lease.request  # max_tokens within the quota left
        queue = self._hub.open()
        try:
            request_id = engine.submit(engine_request, queue)
        except EngineError as exc:
            if lease is not None:
                lease.fail(str(exc))
            await context.abort(status_for(exc), str(exc))
        finished = False
        running = self._running.setdefault(engine.model_id, set())
        running.add(request_id)
        try:
            if lease is not None:
                lease.started(request_id)
            while not finished:
                events = merge_deltas(await queue.drain())
                refusal = lease.observe(events) if lease is not None else None
                if refusal is not None and refusal.kind != "resource_exhausted":
                    await _abort(context, refusal)  # access gone: nothing more is sent
                for event in events:
                    if isinstance(event, Failed):
                        finished = True
                        if lease is not None:
                            lease.fail(str(event.error))
                        await context.abort(status_for(event.error), str(event.error))
                    if isinstance(event, Completed):
                        if refusal is not None:
                            break
                        finished = True
                        if lease is not None:
                            lease.complete(event)
                        _log_completion(identity, engine.model_id, request_id, event)
                    yield event_to_wire(event, request_id)
                if refusal is not None:  # quota used up mid-answer: this step's tokens, then stop
                    await _abort(context, refusal)
        finally:
            running.discard(request_id)
            if not finished:  # client went away or cancelled: free the batch slot now
                engine.cancel(request_id)
            if lease is not None:
                lease.close()

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        identity = await self._caller(context)
        await self._require(context, identity, "list")
        default = self._registry.default_id
        models = [
            _model_wire(e, default)
            for e in self._registry.entries()
            if e.state != "unloading" and self._gate.check(identity, "generate", e.id).allowed
        ]
        return pb.ListModelsResponse(models=models)

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerInfo:
        identity = await self._caller(context)
        await self._require(context, identity, "info")
        stats = [e.stats() for e in self._registry.engines()]
        return pb.ServerInfo(
            name=self._facts.name,
            version=lmlink.__version__,
            protocol_version=lmlink.PROTOCOL_VERSION,
            listen_mode=self._facts.listen_mode,
            models=[
                e.loaded.id
                for e in self._registry.engines()
                if self._gate.check(identity, "generate", e.loaded.id).allowed
            ],
            active_streams=sum(s.active for s in stats),
            queued_requests=sum(s.queued for s in stats),
            max_batch_size=max((s.max_batch_size for s in stats), default=0),
            uptime_seconds=time.time() - self._facts.started_at,
            platform=f"{platform.system()} {platform.machine()}",
            generated_tokens=sum(s.generated_tokens for s in stats),
            recent_tokens_per_second=sum(s.recent_tokens_per_second for s in stats),
            caller=pb.Identity(
                login_name=identity.login_name,
                display_name=identity.display_name,
                node_name=identity.node_name,
                tags=list(identity.tags),
                source=identity.source,
                is_owner=identity.is_owner,
            ),
            **_cluster_fields(self._registry.engines()),
        )

    async def Cancel(
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelResponse:
        identity = await self._caller(context)
        await self._require(context, identity, "cancel")
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        owner = None if identity.is_owner else identity.login_name
        cancelled = any(e.cancel(request.request_id, owner) for e in self._registry.engines())
        return pb.CancelResponse(cancelled=cancelled)


    # ----- model management (owner only) --------------------------------------------------------

    async def _require_owner(self, context: grpc.aio.ServicerContext, what: str) -> Identity:
        identity = await self._caller(context)
        if not identity.is_owner:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity.label} is not the owner of this server; only the owner may {what}",
            )
        return identity

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LoadModelEvent]:
        identity = await self._require_owner(context, "load models")
        if not request.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name the model to load")
        if request.idle_ttl_seconds < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "idle_ttl_seconds must be >= 0")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[pb.LoadModelEvent | BaseException | None] = asyncio.Queue()

        def progress(stage: str, message: str, fraction: float, need: int, have: int) -> None:
            event = pb.LoadModelEvent(progress=pb.LoadProgress(
                stage=stage, message=message, fraction=fraction,
                estimated_bytes=need, available_bytes=have))
            loop.call_soon_threadsafe(events.put_nowait, event)

        def work() -> None:
            try:
                entry = self._registry.load(
                    request.model, progress=progress, make_default=request.make_default,
                    idle_ttl=request.idle_ttl_seconds,
                )
                done: Any = pb.LoadModelEvent(loaded=_model_wire(entry, self._registry.default_id))
            except BaseException as exc:  # noqa: BLE001 - reported to the caller below
                done = exc
            loop.call_soon_threadsafe(events.put_nowait, done)
            loop.call_soon_threadsafe(events.put_nowait, None)

        task = asyncio.ensure_future(asyncio.to_thread(work))  # a load runs to its end
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
        log.info("load of %s requested by %s", request.model, identity.label)
        while (item := await events.get()) is not None:
            if isinstance(item, BaseException):
                code, message = _load_error(item)
                await context.abort(code, message)
            yield item

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        identity = await self._require_owner(context, "unload models")
        if request.drain_timeout_seconds < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "drain_timeout_seconds must be >= 0")
        try:
            entry = self._registry.begin_unload(request.model)
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        log.info("unload of %s requested by %s", entry.id, identity.label)
        drained, cancelled = await self._drain(
            entry, 0.0 if request.cancel_streams else (request.drain_timeout_seconds or 30.0)
        )
        freed = await asyncio.to_thread(self._registry.finish_unload, entry)
        return pb.UnloadModelResponse(model=entry.id, cancelled_streams=cancelled,
                                      drained_streams=drained, freed_bytes=freed)

    async def _drain(self, entry: Any, timeout: float) -> tuple[int, int]:
        """Wait up to `timeout` for the model's streams, then cancel the rest."""
        engine = entry.engine
        before = entry.active_streams
        deadline = time.monotonic() + timeout
        while entry.active_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = entry.active_streams
        if left:
            for request_id in list(self._running.get(entry.id, ())):
                engine.cancel(request_id)  # gRPC streams end with finish_reason "cancelled"
            end = time.monotonic() + 2.0
            while entry.active_streams and time.monotonic() < end:
                await asyncio.sleep(0.02)
        return before - left, left

    async def sweep_idle(self, every: float = 1.0) -> None:
        """Unload models idle longer than their TTL (runs for the life of the server)."""
        while True:
            await asyncio.sleep(every)
            for model_id in self._registry.idle_expired():
                try:
                    entry = self._registry.begin_unload(model_id)
                except ModelNotFound:
                    continue
                log.info("unloading %s after its idle TTL", model_id)
                await asyncio.to_thread(self._registry.finish_unload, entry)


def _model_wire(e: Any, default: str | None) -> pb.Model:
    return pb.Model(
        id=e.id, aliases=list(e.aliases), state=e.state, context_length=e.context_length,
        memory_bytes=e.memory_bytes, is_default=e.id == default and e.state == "loaded",
        active_streams=e.active_streams, idle_ttl_seconds=e.idle_ttl,
        source=_model_source(e),
    )


def _model_source(e: Any) -> str:
    from lmlink.engine.loader import describe_source

    loaded = getattr(e.engine, "loaded", None)
    return getattr(loaded, "source", "") or describe_source(e.spec or e.id)


def _load_error(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    from lmlink.engine.loader import ModelLoadError
    from lmlink.engine.registry import ModelTooLarge

    if isinstance(exc, ModelTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, ModelLoadError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    log.error("model load failed: %s", exc)
    return grpc.StatusCode.INTERNAL, f"loading failed: {exc.__class__.__name__}: {exc}"


async def _abort(context: grpc.aio.ServicerContext, refusal: Refusal) -> None:
    await context.abort(refusal.grpc_code, refusal.message,
                        trailing_metadata=refusal.trailing_metadata())


def _log_completion(identity: Identity, model: str, request_id: str, done: Completed) -> None:
    # Counts and timings only: prompt and output text are never logged.
    log.info(
        "request %s by %s on %s: %s, %d prompt (+%d cached) / %d completion tokens, "
        "ttft %.0f ms, %.1f tok/s",
        request_id,
        identity.label,
        model,
        done.finish_reason,
        done.prompt_tokens - done.cached_tokens,
        done.cached_tokens,
        done.completion_tokens,
        done.time_to_first_token_ms,
        done.tokens_per_second,
    )
