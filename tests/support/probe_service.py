"""A tiny gRPC service for network tests: who am I, which models may I see, may I generate?

It does exactly what the real servicer must do with the net/access pieces: map
`context.peer()` to an Identity (via `PeerIdentities` or any `identify` callable), refuse
calls without one, and ask the Policy. Messages are JSON bytes (generic handlers), so no
proto is needed. Also serves the standard grpc.health.v1 service.
"""

from __future__ import annotations

import json
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from lmlink.access.identity import Identity
from lmlink.access.policy import Policy

SERVICE = "lmlink.test.Probe"
MODELS = ["tiny", "qwen-7b", "kimi-k2"]


def _identity_json(ident: Identity) -> dict:
    return {"login_name": ident.login_name, "node_name": ident.node_name, "tags": list(ident.tags),
            "is_owner": ident.is_owner, "source": ident.source}


class Probe:
    def __init__(self, identify: Callable[[str], Identity | None], policy: Policy | None = None,
                 models: list[str] | None = None) -> None:
        self.identify = identify
        self.policy = policy or Policy()
        self.models = models or list(MODELS)
        self.calls = 0
        self.peers: list[str] = []

    async def _caller(self, context: grpc.aio.ServicerContext) -> Identity:
        self.calls += 1
        peer = context.peer()
        self.peers.append(peer)
        ident = self.identify(peer)
        if ident is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"no tailnet identity for {peer}")
        return ident  # type: ignore[return-value]

    async def whoami(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        ident = await self._caller(context)
        return json.dumps({**_identity_json(ident), "peer": context.peer()}).encode()

    async def list_models(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        ident = await self._caller(context)
        d = self.policy.check(ident, "list")
        if not d.allowed:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, d.reason)
        return json.dumps(self.policy.visible_models(ident, self.models)).encode()

    async def generate(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        ident = await self._caller(context)
        model = json.loads(request or b"{}").get("model", "")
        if model not in self.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {model!r}")
        d = self.policy.check(ident, "generate", model)
        if not d.allowed:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, d.reason)
        return json.dumps({"model": model, "text": "ok", "max_streams": d.limits.max_streams}).encode()

    def add_to(self, server: grpc.aio.Server) -> None:
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(fn)
            for name, fn in (("WhoAmI", self.whoami), ("ListModels", self.list_models),
                             ("Generate", self.generate))
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)


async def call(channel: grpc.aio.Channel, method: str, body: dict | None = None,
               timeout: float = 5.0):
    """Client side: call a Probe method, return the decoded JSON reply."""
    fn = channel.unary_unary(f"/{SERVICE}/{method}")
    reply = await fn(json.dumps(body or {}).encode(), timeout=timeout)
    return json.loads(reply)
