"""Assemble a running server: listener, gRPC service, health, reflection, engine.

The listener comes up first and reports NOT_SERVING while the model loads, so health checks
and clients get a clear answer ("still loading") instead of a refused connection.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lmlink.api.gate import Gate
from lmlink.api.grpc_service import InferenceService, ServerFacts
from lmlink.api.http_bridge import HttpBridge, HttpListener, bind_socket
from lmlink.api.limits import Guard, open_guard
from lmlink.api.streams import StreamHub
from lmlink.engine.engine import Engine, EngineConfig
from lmlink.engine.loader import LoadedModel, load_model
from lmlink.engine.registry import ModelRegistry
from lmlink.front_door import FrontDoor, FrontDoorError, TailnetSettings, local_door, tailnet_door
from lmlink.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger("lmlink.server")

DEFAULT_GRPC_PORT = 47470
DEFAULT_HTTP_PORT = 47471
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


class ServeError(Exception):
    """An expected reason `serve` cannot run (port taken, bad listen address, model missing)."""


@dataclass
class ServeOptions:
    model: str = "builtin"
    listen: str = "local"
    host: str = "127.0.0.1"
    grpc_port: int = DEFAULT_GRPC_PORT
    http_port: int | None = DEFAULT_HTTP_PORT  # None: no HTTP bridge
    name: str = field(default_factory=socket.gethostname)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Hold a stream's next text this long after its last, so tokens leave in fewer messages.
    stream_pace_ms: float = 10.0
    tailnet: TailnetSettings = field(default_factory=TailnetSettings)
    audit_prompts: bool = False  # the owner opted in to prompt text in the audit trail
    mdns: bool = True  # advertise _lmlink._tcp on the LAN (loopback only in local mode)
    cluster: Any = None  # cluster rank 0: has make_engine(progress) -> Engine (lmlink.cluster)
    idle_ttl: float = 0.0  # unload models idle this many seconds (0: never)


@dataclass
class RunningServer:
    """Handles a caller (CLI or tests) needs while the server runs."""

    grpc_address: str
    registry: ModelRegistry
    stopped: asyncio.Event
    http_address: str | None = None
    tls_fingerprint: str = ""


def check_bindable(host: str, port: int) -> None:
    """Fail with the OS's reason (e.g. 'Address already in use'); grpc's own error hides it."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def grpc_channel_options() -> list[tuple[str, int]]:
    # Prompts can be long; keep the limit explicit on both sides.
    return [
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ]


async def serve(
    options: ServeOptions,
    *,
    on_ready: Callable[[RunningServer], None] | None = None,
    on_progress: Callable[[str], None] | None = None,
    loaded: LoadedModel | None = None,
    gate: Gate | None = None,
) -> None:
    """Run until SIGINT/SIGTERM (or the returned `stopped` event is set)."""
    try:
        if options.listen == "local":
            door = local_door(options.host)
        else:
            door = await tailnet_door(options.listen, options.tailnet)
    except FrontDoorError as exc:
        raise ServeError(str(exc)) from None
    from lmlink.access.store import StoreError

    try:  # shares, tokens, quotas and the audit trail live in the state dir
        guard = open_guard(options.tailnet.state_dir, door.gate.identify, gate=gate,
                           refresh=door.refresh, owner_login=door.owner_login,
                           audit_prompts=options.audit_prompts)
    except StoreError as exc:
        await door.aclose()
        raise ServeError(str(exc)) from None
    try:
        await _serve_behind(door, options, on_ready, on_progress, loaded, guard.gate, guard)
    finally:
        guard.close()
        await door.aclose()


