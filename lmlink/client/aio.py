"""asyncio Python client with the same surface as the blocking one."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmlink.v1 import inference_pb2 as pb
from lmlink.v1 import inference_pb2_grpc as pb_grpc

from ._wire import Message, decode_event
from .base import BaseClient
from .errors import from_rpc_error
from .events import Event, Generation
from .resume import ResumeState
from .info import LoadProgress, ModelInfo, ServerInfo, UnloadResult, decode_load_event


class AsyncGenerationStream:
    """Async iterator over one generation's events; `cancel()` stops it server-side too.

    A dropped connection is resumed where it left off (lmlink.client.resume)."""

    def __init__(self, client: "AsyncClient", request: pb.GenerateRequest,
                 timeout: float | None) -> None:
        self._client = client
        self._target = client.target
        self._timeout = timeout
        self._state = ResumeState(request, client.resume_within)
        self._call = client._stub.Generate(request, **client._call(timeout))
        self._cancelled = False
        self._cancel_task: asyncio.Future[Any] | None = None

    @property
    def request_id(self) -> str:
        return self._state.request_id

    @property
    def resumed(self) -> int:
        return self._state.resumed

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        state = self._state
        try:
            while True:
                try:
                    async for message in self._call:
                        state.seen(message)
                        yield decode_event(message)
                    return
                except grpc.RpcError as exc:
                    if self._cancelled and exc.code() == grpc.StatusCode.CANCELLED:
                        return
                    if self._cancelled:
                        raise from_rpc_error(exc, self._target) from None
                    self._call = await self._reopen(exc)
        except asyncio.CancelledError:
            if self._cancelled:  # grpc.aio reports our own cancel() this way
                return
            self.cancel()
            raise
        except GeneratorExit:
            if not state.finished:
                self.cancel()  # the consumer stopped reading: not kept for resuming
            raise

    async def _reopen(self, exc: grpc.RpcError) -> Any:
        state, client = self._state, self._client
        if state.regenerate(exc):
            return client._stub.Generate(state.request, **client._call(self._timeout))
        delay = state.retry_delay(exc)
        if delay is None:
            raise from_rpc_error(exc, self._target) from None
        await asyncio.sleep(delay)
        return client._stub.Resume(state.resume_request(), **client._call(self._timeout))

    def cancel(self) -> None:
        """Stop the generation on the server (it is not kept for resuming)."""
        if self._cancelled:
            return
        self._cancelled = True
        self._call.cancel()
        if not self._state.finished:
            self._cancel_task = asyncio.ensure_future(self._cancel_on_server())

    async def _cancel_on_server(self) -> None:
        try:
            await self._client.cancel(self._state.request_id, timeout=5)
        except Exception:
            pass  # best effort: the server also expires a stream nobody resumes

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
        retry_before_first_event: bool = True,
        **options: Any,
    ) -> AsyncGenerationStream:
        request = self._generate_request(messages, prompt, options)
        stream = AsyncGenerationStream(self, request, timeout)
        stream._state.retry_before_first_event = retry_before_first_event
        return stream

    def stream_request(
        self, request: pb.GenerateRequest, *, timeout: float | None = None,
        retry_before_first_event: bool = True,
    ) -> AsyncGenerationStream:
        """Stream a prebuilt request (the link forwards whole requests, every field), with the
        same deadline and credentials as `stream`."""
        if not request.request_id:  # known before the first event: resumable, cancellable
            request.request_id = f"req-{uuid.uuid4().hex[:20]}"
        stream = AsyncGenerationStream(self, request, timeout)
        stream._state.retry_before_first_event = retry_before_first_event
        return stream

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
