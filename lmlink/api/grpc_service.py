"""The gRPC `lmlink.v1.Inference` servicer: wire <-> call core, nothing else.

Every method identifies the caller through the core, asks the core, and translates the
answer back to the wire. Errors are mapped once, at the edge: `add_servicer` wraps every
method so a `CallError` ends the call with its status, kind and retry hint.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, NoReturn

import grpc
from google.protobuf.message import DecodeError

from lmlink.v1 import inference_pb2 as pb
from lmlink.v1 import inference_pb2_grpc as pb_grpc

from .convert import event_to_wire, request_from_wire
from .core import Core, ServerSnapshot
from .errors import CallError, ErrorKind
from .limits import Caller
from .models import LoadStep
from .resume import Tap


async def abort(context: grpc.aio.ServicerContext, error: CallError) -> NoReturn:
    """End the call with the error's gRPC status; its kind and retry hint ride along."""
    await context.abort(error.grpc_status, error.message,
                        trailing_metadata=error.trailing_metadata())
    raise AssertionError("unreachable")  # context.abort raises


class _Unparsed:
    """A request whose bytes are not a valid message (e.g. a string that is not UTF-8)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def add_servicer(add: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server) -> None:
    """Register `servicer` through its generated `add_*_to_server`, with the edge mapping
    around every method: a `CallError` ends the call with its status (and kind, code and retry
    hint in trailing metadata), and a request that does not parse is INVALID_ARGUMENT (grpc
    alone would answer UNKNOWN and log a traceback)."""

    class Capture:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass  # registered below, from the same method handlers

        def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
            fixed = {name: _at_the_edge(h) for name, h in handlers.items()}
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, fixed),))
            server.add_registered_method_handlers(service, fixed)

    add(servicer, Capture())


def _at_the_edge(handler: Any) -> Any:
    parse = handler.request_deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Unparsed(str(exc))

    def refuse(request: Any) -> CallError | None:
        if isinstance(request, _Unparsed):
            return CallError(ErrorKind.INVALID_ARGUMENT, f"the request is malformed: {request.reason}")
        return None

    if handler.unary_stream is not None:
        behavior = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if (error := refuse(request)) is not None:
                    raise error
                async for item in behavior(request, context):
                    yield item
            except CallError as error:
                await abort(context, error)

        return handler._replace(request_deserializer=deserialize, unary_stream=stream)
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if (error := refuse(request)) is not None:
                    raise error
                return await unary(request, context)
            except CallError as error:
                await abort(context, error)

        return handler._replace(request_deserializer=deserialize, unary_unary=call)
    return handler


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    async def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        metadata = dict(context.invocation_metadata() or ())
        return await self.core.identify(context.peer(), metadata.get("authorization"))

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        caller = await self._caller(context)
        gen = await self.core.open(caller, request.model, request_from_wire(request), "grpc")
        async for message in self._follow(context, self.core.stream(gen), 0):
            yield message

    async def Resume(
        self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        tap = self.core.resume(await self._caller(context), request.request_id)
        async for message in self._follow(context, tap, request.after):
            yield message

    async def _follow(self, context: grpc.aio.ServicerContext, tap: Tap,
                      after: int) -> AsyncIterator[pb.GenerateEvent]:
        """A stream's events after `after`; a caller who leaves detaches (lmlink.api.resume)."""
        with tap.reader(after) as reader:
            try:
                async for n, event in reader.events():
                    yield event_to_wire(event, tap.request_id, n)
            except (asyncio.CancelledError, GeneratorExit):
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    tap.cancelled = True  # the caller's deadline passed: not a dropped link
                raise

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        entries = self.core.list_models(await self._caller(context))
        default = self.core.models.default_id
        return pb.ListModelsResponse(models=[_model_wire(e, default) for e in entries])

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerInfo:
        return _info_wire(self.core.server_info(await self._caller(context)))

    async def Cancel(
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelResponse:
        return pb.CancelResponse(cancelled=self.core.cancel(await self._caller(context),
                                                            request.request_id))

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LoadModelEvent]:
        caller = await self._caller(context)
        async for step in self.core.load(caller, request.model, make_default=request.make_default,
                                         idle_ttl=request.idle_ttl_seconds):
            if isinstance(step, LoadStep):
                yield pb.LoadModelEvent(progress=pb.LoadProgress(
                    stage=step.stage, message=step.message, fraction=step.fraction,
                    estimated_bytes=step.estimated_bytes, available_bytes=step.available_bytes))
            else:
                yield pb.LoadModelEvent(loaded=_model_wire(step, self.core.models.default_id))

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        done = await self.core.unload(await self._caller(context), request.model,
                                      cancel_streams=request.cancel_streams,
                                      drain_timeout=request.drain_timeout_seconds)
        return pb.UnloadModelResponse(model=done.entry.id, cancelled_streams=done.cancelled,
                                      drained_streams=done.drained, freed_bytes=done.freed_bytes)


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


def _info_wire(info: ServerSnapshot) -> pb.ServerInfo:
    who = info.caller
    return pb.ServerInfo(
        name=info.name, version=info.version, protocol_version=info.protocol_version,
        listen_mode=info.listen_mode, models=info.models, active_streams=info.active_streams,
        queued_requests=info.queued_requests, max_batch_size=info.max_batch_size,
        uptime_seconds=info.uptime_seconds, platform=info.platform,
        generated_tokens=info.generated_tokens,
        recent_tokens_per_second=info.recent_tokens_per_second,
        caller=pb.Identity(login_name=who.login_name, display_name=who.display_name,
                           node_name=who.node_name, tags=list(who.tags), source=who.source,
                           is_owner=who.is_owner),
        ranks=[pb.RankInfo(rank=r.rank, host=r.host, address=r.address, state=r.state,
                           message=r.message, memory_bytes=r.memory_bytes,
                           model_bytes=r.model_bytes, tokens_per_second=r.tokens_per_second,
                           seconds_since_heartbeat=r.seconds_since_heartbeat)
               for r in info.ranks],
        cluster_backend=info.cluster_backend,
        cluster_sharding=info.cluster_sharding,
        shortcut_url=info.shortcut_url,
        shortcut_needs_profile=info.shortcut_needs_profile,
    )
