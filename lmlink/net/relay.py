"""The tailnet front door: accept, ask who it is, refuse strangers, pipe the rest to gRPC.

grpcio only listens on addresses, so the gRPC server listens on a private loopback port and
this relay sits in front of it, bound to the tailnet addresses (tailscaled mode) or accepting
from the embedded node's listener (tsnet mode). For every accepted connection it calls
`resolve(peer_ip, peer_port)` (LocalAPI WhoIs). Unknown peers are closed at once, before a
single byte reaches gRPC. Known peers get a fresh loopback connection to the gRPC port, and
`PeerIdentities` records "local address of that connection -> Identity", so the servicer can map
`context.peer()` ("ipv4:127.0.0.1:54321") back to the true caller.

Bytes are piped untouched: TLS runs end to end between client and gRPC server; the relay
never sees plaintext.

The server itself targets unix sockets in a private directory (`lmlink.net.inner`): each
relayed connection gets its own unguessable peer name there, so identities cannot be borrowed
by a local process (loopback TCP targets remain for tests and tools, keyed by address).
Each tailnet peer may hold at most `max_per_peer` relayed connections at once, and WhoIs runs
in its own small thread pool (`WhoIsPool`), so a flood of connections cannot starve the
process's default executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Sequence
from urllib.parse import unquote

from lmlink.access.identity import Identity
from lmlink.net.inner import InnerHop
from lmlink.net.listeners import ListenError, is_loopback, refuse_wildcard

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[Identity | None]]
CHUNK = 256 * 1024

_PEER_RE = re.compile(r"^ipv[46]:\[?(?P<host>[^\]]+?)\]?:(?P<port>\d+)$")
DEFAULT_MAX_PER_PEER = 64  # relayed connections one tailnet address may hold at once


def _addr_key(host: str, port: int) -> tuple[str, int] | None:
    """Canonical (ip, port) for a loopback address, None for anything else."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (str(ip), int(port)) if ip.is_loopback else None


class PeerIdentities:
    """Registry: exact local address (ip, port) of a relay->gRPC connection -> the caller.

    Keyed by the full address, not just the port: another local process could otherwise bind
    127.0.0.2:<same port>, dial the private gRPC port and pass for a relayed caller.
    """

    def __init__(self) -> None:
        self._by_addr: dict[tuple[str, int], Identity] = {}
        self._by_path: dict[str, Identity] = {}

    def add_path(self, path: str, identity: Identity) -> None:
        """Register a relay client socket name (see `lmlink.net.inner`)."""
        if not path.startswith("/"):
            raise ValueError("relayed unix connections have an absolute peer name")
        self._by_path[path] = identity

    def remove_path(self, path: str) -> None:
        self._by_path.pop(path, None)

    def add(self, host: str, port: int, identity: Identity) -> None:
        key = _addr_key(host, port)
        if key is None:
            raise ValueError(f"relayed connections come from loopback, not {host!r}")
        self._by_addr[key] = identity

    def remove(self, host: str, port: int) -> None:
        key = _addr_key(host, port)
        if key is not None:
            self._by_addr.pop(key, None)

    def __len__(self) -> int:
        return len(self._by_addr) + len(self._by_path)

    def lookup(self, peer: str) -> Identity | None:
        """Identity for a grpc peer string, or None (not a relayed connection: refuse it)."""
        if peer.startswith("unix:"):  # "unix:" alone: an unnamed socket, never the relay
            path = unquote(peer[5:])
            return self._by_path.get(path) if path else None
        m = _PEER_RE.match(unquote(peer))
        return self.lookup_addr(m.group("host"), int(m.group("port"))) if m else None

    def lookup_addr(self, host: str, port: int) -> Identity | None:
        """Same, for a (host, port) client address (e.g. an ASGI scope's "client")."""
        if str(host).startswith("/"):  # a unix peer name (lmlink.net.httpserver sets it)
            return self._by_path.get(str(host))
        key = _addr_key(str(host), port)
        return self._by_addr.get(key) if key is not None else None

    # Lets a PeerIdentities be passed wherever a `identify(peer)` callable is expected.
    __call__ = lookup


class _Side(Protocol):
    half_close: bool  # can it send EOF while still reading? (TCP yes, tailscale-py no)

    async def read(self) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def write_eof(self) -> None: ...
    def close(self) -> None: ...


