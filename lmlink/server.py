"""Assemble a running server: listener, gRPC service, health, reflection, engine.

The listener comes up first and reports NOT_SERVING while the model loads, so health checks
and clients get a clear answer ("still loading") instead of a refused connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lmlink import sdnotify
from lmlink.api.admission import Refusal
from lmlink import defaults
from lmlink.api.core import Core, ServerFacts
from lmlink.api.gate import Gate
from lmlink.api.grpc_service import InferenceService, add_servicer
from lmlink.api.http_bridge import BridgeOptions, HttpBridge
from lmlink.api.http_shell import LOOPBACK_NAMES, HttpListener, bind_socket
from lmlink.api.limits import open_guard
from lmlink.api.status_door import StatusViews
from lmlink.api.models import ModelManager
from lmlink.api.resume import ResumeOptions
from lmlink.api.streams import StreamHub
from lmlink.engine.engine import Engine, EngineConfig
from lmlink.engine.loader import LoadedModel, load_model
from lmlink.engine.registry import ModelRegistry
from lmlink.front_door import (
    FrontDoor,
    FrontDoorError,
    TailnetSettings,
    default_state_dir,
    local_door,
    tailnet_door,
)
from lmlink.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger("lmlink.server")

DEFAULT_GRPC_PORT = defaults.GRPC_PORT
DEFAULT_HTTP_PORT = defaults.HTTP_PORT
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
    resume: ResumeOptions = field(default_factory=ResumeOptions)  # dropped streams kept
    # On SIGTERM/SIGINT: stop admitting, let running streams finish this long, then cut them.
    drain_timeout: float = 30.0
    metrics_port: int | None = None  # loopback-only /metrics for a local Prometheus (no auth)
    # Browser UIs (origins like "http://localhost:3000") allowed to call the HTTP bridge.
    allowed_origins: tuple[str, ...] = field(default_factory=lambda: env_list(defaults.ENV_ALLOWED_ORIGINS))

    @classmethod
    def from_args(cls, args: Any) -> "ServeOptions":
        """From `lmlink serve` / `lmlink cluster up` flags (missing flags keep their default)."""
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        grpc_port = get("grpc_port", DEFAULT_GRPC_PORT)
        http_port = get("http_port")
        if http_port is None:  # not given: 47471, or any free port when gRPC takes any
            http_port = 0 if grpc_port == 0 else DEFAULT_HTTP_PORT
        state_dir = get("state_dir")
        cost = get("verify_position_cost")
        options = cls(
            model=get("model") or "builtin",
            listen=get("listen", "local"),
            host=get("host") or "127.0.0.1",
            grpc_port=grpc_port,
            http_port=http_port,
            engine=EngineConfig(
                max_batch_size=get("max_batch", 32),
                max_queue=get("max_queue", 1024),
                default_max_tokens=max(1, get("default_max_tokens", 512)),
                speculate=get("speculate") or "prompt-lookup",
                draft_model=get("draft_model"),
                verify_position_cost=(EngineConfig.verify_position_cost if cost is None
                                      else cost),
            ),
            stream_pace_ms=get("stream_pace_ms", 10.0),
            resume=ResumeOptions(
                grace_seconds=max(0.0, get("resume_grace", 60.0)),
                max_buffer_bytes=get("resume_buffer", 1024 * 1024),
                max_detached=get("resume_max_detached", 64),
            ),
            tailnet=TailnetSettings(
                state_dir=Path(state_dir) if state_dir else default_state_dir(),
                localapi_socket=get("localapi_socket"),
                require_client_cert=bool(get("require_client_cert", False)),
                tsnet_hostname=get("tsnet_hostname") or "lmlink",
                tsnet_auth_key_file=get("tsnet_auth_key_file"),
                tsnet_control_url=get("tsnet_control_url"),
            ),
            audit_prompts=bool(get("audit_prompts", False)),
            mdns=not get("no_mdns", False),
            idle_ttl=get("idle_ttl", 0.0),
            drain_timeout=get("drain_timeout", 30.0),
            metrics_port=get("metrics_port"),
        )
        if get("name"):
            options.name = get("name")
        return options


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
    phone: Any = None  # lmlink.net.phone.PhoneAdvice: the Shortcut URL (tailnet modes)


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
    # Prompts can be long; keep the limit explicit on both sides (the clients use the same).
    return [*defaults.CHANNEL_OPTIONS, *defaults.SERVER_KEEPALIVE_OPTIONS]


async def serve(
    options: ServeOptions,
    *,
    on_ready: Callable[[RunningServer], None] | None = None,
    on_progress: Callable[[str], None] | None = None,
    loaded: LoadedModel | None = None,
    gate: Gate | None = None,
    cluster: Any = None,
) -> None:
    """Run until SIGINT/SIGTERM (or the returned `stopped` event is set).

    Parts come up in order under one exit stack and go down in reverse: front door, access
    guard, model manager, gRPC and HTTP listeners, mDNS; then the first model loads.
    `cluster`: rank 0 of `lmlink cluster up` passes its runtime (make_engine(progress)).
    """
    if cluster is not None:
        options = replace(options, cluster=cluster)
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
        core = Core(models, guard, ServerFacts(name=options.name, listen_mode=options.listen),
                    options.resume)
        stack.callback(core.streams.close)
        views = StatusViews(core)
        grpc_address, health = await stack.enter_async_context(build_grpc(core, door, options, views))
        http_address = await stack.enter_async_context(build_http(core, door, options, views))
        if options.metrics_port is not None:
            stack.callback(start_metrics_port(views, options.metrics_port))
        signals = _Signals()
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
        phone = _phone_advice(door, http_address)
        if phone is not None:
            core.facts = dataclasses.replace(core.facts, shortcut_url=phone.url,
                                             shortcut_needs_profile=phone.needs_profile)
        if on_ready:
            on_ready(RunningServer(grpc_address, models.registry, signals.stopped, http_address,
                                   door.fingerprint, phone))
        sdnotify.ready(f"serving {engine.model_id} on {grpc_address}")
        await signals.wait()
        if not signals.stopped.is_set():  # a signal, not a caller of `stopped`: drain first
            await health(False)
            if advertiser is not None:
                await advertiser.aclose()  # mDNS goodbye: browsers drop us at once
            await drain(core, views, options.drain_timeout, signals.stopped)


async def drain(core: Core, views: StatusViews, timeout: float, hurry: asyncio.Event) -> int:
    """Graceful stop: refuse new and waiting calls, let running ones finish for `timeout`
    seconds (or until `hurry` is set: a second signal), then end the rest with UNAVAILABLE.
    Every call still ends through its lease, so audit rows close. Returns how many were cut."""
    core.draining = views.draining = True
    running = core.guard.running_calls
    sdnotify.stopping(f"draining {running} streams")
    log.warning("shutting down: %d running streams may finish within %.0f s "
                "(signal again to stop now)", running, timeout)
    core.guard.shut(_shutdown_refusal(core, "waiting"), waiting_only=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while core.guard.running_calls and not hurry.is_set():
                await asyncio.sleep(0.05)
    cut = core.guard.shut(_shutdown_refusal(core, "running")) if core.guard.running_calls else 0
    end = asyncio.get_running_loop().time() + 2.0
    while any(e.stats().active for e in core.models.engines()) and asyncio.get_running_loop().time() < end:
        await asyncio.sleep(0.02)
    if cut:
        log.warning("shutdown: cut %d streams still running", cut)
    return cut


def _shutdown_refusal(core: Core, what: str) -> Refusal:
    why = ("before its turn" if what == "waiting" else "before this answer finished")
    return Refusal("unavailable", f"{core.facts.name} shut down {why}; retry on another server or later",
                   retry_after=5.0, code="server_shutdown", outcome="cancelled")


def start_metrics_port(views: StatusViews, port: int) -> Callable[[], None]:
    """Serve the Prometheus exposition on 127.0.0.1:`port` (no identity: loopback only)."""
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, addr="127.0.0.1", registry=views.metrics.registry)
    except OSError as exc:
        raise ServeError(f"cannot listen on 127.0.0.1:{port} for metrics: {exc.strerror}") from None

    def stop() -> None:
        server.shutdown()
        thread.join(5)

    return stop


def _phone_advice(door: FrontDoor, http_address: str | None) -> Any:
    """What an iPhone Shortcut calls (tailnet modes with the bridge on); None otherwise."""
    if door.tls is None or not http_address:
        return None
    from lmlink.net.phone import advise

    port = int(http_address.split(", ")[0].rsplit(":", 1)[1])
    return advise(door.tls.source, door.tls.cert_chain_pem, door.public_hosts, port)


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
async def build_grpc(core: Core, door: FrontDoor, options: ServeOptions,
                     views: StatusViews | None = None) -> Any:
    """The gRPC server (Inference, Admin, Health, reflection), listening and exposed.

    Yields (public address, set_health(serving)); health is NOT_SERVING until set.
    """
    server = grpc.aio.server(options=grpc_channel_options())
    add_servicer(inference_pb2_grpc.add_InferenceServicer_to_server, InferenceService(core), server)
    services = [SERVICE_NAME]
    if core.guard.access is not None:  # owner-only shares/tokens/usage
        from lmlink.api.admin_service import AdminService
        from lmlink.v1 import admin_pb2, admin_pb2_grpc

        add_servicer(admin_pb2_grpc.add_AdminServicer_to_server, AdminService(core), server)
        services.append(admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name)
    from lmlink.api.observe_service import ObserveService
    from lmlink.v1 import observe_pb2, observe_pb2_grpc

    add_servicer(observe_pb2_grpc.add_ObserveServicer_to_server,
                 ObserveService(core, views or StatusViews(core)), server)
    services.append(observe_pb2.DESCRIPTOR.services_by_name["Observe"].full_name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    # In tailnet modes the servers listen on unix sockets in a private directory and a relay
    # takes the public port (lmlink.net.inner); in local mode they bind the public port directly.
    relayed = door.mode != "local"
    bind = door.bind_host
    host = f"[{bind}]" if ":" in bind else bind
    where = door.inner.grpc_target if relayed else f"{host}:{options.grpc_port}"
    if not relayed:
        check_bindable(bind, options.grpc_port)
    try:
        if door.grpc_credentials is None:
            bound = server.add_insecure_port(where)
        else:
            bound = server.add_secure_port(where, door.grpc_credentials)
    except RuntimeError as exc:
        raise ServeError(f"cannot listen on {where}: {exc}") from exc
    port: int | str = door.inner.grpc_path if relayed else bound

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
async def build_http(core: Core, door: FrontDoor, options: ServeOptions,
                     views: StatusViews | None = None) -> Any:
    """The HTTP bridge on the same host as gRPC (None: no bridge); yields its address."""
    if options.http_port is None:
        yield None
        return
    from lmlink.net.httpserver import uvicorn_options

    relayed = door.mode != "local"  # then: a unix socket in the private dir (lmlink.net.inner)
    bind_port = 0 if relayed else options.http_port
    host = f"[{door.bind_host}]" if ":" in door.bind_host else door.bind_host
    try:
        sock = door.inner.http_socket() if relayed else bind_socket(door.bind_host, bind_port)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{bind_port}: {exc.strerror}") from None
    # Plaintext loopback (local mode) is what DNS rebinding reaches: only loopback names.
    # TLS listeners need no Host list: a rebound name fails the certificate check.
    allowed_hosts = (*LOOPBACK_NAMES, door.bind_host) if door.http_tls_files is None else None
    bridge = HttpBridge(core, BridgeOptions(allowed_hosts=allowed_hosts,
                                            allowed_origins=options.allowed_origins), views)
    # limits against connection abuse; mTLS when --require-client-cert (lmlink.net.httpserver)
    listener = HttpListener(bridge.app(), sock, door.http_tls_files,
                            uvicorn_options(door.http_client_ca))
    await listener.start()
    try:
        try:
            address = await door.expose(listener.port, options.http_port)
        except FrontDoorError as exc:
            raise ServeError(str(exc)) from None
        yield address
    finally:
        await listener.stop()


class _Signals:
    """SIGINT/SIGTERM: the first starts a drain, the second stops at once. Setting `stopped`
    (tests, embedders) stops at once too."""

    def __init__(self) -> None:
        self.first = asyncio.Event()
        self.stopped = asyncio.Event()
        self._count = 0
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._signal)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests)
                pass

    def _signal(self) -> None:
        self._count += 1
        (self.first if self._count == 1 else self.stopped).set()

    async def wait(self) -> None:
        """Until the first signal or `stopped`, whichever comes first."""
        waiters = [asyncio.ensure_future(e.wait()) for e in (self.first, self.stopped)]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
