"""The product's own doors over the in-process engine, on real loopback listeners.

One place that assembles them, so tests of the network pieces (relay, TLS) and of access
(tokens) exercise the real servicer and the real bridge, not a stand-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator, Callable

import grpc

from lmlink.access.identity import Identity
from lmlink.api.grpc_service import InferenceService, ServerFacts
from lmlink.api.http_bridge import HttpBridge, HttpListener, bind_socket
from lmlink.api.streams import StreamHub
from lmlink.engine.registry import ModelRegistry
from lmlink.v1 import inference_pb2 as pb
from lmlink.v1 import inference_pb2_grpc as pb_grpc


def _registry_and_hub(engine: Any) -> tuple[ModelRegistry, StreamHub]:
    hub = StreamHub(asyncio.get_running_loop())
    if hasattr(engine, "add_step_listener"):  # fake engines in unit tests have none
        engine.add_step_listener(hub.on_step)
    registry = ModelRegistry()
    registry.add(engine)
    return registry, hub


class GrpcService:
    """lmlink's real InferenceService on a loopback port (TLS when `credentials` is given),
    asking `gate` about every caller. `peers` lists every peer string the gate was asked about:
    a call that never reached the servicer leaves it unchanged."""

    def __init__(self, engine: Any, gate: Any,
                 credentials: grpc.ServerCredentials | None = None) -> None:
        self.peers: list[str] = []
        self._inner_identify: Callable[[str], Identity | None] = gate.identify
        gate.identify = self._identify  # the same gate, its questions recorded
        registry, hub = _registry_and_hub(engine)
        facts = ServerFacts(name="studio", listen_mode="tailscaled", started_at=time.time())
        self.server = grpc.aio.server()
        pb_grpc.add_InferenceServicer_to_server(
            InferenceService(registry, hub, gate, facts), self.server)
        address = "127.0.0.1:0"
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))

    def _identify(self, peer: str) -> Identity | None:
        self.peers.append(peer)
        return self._inner_identify(peer)

    async def __aenter__(self) -> "GrpcService":
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
async def http_bridge(engine: Any, gate: Any, ready: bool = True, *,
                      guard: Any = None, options: Any = None) -> AsyncIterator[tuple[str, HttpBridge]]:
    """The HTTP bridge over the in-process engine on a real uvicorn listener: (url, bridge)."""
    registry, hub = _registry_and_hub(engine)
    bridge = HttpBridge(registry, hub, gate, lambda: ready, options, guard=guard)
    listener = HttpListener(bridge.app(), bind_socket("127.0.0.1", 0))
    await listener.start()
    if guard is not None:
        guard.start()
    try:
        yield f"http://{listener.address}", bridge
    finally:
        if guard is not None:
            await guard.aclose()
        await listener.stop()