async def _serve_behind(
    door: FrontDoor,
    options: ServeOptions,
    on_ready: Callable[[RunningServer], None] | None,
    on_progress: Callable[[str], None] | None,
    loaded: LoadedModel | None,
    gate: Gate,
    guard: Guard | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    registry = ModelRegistry()
    hub = StreamHub(loop, pace=options.stream_pace_ms / 1000)
    ready = asyncio.Event()
    facts = ServerFacts(name=options.name, listen_mode=options.listen, started_at=time.time())
    service = InferenceService(registry, hub, gate, facts, ready.is_set, guard=guard)

    server = grpc.aio.server(options=grpc_channel_options())
    inference_pb2_grpc.add_InferenceServicer_to_server(service, server)
    if guard is not None and guard.access is not None:  # owner-only shares/tokens/usage
        from lmlink.api.admin_service import AdminService
        from lmlink.v1 import admin_pb2_grpc

        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(guard), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    # In tailnet modes the servers listen on unix sockets in a private directory and a relay
    # takes the public port (lmlink.net.inner); in local mode they bind the public port directly.
    relayed = door.mode != "local"
    bind = door.bind_host
    host = f"[{bind}]" if ":" in bind else bind
    grpc_bind_port = 0 if relayed else options.grpc_port
    grpc_where = door.inner.grpc_target if relayed else f"{host}:{grpc_bind_port}"
    if not relayed:
        check_bindable(bind, grpc_bind_port)
    try:
        if door.grpc_credentials is None:
            bound = server.add_insecure_port(grpc_where)
        else:
            bound = server.add_secure_port(grpc_where, door.grpc_credentials)
        port = door.inner.grpc_path if relayed else bound
    except RuntimeError as exc:
        raise ServeError(f"cannot listen on {grpc_where}: {exc}") from exc
    http: HttpListener | None = None
    if options.http_port is not None:  # same host as gRPC, so the same listener rules apply
        from lmlink.net.httpserver import uvicorn_options

        http_bind_port = 0 if relayed else options.http_port
        try:
            http_socket = door.inner.http_socket() if relayed else bind_socket(bind, http_bind_port)
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{http_bind_port}: {exc.strerror}") from None
        http = HttpListener(
            HttpBridge(registry, hub, gate, ready.is_set, guard=guard).app(), http_socket,
            door.http_tls_files, uvicorn_options(door.http_client_ca),
        )
    for svc in ("", SERVICE_NAME):
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    if http is not None:
        await http.start()

    stopped = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stopped.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    advertiser = None
    try:
        try:
            grpc_address = await door.expose(port, options.grpc_port)
            http_address = (
                await door.expose(http.port, options.http_port)
                if http is not None and options.http_port is not None
                else None
            )
        except FrontDoorError as exc:
            raise ServeError(str(exc)) from None
        if options.mdns:
            from lmlink.net.mdns import start_for_server

            advertiser = await start_for_server(
                mode=door.mode, name=options.name, grpc_address=grpc_address,
                http_address=http_address, fingerprint=door.fingerprint,
                localapi_socket=options.tailnet.localapi_socket,
                tsnet_hostname=options.tailnet.tsnet_hostname,
            )
        if options.cluster is not None:  # rank 0 of a cluster: a sharded, lockstep engine
            engine = await asyncio.to_thread(options.cluster.make_engine, on_progress)
            loaded = engine.loaded
        else:
            if loaded is None:
                loaded = await asyncio.to_thread(load_model, options.model, progress=on_progress)
            engine = Engine(loaded, options.engine)
        engine.add_step_listener(hub.on_step)
        await asyncio.to_thread(engine.start)
        registry.add(engine, default=True, spec=options.model)
        if options.cluster is None:  # other models cannot join a sharded cluster at runtime
            _enable_model_management(registry, options, hub)
        else:
            health_watch = asyncio.ensure_future(_watch_health(registry, health_servicer))
        sweeper = asyncio.ensure_future(service.sweep_idle())
        if guard is not None:
            guard.start()
        ready.set()
        for svc in ("", SERVICE_NAME):
            await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
        if advertiser is not None:
            await advertiser.serving(lambda: [e.model_id for e in registry.engines()])
        log.info("serving %s on %s (listen mode %s)", loaded.id, grpc_address, options.listen)
        if on_ready:
            on_ready(
                RunningServer(grpc_address, registry, stopped, http_address, door.fingerprint)
            )
        await stopped.wait()
    finally:
        if advertiser is not None:  # goodbye packets first, so browsers drop us at once
            await advertiser.aclose()
        await health_servicer.enter_graceful_shutdown()
        await asyncio.gather(server.stop(grace=2.0), http.stop() if http else asyncio.sleep(0))
        if "sweeper" in locals():
            sweeper.cancel()
        if "health_watch" in locals():
            health_watch.cancel()
        await asyncio.to_thread(registry.stop_all)
        if guard is not None:
            await guard.aclose()


async def _watch_health(registry: ModelRegistry, health_servicer) -> None:
    """Cluster mode: a rank that fails makes the engine unhealthy; say so (NOT_SERVING)."""
    serving = True
    while True:
        await asyncio.sleep(0.25)
        ok = all(e.healthy for e in registry.engines())
        if ok != serving:
            serving = ok
            state = (health_pb2.HealthCheckResponse.SERVING if ok
                     else health_pb2.HealthCheckResponse.NOT_SERVING)
            for svc in ("", SERVICE_NAME):
                await health_servicer.set(svc, state)


def _enable_model_management(registry: ModelRegistry, options: ServeOptions, hub: StreamHub) -> None:
    """LoadModel/UnloadModel: how to start an engine for a newly loaded model, idle TTL."""
    from lmlink.engine.loader import BUILTIN_MODEL_ID

    def start_engine(loaded: LoadedModel) -> Engine:
        engine = Engine(loaded, options.engine)
        engine.add_step_listener(hub.on_step)
        engine.start()
        return engine

    registry.engine_factory = start_engine
    registry.default_idle_ttl = options.idle_ttl
    registry.remember(BUILTIN_MODEL_ID, "builtin", ("builtin",))