class _StreamSide:
    """An asyncio stream pair as one side of the pipe."""

    half_close = True

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self) -> bytes:
        return await self.reader.read(CHUNK)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def write_eof(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof() and not self.writer.is_closing():
                self.writer.write_eof()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class TsnetStream(Protocol):
    """What the relay needs from a tailscale-py `TcpStream`."""

    def recv(self) -> Awaitable[bytes]: ...
    def send(self, msg: bytes) -> Awaitable[int]: ...
    def remote_addr(self) -> tuple[object, int]: ...


class TsnetListener(Protocol):
    """What the relay needs from a tailscale-py `TcpListener`."""

    def accept(self) -> Awaitable[TsnetStream]: ...


class _TsnetSide:
    """A tailscale-py TcpStream (userspace, no fd) as one side of the pipe."""

    half_close = False

    def __init__(self, stream: TsnetStream) -> None:
        self.stream: TsnetStream | None = stream

    async def read(self) -> bytes:
        if self.stream is None:
            return b""
        try:
            return bytes(await self.stream.recv())
        except (EOFError, ConnectionError, OSError, ValueError):
            return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.stream is not None:
            n = await self.stream.send(bytes(view))
            if n <= 0:
                raise ConnectionResetError("tailnet stream closed")
            view = view[n:]

    async def write_eof(self) -> None:
        return None  # tailscale-py has no half-close; close() ends the stream

    def close(self) -> None:
        # tailscale-py 0.6 TcpStream has no close(): dropping the last reference closes it
        # on the Rust side. Use close() if a later version grows one.
        stream, self.stream = self.stream, None
        closer = getattr(stream, "close", None)
        if callable(closer):
            with contextlib.suppress(Exception):
                closer()


@dataclass
class RelayStats:
    accepted: int = 0
    refused: int = 0
    active: int = 0
    over_cap: int = 0  # refused because the peer already held max_per_peer connections


class WhoIsPool:
    """WhoIs lookups in their own small, bounded thread pool (not asyncio's default one).

    A lookup blocks a thread for a LocalAPI round trip; under a connection flood the default
    executor would queue everyone else's `to_thread` work (model loads, tokenizing) behind it.
    At most `max_pending` lookups wait at once; beyond that a connection is refused (fail closed).
    """

    def __init__(self, lookup: Callable[[str, int], Identity | None], *, workers: int = 4,
                 max_pending: int = 256) -> None:
        self._lookup = lookup
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lmlink-whois")
        self._pending = 0
        self.max_pending = max_pending

    async def __call__(self, ip: str, port: int) -> Identity | None:
        if self._pending >= self.max_pending:
            raise RuntimeError("too many identity lookups in flight")
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._lookup, ip, port)
        finally:
            self._pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        self.close()


