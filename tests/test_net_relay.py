"""The relay in front of a real grpc aio server on loopback: refusal, identity carry-over, tsnet path."""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc
import pytest

from lmlink.access.identity import Identity
from lmlink.access.policy import CAPABILITY
from lmlink.net.listeners import ListenError, wildcard_listeners
from lmlink.net.pinning import pinned_credentials
from lmlink.net.relay import PeerIdentities, Relay
from lmlink.net.tls import server_credentials, server_tls
from support.probe_service import Probe, call

MATE = Identity(login_name="mate@example.com", source="tailnet", node_name="mate.ts.net",
                capabilities={CAPABILITY: [{"models": ["tiny"]}]})


def test_peer_string_parsing():
    ids = PeerIdentities()
    ids.add("127.0.0.1", 54321, MATE)
    assert ids.lookup("ipv4:127.0.0.1:54321") is MATE
    assert ids.lookup("ipv6:[::ffff:127.0.0.1]:54321") is MATE  # dual-stack form
    assert ids("ipv4:127.0.0.1:54321") is MATE  # usable as an identify callable
    assert ids.lookup_addr("127.0.0.1", 54321) is MATE  # ASGI-style (host, port)
    assert ids.lookup("ipv4:127.0.0.1:54322") is None
    # same port from another loopback address: a local process, not the relay
    assert ids.lookup("ipv4:127.0.0.2:54321") is None
    assert ids.lookup("ipv6:[::1]:54321") is None
    assert ids.lookup("ipv4:100.87.0.2:54321") is None
    assert ids.lookup("unix:/tmp/x") is None and ids.lookup("garbage") is None
    ids.add("::1", 4000, MATE)
    assert ids.lookup("ipv6:[::1]:4000") is MATE and ids.lookup("ipv6:%5B::1%5D:4000") is MATE
    with pytest.raises(ValueError):
        ids.add("100.87.0.2", 1, MATE)
    ids.remove("127.0.0.1", 54321)
    ids.remove("::1", 4000)
    assert ids.lookup("ipv4:127.0.0.1:54321") is None and len(ids) == 0


async def test_same_port_from_other_loopback_address_is_not_the_caller(backend):
    """A local process dialing the private port from 127.0.0.2:<relayed port> gets nothing."""
    async def resolve(ip: str, port: int) -> Identity | None:
        return MATE

    relay = Relay(("127.0.0.1", backend.port), resolve, backend.identities)
    [(_, port)] = await relay.listen(["127.0.0.1"], 0)
    try:
        async with backend.channel(port) as ch:
            me = await call(ch, "WhoAmI")
            relayed_port = int(me["peer"].rsplit(":", 1)[1])
            creds, opts = pinned_credentials(backend.tls.cert_chain_pem)
            spoof = socket.socket()
            spoof.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            spoof.bind(("127.0.0.2", relayed_port))
            spoof.connect(("127.0.0.1", backend.port))
            # hand the connected socket to a throwaway forwarder so grpc can use it
            fwd = await asyncio.start_server(
                lambda r, w: _splice(r, w, spoof), "127.0.0.1", 0)
            fport = fwd.sockets[0].getsockname()[1]
            async with grpc.aio.secure_channel(f"127.0.0.1:{fport}", creds, options=opts) as bad:
                code = await _code(bad, "WhoAmI")
            fwd.close()
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert f"ipv4:127.0.0.2:{relayed_port}" in backend.probe.peers
    finally:
        await relay.aclose()


async def _code(ch, method):
    try:
        await call(ch, method)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def _splice(reader, writer, sock):
    r2, w2 = await asyncio.open_connection(sock=sock)

    async def pump(src, dst):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        dst.close()

    await asyncio.gather(pump(reader, w2), pump(r2, writer), return_exceptions=True)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "[::]", "localhost-ish-name"])
async def test_relay_refuses_wildcards_and_names(host):
    relay = Relay(("127.0.0.1", 1), resolve=lambda ip, port: None)
    with pytest.raises(ListenError):
        await relay.listen([host], 0)


