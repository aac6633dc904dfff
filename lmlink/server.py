"""Assemble a running server: listener, gRPC service, health, reflection, engine.

The listener comes up first and reports NOT_SERVING while the model loads, so health checks
and clients get a clear answer ("still loading") instead of a refused connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lmlink.api.core import Core, ServerFacts
from lmlink.api.gate import Gate
from lmlink.api.grpc_service import InferenceService, add_servicer
from lmlink.api.http_bridge import BridgeOptions, HttpBridge
from lmlink.api.http_shell import LOOPBACK_NAMES, HttpListener, bind_socket
from lmlink.api.limits import open_guard
from lmlink.api.models import ModelManager
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
    # Browser UIs (origins like "http://localhost:3000") allowed to call the HTTP bridge.
    allowed_origins: tuple[str, ...] = field(default_factory=lambda: env_list("LMLINK_ALLOWED_ORIGINS"))


def env_list(name: str) -> tuple[str, ...]:
    """A comma-separated environment variable as a tuple (empty when unset)."""
    return tuple(v.strip() for v in os.environ.get(name, "").split(",") if v.strip())


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
    """Run until SIGINT/SIGTERM (or the returned `stopped` event is set).

    Parts come up in order under one exit stack and go down in reverse: front door, access
    guard, model manager, gRPC and HTTP listeners, mDNS; then the first model loads.
    """
    from lmlink.access.store import StoreError

    try:
        if options.listen == "local":
            door = local_door(options.host)
        else:
            door = await tailnet_door(options.listen, options.tailnet)
    except FrontDoorError as exc:
        raise ServeError(str(exc)) from None
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(door.aclose)
        try:  # shares, tokens, quotas and the audit trail live in the state dir
            guard = open_guard(options.tailnet.state_dir, door.identify, gate=gate,
                               refresh=door.refresh, owner_login=door.owner_login,
                               audit_prompts=options.audit_prompts)
        except StoreError as exc:
            raise ServeError(str(exc)) from None
        stack.callback(guard.close)
        models = ModelManager(StreamHub(asyncio.get_running_loop(),
                                        pace=options.stream_pace_ms / 1000),
                              idle_ttl=options.idle_ttl)
        await stack.enter_async_context(models.running())
        guard.start()
        stack.push_async_callback(guard.aclose)
        core = Core(models, guard, ServerFacts(name=options.name, listen_mode=options.listen))
        grpc_address, health = await stack.enter_async_context(build_grpc(core, door, options))
        http_address = await stack.enter_async_context(build_http(core, door, options))
        stopped = _stop_on_signals()
        advertiser = None
        if options.mdns:
            from lmlink.net.mdns import start_for_server

            advertiser = await start_for_server(
                mode=door.mode, name=options.name, grpc_address=grpc_address,
                http_address=http_address, fingerprint=door.fingerprint,
                localapi_socket=options.tailnet.localapi_socket,
                tsnet_hostname=options.tailnet.tsnet_hostname,
            )
            # goodbye packets first on the way down, so browsers drop us at once
            stack.push_async_callback(advertiser.aclose)
        engine = await _first_engine(models, options, loaded, on_progress)
        await health(True)
        models.on_health(health)
        if advertiser is not None:
            await advertiser.serving(lambda: [e.model_id for e in models.engines()])
        log.info("serving %s on %s (listen mode %s)", engine.model_id, grpc_address, options.listen)
        if on_ready:
            on_ready(RunningServer(grpc_address, models.registry, stopped, http_address,
                                   door.fingerprint))
        await stopped.wait()


async def _first_engine(models: ModelManager, options: ServeOptions, loaded: LoadedModel | None,
                        on_progress: Callable[[str], None] | None) -> Engine:
    """Load and start the model named on the command line (or rank 0's sharded engine)."""
    if options.cluster is not None:  # rank 0 of a cluster: a sharded, lockstep engine
        engine = await asyncio.to_thread(options.cluster.make_engine, on_progress)
    else:
        if loaded is None:
            loaded = await asyncio.to_thread(load_model, options.model, progress=on_progress)
        engine = Engine(loaded, options.engine)
    await asyncio.to_thread(engine.start)
    models.add(engine, default=True, spec=options.model)
    if options.cluster is None:  # other models cannot join a sharded cluster at runtime
        from lmlink.engine.loader import BUILTIN_MODEL_ID

        models.enable_loading(lambda m: Engine(m, options.engine), {BUILTIN_MODEL_ID: "builtin"})
    return engine


@contextlib.asynccontextmanager
async def build_grpc(core: Core, door: FrontDoor, options: ServeOptions) -> Any:
    """The gRPC server (Inference, Admin, Health, reflection), listening and exposed.

    Yields (public address, set_health(serving)); health is NOT_SERVING until set.
    """
    server = grpc.aio.server(options=grpc_channel_options())
    add_servicer(inference_pb2_grpc.add_InferenceServicer_to_server, InferenceService(core), server)
    if core.guard.access is not None:  # owner-only shares/tokens/usage
        from lmlink.api.admin_service import AdminService
        from lmlink.v1 import admin_pb2_grpc

        add_servicer(admin_pb2_grpc.add_AdminServicer_to_server, AdminService(core.guard), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    # In tailnet modes the servers bind a private loopback port (any) and a relay takes the
    # public port; in local mode they bind the public port directly.
    bind = door.bind_host
    host = f"[{bind}]" if ":" in bind else bind
    bind_port = 0 if door.mode != "local" else options.grpc_port
    check_bindable(bind, bind_port)
    try:
        if door.grpc_credentials is None:
            port = server.add_insecure_port(f"{host}:{bind_port}")
        else:
            port = server.add_secure_port(f"{host}:{bind_port}", door.grpc_credentials)
    except RuntimeError as exc:
        raise ServeError(f"cannot listen on {host}:{bind_port}: {exc}") from exc

    async def set_health(serving: bool) -> None:
        state = (health_pb2.HealthCheckResponse.SERVING if serving
                 else health_pb2.HealthCheckResponse.NOT_SERVING)
        for svc in ("", SERVICE_NAME):
            await health_servicer.set(svc, state)

    await set_health(False)
    await server.start()
    try:
        try:
            address = await door.expose(port, options.grpc_port)
        except FrontDoorError as exc:
            raise ServeError(str(exc)) from None
        yield address, set_health
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=2.0)


@contextlib.asynccontextmanager
async def build_http(core: Core, door: FrontDoor, options: ServeOptions) -> Any:
    """The HTTP bridge on the same host as gRPC (None: no bridge); yields its address."""
    if options.http_port is None:
        yield None
        return
    bind_port = 0 if door.mode != "local" else options.http_port
    host = f"[{door.bind_host}]" if ":" in door.bind_host else door.bind_host
    try:
        sock = bind_socket(door.bind_host, bind_port)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{bind_port}: {exc.strerror}") from None
    # Plaintext loopback (local mode) is what DNS rebinding reaches: only loopback names.
    # TLS listeners need no Host list: a rebound name fails the certificate check.
    allowed_hosts = (*LOOPBACK_NAMES, door.bind_host) if door.http_tls_files is None else None
    bridge = HttpBridge(core, BridgeOptions(allowed_hosts=allowed_hosts,
                                            allowed_origins=options.allowed_origins))
    listener = HttpListener(bridge.app(), sock, door.http_tls_files)
    await listener.start()
    try:
        try:
            address = await door.expose(listener.port, options.http_port)
        except FrontDoorError as exc:
            raise ServeError(str(exc)) from None
        yield address
    finally:
        await listener.stop()


def _stop_on_signals() -> asyncio.Event:
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stopped.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    return stopped
