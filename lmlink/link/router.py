"""Which remote server answers a request: preferences, then measured latency, load and path.

The router keeps one gRPC client per known server (configured, `$LMLINK_SERVER`, discovered)
and probes each every `refresh_interval` seconds with GetServerInfo (round-trip time, active
streams, queued requests) and ListModels (loaded models). For a model it orders the servers
that have it loaded:

1. the preferred server for that model (`lmlink link prefer MODEL SERVER`), if it is up;
2. then by path: loopback or direct tailnet paths before unknown ones before DERP-relayed ones;
3. then by cost = round-trip ms + 25 ms per active stream + 50 ms per queued request (the
   streams this link itself opened since the last probe count too). The round trip is the
   least of the last LATENCY_SAMPLES probes, never the call that opened the channel: a probe
   answered while the server computes a prefill measures that moment's load (the stream
   counts already price load), not the path; on a loaded host one such sample ran to 270 ms
   and sent requests to the busier server.

`model@server` pins a request to one server (no failover). A server that fails is marked down
at once and probed again on the next tick, so the link recovers by itself when it comes back.

A server that answers but refuses this link's user (PERMISSION_DENIED, UNAUTHENTICATED) is not
"unreachable": when no server is up and one of them refused, the request is refused with that
server's reason (403 / 401), not 503; any other server that serves the model is still used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

import grpc

from lmlink.client.aio import AsyncClient
from lmlink.client.errors import LmlinkError

log = logging.getLogger("lmlink.link")

# A server that answered "not you": a refusal to report, not a server to call unreachable.
DENIALS = {grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.UNAUTHENTICATED: 401}
ACTIVE_COST_MS = 25.0
QUEUED_COST_MS = 50.0
LATENCY_SAMPLES = 5
_PATH_RANK = {"loopback": 0, "direct": 0, "unknown": 1, "idle": 1, "relayed": 2}


@dataclass
class Server:
    """One remote lmlink server as the link sees it."""

    target: str
    origin: str = "configured"  # configured | discovered
    name: str = ""
    path: str = "unknown"
    fingerprint: str | None = None  # expected (advertised) TLS fingerprint, if known
    up: bool = False
    models: tuple[str, ...] = ()  # loaded model ids
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> id
    context: dict[str, int] = field(default_factory=dict)
    latency_ms: float = 0.0  # least of `rtts`
    rtts: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES), repr=False)
    active: int = 0
    queued: int = 0
    inflight: int = 0  # streams this link has open to it now
    error: str = "not checked yet"
    denied: int = 0  # 403 / 401 when its last probe was refused (then `error` is its reason)
    checked_at: float = 0.0
    client: AsyncClient | None = None

    @property
    def label(self) -> str:
        return self.name or self.target

    def model_id(self, name: str) -> str | None:
        """The id this server knows `name` by (id or alias), or None."""
        if name in self.models:
            return name
        return self.aliases.get(name)

    @property
    def cost(self) -> float:
        return (self.latency_ms + ACTIVE_COST_MS * max(self.active, self.inflight)
                + QUEUED_COST_MS * self.queued)

    def order_key(self) -> tuple[Any, ...]:
        return (_PATH_RANK.get(self.path, 1), self.cost, self.target)

    def matches(self, label: str) -> bool:
        return label in (self.name, self.target)

    def describe(self) -> dict[str, Any]:
        return {
            "server": self.label, "target": self.target, "origin": self.origin, "up": self.up,
            "path": self.path, "models": list(self.models), "latency_ms": round(self.latency_ms, 2),
            "latency_samples": len(self.rtts),
            "active_streams": self.active, "queued_requests": self.queued,
            "link_streams": self.inflight, "error": "" if self.up else self.error,
        }


class NoServer(Exception):
    """No server can take this request; `status` 503 (none reachable) or 404 (no such model)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Router:
    def __init__(
        self,
        targets: Iterable[str] = (),
        *,
        prefer: dict[str, str] | None = None,
        discovery: bool = False,
        refresh_interval: float = 2.0,
        probe_timeout: float = 2.0,
        discovery_interval: float = 30.0,
        discovery_timeout: float = 1.5,
    ) -> None:
        self.servers: dict[str, Server] = {}
        for t in targets:
            self.add(t)
        self.prefer = dict(prefer or {})
        self.discovery = discovery
        self.refresh_interval = refresh_interval
        self.probe_timeout = probe_timeout
        self.discovery_interval = discovery_interval
        self.discovery_timeout = discovery_timeout
        self._task: asyncio.Task[None] | None = None
        self.last_refresh = 0.0
        self._wake = asyncio.Event()
        self._probing: dict[str, asyncio.Task[None]] = {}
        self.changed: list[Any] = []  # callbacks(router) when a server goes up or down
        # Re-read preferences when link.toml changes (`lmlink link prefer` while running).
        self.prefs_file: Any = None
        self._prefs_mtime = 0.0

    def _reload_prefs(self) -> None:
        if self.prefs_file is None:
            return
        try:
            mtime = self.prefs_file.stat().st_mtime
        except OSError:
            return
        if mtime != self._prefs_mtime:
            from .config import load_link_config

            self._prefs_mtime = mtime
            with contextlib.suppress(LmlinkError):
                self.prefer = dict(load_link_config(self.prefs_file.parent).prefer)

    def add(self, target: str, *, origin: str = "configured", path: str = "",
            fingerprint: str | None = None, name: str = "") -> Server:
        server = self.servers.get(target)
        if server is None:
            from lmlink.client.security import is_loopback_host, split_target

            host = split_target(target)[0]
            server = Server(target, origin, name=name,
                            path=path or ("loopback" if is_loopback_host(host) else "unknown"),
                            fingerprint=fingerprint)
            self.servers[target] = server
        elif path:
            server.path = path
        return server

    # ----- probing -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.discovery:
            await self._discover()
        await self.refresh()
        self._task = asyncio.ensure_future(self._run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for server in self.servers.values():
            if server.client is not None:
                with contextlib.suppress(Exception):
                    await server.client.close()

    async def refresh(self, *, only_down: bool = False, timeout: float | None = None) -> None:
        if not only_down:
            self.last_refresh = time.monotonic()
        servers = [s for s in self.servers.values() if not (only_down and s.up)]
        await asyncio.gather(*(self.probe(s, timeout) for s in servers))

    async def probe(self, server: Server, timeout: float | None = None) -> None:
        """One probe at a time per server; a second caller waits for the running one."""
        running = self._probing.get(server.target)
        if running is None or running.done():
            running = asyncio.ensure_future(self._probe(server, timeout or self.probe_timeout))
            self._probing[server.target] = running
        await asyncio.shield(running)

    async def _probe(self, server: Server, timeout: float) -> None:
        was_up = server.up
        try:
            fresh = server.client is None
            client = await self.client(server)
            if fresh:  # the first call on a new channel also connects: not the path's round trip
                await client.server_info(timeout=timeout)
            start = time.perf_counter()
            info = await client.server_info(timeout=timeout)
            latency = (time.perf_counter() - start) * 1000
            models = await client.list_models(timeout=timeout)
        except (LmlinkError, OSError) as exc:
            server.up, server.error = False, str(exc) or exc.__class__.__name__
            server.rtts.clear()  # a server that comes back is measured afresh
            server.denied = DENIALS.get(getattr(exc, "code", None), 0)  # type: ignore[arg-type]
            if server.client is not None:  # a fresh channel reconnects at once next time
                with contextlib.suppress(Exception):
                    await server.client.close()
                server.client = None
        else:
            loaded = [m for m in models if m.state == "loaded"]
            server.name = info.name or server.name
            server.rtts.append(latency)
            server.latency_ms = min(server.rtts)
            server.active, server.queued = info.active_streams, info.queued_requests
            server.models = tuple(m.id for m in loaded)
            server.aliases = {a: m.id for m in loaded for a in m.aliases}
            server.context = {m.id: m.context_length for m in loaded}
            server.up, server.error, server.denied = True, "", 0
        server.checked_at = time.time()
        if server.up != was_up:
            log.info("%s (%s) is %s%s", server.label, server.target,
                     "up" if server.up else "down", "" if server.up else f": {server.error}")
            for callback in self.changed:
                callback(self)

    async def client(self, server: Server) -> AsyncClient:
        """The (cached) gRPC client for `server`."""
        if server.client is None:
            from lmlink.client.security import channel_security

            security = await asyncio.to_thread(
                channel_security, server.target, expected_fingerprint=server.fingerprint
            )
            server.client = AsyncClient(
                server.target, credentials=security.credentials, options=security.options,
            ) if security.credentials is not None else AsyncClient(server.target)
        return server.client

    def mark_failed(self, server: Server, error: str) -> None:
        server.up, server.error, server.denied = False, error, 0
        self._wake.set()

    async def _run(self) -> None:
        last_discovery = time.monotonic()
        while True:
            interval = self.refresh_interval if any(s.up for s in self.servers.values()) else min(
                self.refresh_interval, 1.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            if self.discovery and time.monotonic() - last_discovery > self.discovery_interval:
                last_discovery = time.monotonic()
                with contextlib.suppress(Exception):
                    await self._discover()
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.error("probing servers failed")
                log.debug("probe failure", exc_info=True)

    async def _discover(self) -> None:
        from lmlink.client.discovery import adiscover

        try:
            found = await adiscover(self.discovery_timeout, include_default=True, verify=True)
        except LmlinkError as exc:
            log.info("discovery failed: %s", exc)
            return
        for ep in found.endpoints:
            if ep.usable:
                self.add(ep.target, origin="discovered", path=ep.path,
                         fingerprint=ep.fingerprint or ep.advertised_fingerprint or None,
                         name=ep.name)

    # ----- choosing ------------------------------------------------------------------------------

    def split_pin(self, model: str) -> tuple[str, Server | None]:
        """`model@server` -> (model, that server); anything else -> (model, None)."""
        name, sep, label = model.rpartition("@")
        if sep and name:
            for server in self.servers.values():
                if server.matches(label):
                    return name, server
        return model, None

    def candidates(self, model: str) -> tuple[list[Server], bool]:
        """Servers to try for `model`, best first, and whether the request is pinned to one."""
        self._reload_prefs()
        name, pinned = self.split_pin(model)
        if pinned is not None:
            if not pinned.up and pinned.denied:
                raise NoServer(pinned.denied, f"{pinned.label} ({pinned.target}) refused this "
                                              f"link's user: {pinned.error}")
            if not pinned.up:
                raise NoServer(503, f"{pinned.label} ({pinned.target}) is not reachable: "
                                    f"{pinned.error}")
            if name and pinned.model_id(name) is None:
                raise NoServer(404, f"model {name!r} is not loaded on {pinned.label}; it has "
                                    f"{', '.join(pinned.models) or 'no models'}")
            return [pinned], True
        up = [s for s in self.servers.values() if s.up]
        if not up:
            refused = [s for s in self.servers.values() if s.denied]
            if refused:
                raise NoServer(403 if any(s.denied == 403 for s in refused) else 401,
                               self.unreachable_message(refused))
            raise NoServer(503, self.unreachable_message())
        having = [s for s in up if not name or s.model_id(name) is not None]
        if not having:
            listing = "; ".join(f"{s.label}: {', '.join(s.models) or 'none'}" for s in up)
            raise NoServer(404, f"model {name!r} is not loaded on any reachable server "
                                f"({listing})")
        ordered = sorted(having, key=Server.order_key)
        preferred = self.prefer.get(name)
        if preferred:
            first = [s for s in ordered if s.matches(preferred)]
            ordered = first + [s for s in ordered if s not in first]
        return ordered, False

    def unreachable_message(self, refused: list[Server] | None = None) -> str:
        if not self.servers:
            return ("no lmlink server is known: pass --server HOST:PORT, set $LMLINK_SERVER, "
                    "or start one where discovery can find it")
        if refused:
            why = "; ".join(f"{s.label} ({s.target}): {s.error}" for s in refused)
            down = "; ".join(f"{s.label} ({s.target}): {s.error}"
                             for s in self.servers.values() if s not in refused)
            return f"refused by {why}" + (f"; not reachable: {down}" if down else "")
        tried = "; ".join(f"{s.label} ({s.target}): {s.error}" for s in self.servers.values())
        return f"no lmlink server is reachable; tried {tried}"

    def models(self) -> list[tuple[str, list[Server]]]:
        """Every loaded model on every reachable server, with the servers that have it."""
        out: dict[str, list[Server]] = {}
        for server in sorted(self.servers.values(), key=Server.order_key):
            if server.up:
                for model in server.models:
                    out.setdefault(model, []).append(server)
        return sorted(out.items())

    def status(self) -> dict[str, Any]:
        return {"servers": [s.describe() for s in self.servers.values()],
                "prefer": dict(self.prefer)}