def test_relay_target_must_be_loopback():
    with pytest.raises(ListenError, match="loopback"):
        Relay(("100.87.0.1", 47470), resolve=lambda ip, port: None)


class Backend:
    """A real TLS grpc aio server on a loopback port: the relay's private target."""

    def __init__(self, tmp_path, identities: PeerIdentities) -> None:
        self.tls = server_tls(tmp_path / "state", ["127.0.0.1", "studio.ts.net"])
        self.probe = Probe(identities.lookup)
        self.server = grpc.aio.server()
        self.probe.add_to(self.server)
        self.port = self.server.add_secure_port("127.0.0.1:0", server_credentials(self.tls))

    def channel(self, port: int) -> grpc.aio.Channel:
        creds, opts = pinned_credentials(self.tls.cert_chain_pem)
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=opts)


async def denied(ch, method: str, body: dict) -> tuple[grpc.StatusCode, str]:
    """Call expecting failure; returns (code, the part of details naming the model).

    try/except rather than pytest.raises: a kept traceback would keep the failed call, and
    with it grpc's client transport, alive after the channel closes.
    """
    try:
        await call(ch, method, body)
    except grpc.aio.AioRpcError as e:
        return e.code(), body["model"] if body["model"] in (e.details() or "") else e.details()
    raise AssertionError("call unexpectedly succeeded")


@pytest.fixture
async def backend(tmp_path):
    ids = PeerIdentities()
    b = Backend(tmp_path, ids)
    b.identities = ids
    await b.server.start()
    yield b
    await b.server.stop(None)


async def test_identity_carried_to_servicer(backend):
    lookups: list[tuple[str, int]] = []

    async def resolve(ip: str, port: int) -> Identity | None:
        lookups.append((ip, port))
        return MATE if ip == "127.0.0.1" else None

    relay = Relay(("127.0.0.1", backend.port), resolve, backend.identities)
    [(host, port)] = await relay.listen(["127.0.0.1"], 0)
    try:
        assert host == "127.0.0.1" and port != backend.port
        async with backend.channel(port) as ch:
            me = await call(ch, "WhoAmI")
            assert me["login_name"] == "mate@example.com" and me["node_name"] == "mate.ts.net"
            # the servicer saw the relay's loopback connection, and mapped it back
            assert me["peer"].startswith("ipv4:127.0.0.1:")
            assert len(backend.identities) == 1
            assert await call(ch, "ListModels") == ["tiny"]
            assert (await call(ch, "Generate", {"model": "tiny"}))["text"] == "ok"
            assert await denied(ch, "Generate", {"model": "kimi-k2"}) == (
                grpc.StatusCode.PERMISSION_DENIED, "kimi-k2")
        assert lookups and lookups[0][0] == "127.0.0.1"
        for _ in range(100):  # the registry entry goes away with the connection
            if len(backend.identities) == 0:
                break
            await asyncio.sleep(0.02)
        assert len(backend.identities) == 0
        assert relay.stats.accepted == 1 and relay.stats.refused == 0
        assert wildcard_listeners(ports=[port, backend.port]) == []
    finally:
        await relay.aclose()


