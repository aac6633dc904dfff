"""The product's own doors over the in-process engine, on real loopback listeners.

One place that assembles them (call core, model manager, guard), so tests of the network pieces
(relay, TLS) and of access (tokens) exercise the real servicer and the real bridge, not a
stand-in.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Callable

import grpc

from lmlink.access.identity import Identity
from lmlink.api.core import Core, ServerFacts
from lmlink.api.grpc_service import InferenceService, add_servicer
from lmlink.api.http_bridge import BridgeOptions, HttpBridge
from lmlink.api.http_shell import HttpListener, bind_socket
from lmlink.api.limits import Guard
from lmlink.api.models import ModelManager
from lmlink.api.streams import StreamHub
from lmlink.v1 import inference_pb2 as pb
from lmlink.v1 import inference_pb2_grpc as pb_grpc


def make_core(engine: Any, guard: Guard, listen_mode: str, *, ready: bool = True) -> Core:
    """The call core over `engine`; with ready=False the model is known but not yet served."""
    models = ModelManager(StreamHub(asyncio.get_running_loop()))
    if ready:
        models.add(engine)
    else:
        models.registry.add(engine)
    return Core(models, guard, ServerFacts("studio", listen_mode))


class GrpcService:
    """lmlink's real InferenceService on a loopback port (TLS when `credentials` is given),
    asking `gate` about every caller. `peers` lists every peer string the gate was asked about:
    a call that never reached the servicer leaves it unchanged."""

    def __init__(self, engine: Any, gate: Any,
                 credentials: grpc.ServerCredentials | None = None) -> None:
        self.peers: list[str] = []
        self._inner_identify: Callable[[str], Identity | None] = gate.identify
        gate.identify = self._identify  # the same gate, its questions recorded
        self._engine, self._gate = engine, gate
        self.server = grpc.aio.server()
        address = "127.0.0.1:0"
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))

    def _identify(self, peer: str) -> Identity | None:
        self.peers.append(peer)
        return self._inner_identify(peer)

    async def __aenter__(self) -> "GrpcService":
        core = make_core(self._engine, Guard(self._gate, None), "tailscaled")
        add_servicer(pb_grpc.add_InferenceServicer_to_server, InferenceService(core), self.server)
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(None)


async def whoami(channel: grpc.aio.Channel, timeout: float = 5.0) -> pb.Identity:
    """The caller as the servicer saw it (GetServerInfo's `caller`)."""
    info = await pb_grpc.InferenceStub(channel).GetServerInfo(pb.GetServerInfoRequest(),
                                                              timeout=timeout)
    return info.caller


async def model_ids(channel: grpc.aio.Channel, timeout: float = 5.0) -> list[str]:
    reply = await pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=timeout)
    return [m.id for m in reply.models if m.state == "loaded"]


async def generate(channel: grpc.aio.Channel, model: str, max_tokens: int = 4,
                   timeout: float = 30.0) -> int:
    """Stream a generation; returns how many tokens came back."""
    request = pb.GenerateRequest(model=model, prompt="Once upon a time",
                                 sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    n = 0
    async for event in pb_grpc.InferenceStub(channel).Generate(request, timeout=timeout):
        if event.WhichOneof("event") == "delta":
            n += len(event.delta.token_ids)
    return n


@contextlib.asynccontextmanager
async def http_bridge(engine: Any, gate: Any, ready: bool = True, *, guard: Guard | None = None,
                      bearer: Any = None, options: BridgeOptions | None = None,
                      listen_mode: str = "local") -> AsyncIterator[tuple[str, HttpBridge]]:
    """The HTTP bridge over the in-process engine on a real uvicorn listener: (url, bridge).
    A `guard` given here (one with access state) is started and closed with the bridge."""
    started = guard is not None
    guard = guard or Guard(gate, None, bearer=bearer)
    bridge = HttpBridge(make_core(engine, guard, listen_mode, ready=ready),
                        options or BridgeOptions())
    listener = HttpListener(bridge.app(), bind_socket("127.0.0.1", 0))
    await listener.start()
    if started:
        guard.start()
    try:
        yield f"http://{listener.address}", bridge
    finally:
        if started:
            await guard.aclose()
        await listener.stop()
