"""What the blocking and asyncio clients share: everything that is not I/O.

Like httpx's `BaseClient`: target and channel settings, default deadlines, credentials sent
as call metadata (a bearer token), request building and error conversion live here once;
`Client` and `AsyncClient` only open their channel and send.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Sequence

import grpc

from lmlink import defaults
from lmlink.v1 import inference_pb2 as pb

from ._wire import Message, build_request
from .errors import InvalidArgument, LmlinkError, from_rpc_error
from .security import channel_settings

DEFAULT_TARGET = defaults.LOCAL_SERVER
CHANNEL_OPTIONS = [*defaults.CHANNEL_OPTIONS, *defaults.CLIENT_KEEPALIVE_OPTIONS]


def resolve_target(target: str | None) -> str:
    """Explicit target, else $LMLINK_SERVER, else the local default."""
    return target or os.environ.get(defaults.ENV_SERVER) or DEFAULT_TARGET


class BaseClient:
    """Settings and message building for one lmlink server (no channel of its own)."""

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        tls: bool | None = None,
        expected_fingerprint: str | None = None,
        token: str | None = None,
        resume_within: float = defaults.RESUME_WITHIN_S,
    ) -> None:
        self.target = resolve_target(target)
        self.timeout = timeout
        # A stream whose connection drops is resumed for this many seconds (0: never).
        self.resume_within = resume_within
        self._credentials, self._channel_options, self.fingerprint = channel_settings(
            self.target,
            credentials,
            [*CHANNEL_OPTIONS, *options],
            tls=tls,
            expected_fingerprint=expected_fingerprint,
            timeout=timeout,  # a caller's deadline also bounds the certificate fetch
        )
        # A bearer token (`lmlink token create`) names the caller on every call.
        self._metadata: tuple[tuple[str, str], ...] | None = (
            (("authorization", f"Bearer {token}"),) if token else None
        )

    def _call(self, timeout: float | None) -> dict[str, Any]:
        """Keyword arguments of every RPC: the deadline and the credentials metadata."""
        return {"timeout": timeout if timeout is not None else self.timeout,
                "metadata": self._metadata}

    def _error(self, exc: grpc.RpcError) -> LmlinkError:
        return from_rpc_error(exc, self.target)

    @staticmethod
    def _generate_request(messages: Sequence[Message] | None, prompt: str | None,
                          options: dict[str, Any]) -> pb.GenerateRequest:
        try:
            request = build_request(messages=messages, prompt=prompt, **options)
            if not request.request_id:  # known before the first event: resumable, cancellable
                request.request_id = f"req-{uuid.uuid4().hex[:20]}"
            request.SerializeToString()  # proto strings are UTF-8: fail here, clearly
        except (UnicodeEncodeError, ValueError):
            raise InvalidArgument("the request contains text that is not valid Unicode "
                                  "(a lone UTF-16 surrogate); it cannot be sent") from None
        return request

    @staticmethod
    def _load_request(model: str, make_default: bool, idle_ttl: float) -> pb.LoadModelRequest:
        return pb.LoadModelRequest(model=model, make_default=make_default, idle_ttl_seconds=idle_ttl)

    @staticmethod
    def _unload_request(model: str, cancel_streams: bool, drain_timeout: float) -> pb.UnloadModelRequest:
        return pb.UnloadModelRequest(model=model, cancel_streams=cancel_streams,
                                     drain_timeout_seconds=drain_timeout)