async def test_unknown_peer_refused_at_connect(backend, caplog):
    async def resolve(ip: str, port: int) -> Identity | None:
        return None

    relay = Relay(("127.0.0.1", backend.port), resolve, backend.identities)
    [(_, port)] = await relay.listen(["127.0.0.1"], 0)
    try:
        with caplog.at_level(logging.WARNING, logger="lmlink.net.relay"):
            async with backend.channel(port) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(ch, "WhoAmI", timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert relay.stats.refused >= 1 and relay.stats.accepted == 0
        assert backend.probe.calls == 0  # nothing ever reached gRPC
        assert "not a known tailnet peer" in caplog.text
    finally:
        await relay.aclose()


async def test_broken_resolver_fails_closed(backend):
    async def resolve(ip: str, port: int) -> Identity | None:
        raise RuntimeError("LocalAPI down")

    relay = Relay(("127.0.0.1", backend.port), resolve, backend.identities)
    [(_, port)] = await relay.listen(["127.0.0.1"], 0)
    try:
        async with backend.channel(port) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await call(ch, "WhoAmI", timeout=3)
        assert relay.stats.refused >= 1 and backend.probe.calls == 0
    finally:
        await relay.aclose()


async def test_direct_connection_to_internal_port_has_no_identity(backend):
    async with backend.channel(backend.port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(ch, "WhoAmI")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_raw_refusal_closes_before_any_byte(backend):
    """At the TCP level: an unknown peer's connection is closed, and nothing is read back."""
    relay = Relay(("127.0.0.1", backend.port), lambda ip, port: _none(), backend.identities)
    [(_, port)] = await relay.listen(["127.0.0.1"], 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x16\x03\x01\x00\x05hello")
        data = await asyncio.wait_for(reader.read(100), 3)
        assert data == b""
        writer.close()
    finally:
        await relay.aclose()


async def _none() -> None:
    return None


# -- tsnet: the same relay, fed from a tailscale-py style listener -------------------------


class FakeTsnetStream:
    """Mimics tailscale-py's TcpStream (recv/send/remote_addr, no fd) over a real socket."""

    def __init__(self, reader, writer, remote):
        self.reader, self.writer, self.remote = reader, writer, remote

    async def recv(self) -> bytes:
        data = await self.reader.read(65536)
        if not data:
            raise ConnectionResetError("closed")
        return data

    async def send(self, msg: bytes) -> int:
        n = min(len(msg), 1000)  # partial sends, like a userspace stack may do
        self.writer.write(msg[:n])
        await self.writer.drain()
        return n

    def remote_addr(self):
        return self.remote

    def close(self) -> None:  # what dropping a real TcpStream does
        self.writer.close()


class FakeTsnetListener:
    def __init__(self, remote):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.remote = remote

    async def accept(self):
        return await self.queue.get()

    async def feed(self, reader, writer):
        await self.queue.put(FakeTsnetStream(reader, writer, self.remote))


async def test_relay_serves_tsnet_style_listener(backend):
    from ipaddress import ip_address

    seen = []

    async def resolve(ip: str, port: int):
        seen.append((ip, port))
        return MATE if ip == "100.87.0.2" else None

    relay = Relay(("127.0.0.1", backend.port), resolve, backend.identities)
    listener = FakeTsnetListener((ip_address("100.87.0.2"), 40000))
    # a loopback socket stands in for the tailnet side; its accepted streams go to the fake listener
    entry = await asyncio.start_server(listener.feed, "127.0.0.1", 0)
    port = entry.sockets[0].getsockname()[1]
    task = asyncio.create_task(relay.serve_listener(listener))
    try:
        async with backend.channel(port) as ch:
            me = await call(ch, "WhoAmI")
            assert me["login_name"] == "mate@example.com"
            big = await call(ch, "ListModels")
            assert big == ["tiny"]
        assert seen[0] == ("100.87.0.2", 40000)
        listener.remote = (ip_address("100.87.0.9"), 40001)  # an unknown tailnet node
        async with backend.channel(port) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await call(ch, "WhoAmI", timeout=3)
        assert relay.stats.refused >= 1
    finally:
        task.cancel()
        entry.close()
        await relay.aclose()


async def test_relay_binds_each_host_on_one_port(backend):
    relay = Relay(("127.0.0.1", backend.port), lambda ip, port: _none(), backend.identities)
    try:
        addrs = await relay.listen(["127.0.0.1", "127.0.0.2"], 0)
        assert [h for h, _ in addrs] == ["127.0.0.1", "127.0.0.2"]
        assert addrs[0][1] == addrs[1][1]
        s = socket.create_connection(("127.0.0.2", addrs[0][1]), timeout=2)
        s.close()
    finally:
        await relay.aclose()
