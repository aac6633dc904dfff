"""asyncio Python client with the same surface as the blocking one."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmlink.v1 import inference_pb2 as pb
from lmlink.v1 import inference_pb2_grpc as pb_grpc

from ._wire import Message, decode_event
from .base import BaseClient
from .errors import from_rpc_error
from .events import Event, Generation
from .info import LoadProgress, ModelInfo, ServerInfo, UnloadResult, decode_load_event


class AsyncGenerationStream:
    """Async iterator over one generation's events; `cancel()` stops it server-side too."""

    def __init__(self, call: Any, target: str) -> None:
        self._call = call
        self._target = target
        self._cancelled = False

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        try:
            async for message in self._call:
                yield decode_event(message)
        except asyncio.CancelledError:
            if self._cancelled:  # grpc.aio reports our own cancel() this way
                return
            self._call.cancel()
            raise
        except grpc.RpcError as exc:
            if self._cancelled and exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise from_rpc_error(exc, self._target) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    async def collect(self) -> Generation:
        result = Generation()
        async for event in self:
            result.add(event)
        return result


class AsyncClient(BaseClient):
    """Talks to one lmlink server from asyncio code. `async with AsyncClient(...) as c:`.

    Takes the same settings as `Client`, `token` included.
    """

    def __init__(self, target: str | None = None, **settings: Any) -> None:
        super().__init__(target, **settings)
        self._channel = (
            grpc.aio.secure_channel(self.target, self._credentials, options=self._channel_options)
            if self._credentials is not None
            else grpc.aio.insecure_channel(self.target, options=self._channel_options)
        )
        self._stub = pb_grpc.InferenceStub(self._channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, **self._call(timeout))
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def stream(
        self,
        *,
        messages: Sequence[Message] | None = None,
        prompt: str | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> AsyncGenerationStream:
        request = self._generate_request(messages, prompt, options)
        return AsyncGenerationStream(self._stub.Generate(request, **self._call(timeout)),
                                     self.target)

    def stream_request(
        self, request: pb.GenerateRequest, *, timeout: float | None = None
    ) -> AsyncGenerationStream:
        """Stream a prebuilt request (the link forwards whole requests, every field), with the
        same deadline and credentials as `stream`."""
        return AsyncGenerationStream(self._stub.Generate(request, **self._call(timeout)),
                                     self.target)

    async def chat(self, messages: Sequence[Message], **options: Any) -> Generation:
        return await self.stream(messages=messages, **options).collect()

    async def complete(self, prompt: str, **options: Any) -> Generation:
        return await self.stream(prompt=prompt, **options).collect()

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [ModelInfo.from_wire(m) for m in reply.models]

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        reply = await self._unary(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)
        return ServerInfo.from_wire(reply)

    async def cancel(self, request_id: str, *, timeout: float | None = None) -> bool:
        request = pb.CancelRequest(request_id=request_id)
        return (await self._unary(self._stub.Cancel, request, timeout)).cancelled

    async def load_model(
        self,
        model: str,
        *,
        make_default: bool = False,
        idle_ttl: float = 0.0,
        timeout: float | None = None,
    ) -> AsyncIterator[LoadProgress | ModelInfo]:
        """Owner only: load `model` on the server; yields LoadProgress, then the ModelInfo."""
        call = self._stub.LoadModel(self._load_request(model, make_default, idle_ttl),
                                    **self._call(timeout))
        try:
            async for event in call:
                yield decode_load_event(event)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    async def unload_model(
        self,
        model: str,
        *,
        cancel_streams: bool = False,
        drain_timeout: float = 0.0,
        timeout: float | None = None,
    ) -> UnloadResult:
        """Owner only: stop serving `model` (waits for its streams, or cancels them)."""
        request = self._unload_request(model, cancel_streams, drain_timeout)
        return UnloadResult.from_wire(await self._unary(self._stub.UnloadModel, request, timeout))

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = await self._unary(
            stub.Check, health_pb2.HealthCheckRequest(service=service), timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
