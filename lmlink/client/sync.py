"""Blocking Python client: iterate events as they arrive, with deadlines and cancellation."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmlink.v1 import inference_pb2 as pb
from lmlink.v1 import inference_pb2_grpc as pb_grpc

from ._wire import Message, decode_event
from .base import CHANNEL_OPTIONS as _CHANNEL_OPTIONS  # noqa: F401 - kept for importers
from .base import DEFAULT_TARGET, BaseClient, resolve_target
from .errors import Cancelled, LmlinkError, from_rpc_error
from .events import Event, Generation
from .resume import ResumeState
from .info import LoadProgress, ModelInfo, ServerInfo, UnloadResult, decode_load_event


class GenerationStream:
    """Iterator over one generation's events; `cancel()` stops it server-side too.

    A dropped connection is resumed where it left off (lmlink.client.resume)."""

    def __init__(self, client: "Client", request: pb.GenerateRequest, timeout: float | None) -> None:
        self._client = client
        self._target = client.target
        self._timeout = timeout
        self._state = ResumeState(request, client.resume_within)
        self._call = client._stub.Generate(request, **client._call(timeout))
        self._cancelled = False

    @property
    def request_id(self) -> str:
        return self._state.request_id

    @property
    def resumed(self) -> int:
        """How many times the stream was picked up again after its connection dropped."""
        return self._state.resumed

    def __iter__(self) -> Iterator[Event]:
        state = self._state
        while True:
            try:
                for message in self._call:
                    state.seen(message)
                    yield decode_event(message)
                return
            except grpc.RpcError as exc:
                if self._cancelled and exc.code() == grpc.StatusCode.CANCELLED:
                    return
                if self._cancelled:
                    raise from_rpc_error(exc, self._target) from None
                self._call = self._reopen(exc)
            finally:
                if not state.finished and not self._cancelled and sys.exc_info()[0] is GeneratorExit:
                    self.cancel()  # the consumer stopped reading: not kept for resuming

    def _reopen(self, exc: grpc.RpcError) -> Any:
        """The call that continues the stream after `exc`, or raise."""
        state, client = self._state, self._client
        if state.regenerate(exc):
            return client._stub.Generate(state.request, **client._call(self._timeout))
        delay = state.retry_delay(exc)
        if delay is None:
            raise from_rpc_error(exc, self._target) from None
        time.sleep(delay)
        return client._stub.Resume(state.resume_request(), **client._call(self._timeout))

    def cancel(self) -> None:
        """Stop the generation on the server (it is not kept for resuming)."""
        if self._cancelled:
            return
        self._cancelled = True
        self._call.cancel()
        if not self._state.finished:
            with contextlib.suppress(Exception):
                self._client.cancel(self._state.request_id, timeout=5)

    def collect(self) -> Generation:
        result = Generation()
        for event in self:
            result.add(event)
        return result


class Client(BaseClient):
    """Talks to one lmlink server. Use as a context manager, or call `close()`.

    `token` (an `lmk_...` bearer token) is sent with every call, for callers the server
    cannot identify from the connection.
    """

    def __init__(self, target: str | None = None, **settings: Any) -> None:
        super().__init__(target, **settings)
        self._channel = (
            grpc.secure_channel(self.target, self._credentials, options=self._channel_options)
            if self._credentials is not None
            else grpc.insecure_channel(self.target, options=self._channel_options)
        )
        self._stub = pb_grpc.InferenceStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, **self._call(timeout))
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
    ) -> GenerationStream:
        """Start a generation; iterate the result for Started, TokenDelta... Completed."""
        request = self._generate_request(messages, prompt, options)
        stream = GenerationStream(self, request, timeout)
        stream._state.retry_before_first_event = retry_before_first_event
        return stream

    def chat(self, messages: Sequence[Message], **options: Any) -> Generation:
        return self.stream(messages=messages, **options).collect()

    def complete(self, prompt: str, **options: Any) -> Generation:
        return self.stream(prompt=prompt, **options).collect()

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [ModelInfo.from_wire(m) for m in reply.models]

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        reply = self._unary(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)
        return ServerInfo.from_wire(reply)

    def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The server's live status (what `lmlink top` shows): models, active streams, rates,
        refusals, cluster ranks, as a JSON-ready dict. Needs the `info` action."""
        from google.protobuf.json_format import MessageToDict

        from lmlink.v1 import observe_pb2, observe_pb2_grpc

        stub = observe_pb2_grpc.ObserveStub(self._channel)
        reply = self._unary(stub.GetStatus, observe_pb2.GetStatusRequest(), timeout)
        return MessageToDict(reply, preserving_proto_field_name=True,
                             always_print_fields_with_no_presence=True)

    def cancel(self, request_id: str, *, timeout: float | None = None) -> bool:
        reply = self._unary(self._stub.Cancel, pb.CancelRequest(request_id=request_id), timeout)
        return reply.cancelled

    def load_model(
        self,
        model: str,
        *,
        make_default: bool = False,
        idle_ttl: float = 0.0,
        timeout: float | None = None,
    ) -> Iterator[LoadProgress | ModelInfo]:
        """Owner only: load `model` on the server; yields LoadProgress, then the ModelInfo."""
        call = self._stub.LoadModel(self._load_request(model, make_default, idle_ttl),
                                    **self._call(timeout))
        try:
            for event in call:
                yield decode_load_event(event)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def unload_model(
        self,
        model: str,
        *,
        cancel_streams: bool = False,
        drain_timeout: float = 0.0,
        timeout: float | None = None,
    ) -> UnloadResult:
        """Owner only: stop serving `model` (waits for its streams, or cancels them)."""
        request = self._unload_request(model, cancel_streams, drain_timeout)
        return UnloadResult.from_wire(self._unary(self._stub.UnloadModel, request, timeout))

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """'SERVING', 'NOT_SERVING' or 'SERVICE_UNKNOWN' from the standard health service."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


__all__ = ["Client", "GenerationStream", "LmlinkError", "Cancelled", "DEFAULT_TARGET",
           "resolve_target"]