class Relay:
    """Accept -> resolve identity -> refuse or pipe to the inner (unix or loopback) server."""

    def __init__(
        self,
        target: tuple[str, int] | str,
        resolve: Resolver,
        identities: PeerIdentities | None = None,
        *,
        resolve_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        max_per_peer: int = DEFAULT_MAX_PER_PEER,
    ) -> None:
        if isinstance(target, str):  # a unix socket inside an InnerHop directory
            self.hop: InnerHop | None = InnerHop(os.path.dirname(target))
        else:
            self.hop = None
            if not is_loopback(target[0]):
                raise ListenError(f"relay target must be a loopback gRPC port, not {target[0]!r}")
        self.target = target
        self.resolve = resolve
        self.identities = identities if identities is not None else PeerIdentities()
        self.resolve_timeout = resolve_timeout
        self.connect_timeout = connect_timeout
        self.max_per_peer = max_per_peer
        self.stats = RelayStats()
        self._per_peer: Counter[str] = Counter()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.addresses: list[tuple[str, int]] = []

    @property
    def target_label(self) -> str:
        return self.target if isinstance(self.target, str) else "%s:%d" % self.target

    # -- front doors -------------------------------------------------------------------

    async def listen(self, hosts: Sequence[str], port: int) -> list[tuple[str, int]]:
        """Bind every host (IP literals, never wildcards) on `port` (0: pick one, shared)."""
        if not hosts:
            raise ListenError("relay given no address to listen on")
        hosts = [refuse_wildcard(h) for h in hosts]
        for host in hosts:
            try:
                server = await asyncio.start_server(
                    self._on_tcp, host, port, reuse_address=True, backlog=128
                )
            except OSError as e:
                await self.aclose()
                raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
            self._servers.append(server)
            bound = server.sockets[0].getsockname()
            port = bound[1]
            self.addresses.append((host, port))
        log.info("relay listening on %s -> %s",
                 ", ".join(f"{h}:{p}" for h, p in self.addresses), self.target_label)
        return list(self.addresses)

    async def serve_listener(self, listener: TsnetListener) -> None:
        """Accept from a tailscale-py listener until cancelled (tsnet mode)."""
        while True:
            stream = await listener.accept()
            ip, port = stream.remote_addr()
            self._spawn(self.handle(_TsnetSide(stream), str(ip), int(port)))
            del stream  # the handler must hold the only reference (dropping it closes)

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        task = asyncio.current_task()
        if task is not None:  # so aclose() can cut live connections too
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._other_local_user(str(peer[0]), int(peer[1]), writer.get_extra_info("sockname")):
            self.stats.refused += 1
            writer.close()
            return
        try:
            await self.handle(_StreamSide(reader, writer), str(peer[0]), int(peer[1]))
        except asyncio.CancelledError:  # aclose(): end quietly (asyncio would log it)
            writer.close()

    def _other_local_user(self, peer_ip: str, peer_port: int, sockname: Any) -> bool:
        """A process on this machine dialling our own tailnet address, run by another uid?

        WhoIs would name the node's user for it (the owner, on an untagged node), so the
        kernel's socket table decides instead: only the server's own uid passes (Linux; where
        the kernel cannot tell, WhoIs alone decides as before).
        """
        from lmlink.net import peercred

        # Loopback listeners (userspace-networking tailscaled forwards from 127.0.0.1) are
        # left to WhoIs: it knows only the connections tailscaled forwarded itself.
        own = {h for h, _ in self.addresses if not is_loopback(h)}
        if not sockname or peer_ip not in own or not peercred.supported():
            return False
        uid = peercred.tcp_peer_uid((peer_ip, peer_port), (sockname[0], sockname[1]))
        if uid == os.getuid():
            return False
        log.warning("refused %s:%d: a local process of uid %s, not the server's user",
                    peer_ip, peer_port, uid if uid is not None else "unknown")
        return True

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one connection ------------------------------------------------------------------

    async def handle(self, client: _Side, peer_ip: str, peer_port: int) -> None:
        """Resolve, then refuse or relay one accepted connection (any _Side implementation)."""
        if self._per_peer[peer_ip] >= self.max_per_peer:  # before WhoIs: cheap refusal
            self.stats.refused += 1
            self.stats.over_cap += 1
            if self.stats.over_cap == 1 or self.stats.over_cap % 1000 == 0:
                log.warning("refused %s:%d: more than %d connections from one peer (%d so far)",
                            peer_ip, peer_port, self.max_per_peer, self.stats.over_cap)
            client.close()
            return
        self._per_peer[peer_ip] += 1
        try:
            await self._handle(client, peer_ip, peer_port)
        finally:
            self._per_peer[peer_ip] -= 1
            if self._per_peer[peer_ip] <= 0:
                del self._per_peer[peer_ip]

    async def _handle(self, client: _Side, peer_ip: str, peer_port: int) -> None:
        try:
            identity = await asyncio.wait_for(self.resolve(peer_ip, peer_port), self.resolve_timeout)
        except Exception as e:  # fail closed: a broken LocalAPI admits no one
            identity = None
            log.warning("refused %s:%d: identity lookup failed (%s)", peer_ip, peer_port,
                        str(e) or type(e).__name__)
        else:
            if identity is None:
                log.warning("refused %s:%d: not a known tailnet peer", peer_ip, peer_port)
        if identity is None:
            self.stats.refused += 1
            client.close()
            return
        try:
            internal, forget = await asyncio.wait_for(self._connect(identity), self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            log.error("inner server %s unreachable (%s); dropping %s",
                      self.target_label, e, identity.label)
            client.close()
            return
        self.stats.accepted += 1
        self.stats.active += 1
        log.info("accepted %s from %s:%d", identity.label, peer_ip, peer_port)
        try:
            await _pipe(client, internal)
        finally:
            forget()
            self.stats.active -= 1
            client.close()
            internal.close()

    async def _connect(self, identity: Identity) -> tuple[_StreamSide, Callable[[], None]]:
        """Open the inner connection and register who it carries; returns (side, unregister)."""
        if self.hop is not None:
            assert isinstance(self.target, str)
            name = self.hop.client_path()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.bind(name)
                # registered before connecting: the server may read the peer at accept time
                self.identities.add_path(name, identity)
                await asyncio.get_running_loop().sock_connect(sock, self.target)
                reader, writer = await asyncio.open_unix_connection(sock=sock)
            except BaseException:
                self.identities.remove_path(name)
                sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(name)
                raise

            def forget_path() -> None:
                self.identities.remove_path(name)
                with contextlib.suppress(OSError):
                    os.unlink(name)

            return _StreamSide(reader, writer), forget_path
        reader, writer = await asyncio.open_connection(*self.target)
        local_host, local_port = writer.get_extra_info("sockname")[:2]
        tcp = writer.get_extra_info("socket")
        if tcp is not None:
            with contextlib.suppress(OSError):
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.identities.add(local_host, local_port, identity)
        return _StreamSide(reader, writer), lambda: self.identities.remove(local_host, local_port)

    async def aclose(self) -> None:
        """Stop accepting and cut every relayed connection."""
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()


async def _pump(src: _Side, dst: _Side) -> None:
    try:
        while data := await src.read():
            await dst.write(data)
    except (ConnectionError, OSError):
        pass
    finally:
        await dst.write_eof()


async def _pipe(a: _Side, b: _Side) -> None:
    """Copy both ways until both directions end; a side without half-close ends both at once."""
    tasks = [asyncio.ensure_future(_pump(a, b)), asyncio.ensure_future(_pump(b, a))]
    both = a.half_close and b.half_close
    try:
        await asyncio.wait(tasks, return_when=asyncio.ALL_COMPLETED if both else asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
