"""The relay in front of lmlink's real gRPC service on loopback (the in-process engine behind
it): refusal, identity carry-over to the servicer's policy checks, the tsnet path."""

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
from lmlink.access.gate import PolicyGate
from support.inprocess import GrpcService, generate, model_ids, whoami

MODEL = "lmlink-tiny"  # the built-in model the in-process engine serves
MATE = Identity(login_name="mate@example.com", source="tailnet", node_name="mate.ts.net",
                capabilities={CAPABILITY: [{"models": [MODEL]}]})
BOB = Identity(login_name="bob@example.com", source="tailnet", node_name="bob.ts.net",
               capabilities={CAPABILITY: [{"models": ["qwen-*"]}]})


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
            assert (await whoami(ch)).login_name == "mate@example.com"
            relayed_port = int(backend.service.peers[-1].rsplit(":", 1)[1])
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
                code = await _code(bad)
            fwd.close()
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert f"ipv4:127.0.0.2:{relayed_port}" in backend.service.peers
    finally:
        await relay.aclose()


async def _code(ch):
    try:
        await whoami(ch)
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
    """lmlink's real TLS gRPC service on a loopback port: the relay's private target. Its gate
    knows callers only through the relay's PeerIdentities, as in `lmlink serve`."""

    def __init__(self, tmp_path, engine) -> None:
        self.tls = server_tls(tmp_path / "state", ["127.0.0.1", "studio.ts.net"])
        self.identities = PeerIdentities()
        self.service = GrpcService(engine, PolicyGate(self.identities.lookup),
                                   server_credentials(self.tls))
        self.port = self.service.port

    def channel(self, port: int) -> grpc.aio.Channel:
        creds, opts = pinned_credentials(self.tls.cert_chain_pem)
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=opts)


async def denied(ch, model: str) -> tuple[grpc.StatusCode, str]:
    """Generate expecting failure; returns (code, the model if the details name it).

    try/except rather than pytest.raises: a kept traceback would keep the failed call, and
    with it grpc's client transport, alive after the channel closes.
    """
    try:
        await generate(ch, model)
    except grpc.aio.AioRpcError as e:
        return e.code(), model if model in (e.details() or "") else e.details()
    raise AssertionError("call unexpectedly succeeded")


@pytest.fixture
async def backend(tmp_path, engine):
    b = Backend(tmp_path, engine)
    async with b.service:
        yield b


async def test_identity_carried_to_servicer(backend):
    lookups: list[tuple[str, int]] = []
    who = {"as": MATE}

    async def resolve(ip: str, port: int) -> Identity | None:
        lookups.append((ip, port))
        return who["as"] if ip == "127.0.0.1" else None

    relay = Relay(("127.0.0.1", backend.port), resolve, backend.identities)
    [(host, port)] = await relay.listen(["127.0.0.1"], 0)
    try:
        assert host == "127.0.0.1" and port != backend.port
        async with backend.channel(port) as ch:
            me = await whoami(ch)
            assert (me.login_name, me.node_name, me.source) == (
                "mate@example.com", "mate.ts.net", "tailnet")
            assert me.is_owner is False
            # the servicer saw the relay's loopback connection, and mapped it back
            assert backend.service.peers[-1].startswith("ipv4:127.0.0.1:")
            assert len(backend.identities) == 1
            assert await model_ids(ch) == [MODEL]  # mate's grant names it
            assert await generate(ch, MODEL) == 4
        # the next connection is bob's, granted only other models: the servicer says no
        who["as"] = BOB
        async with backend.channel(port) as ch:
            assert (await whoami(ch)).login_name == "bob@example.com"
            assert await model_ids(ch) == []
            assert await denied(ch, MODEL) == (grpc.StatusCode.PERMISSION_DENIED, MODEL)
        assert lookups and lookups[0][0] == "127.0.0.1"
        for _ in range(100):  # the registry entry goes away with the connection
            if len(backend.identities) == 0:
                break
            await asyncio.sleep(0.02)
        assert len(backend.identities) == 0
        assert relay.stats.accepted == 2 and relay.stats.refused == 0
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
                    await whoami(ch, timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert relay.stats.refused >= 1 and relay.stats.accepted == 0
        assert backend.service.peers == []  # nothing ever reached the servicer
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
                await whoami(ch, timeout=3)
        assert relay.stats.refused >= 1 and backend.service.peers == []
    finally:
        await relay.aclose()


async def test_direct_connection_to_internal_port_has_no_identity(backend):
    async with backend.channel(backend.port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await whoami(ch)
        with pytest.raises(grpc.aio.AioRpcError) as gen_err:
            await generate(ch, MODEL)
    assert err.value.code() == gen_err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert backend.service.peers  # it reached the servicer, which found no identity


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
            me = await whoami(ch)
            assert me.login_name == "mate@example.com"
            assert await model_ids(ch) == [MODEL]
            assert await generate(ch, MODEL, max_tokens=300) == 300  # many partial sends
        assert seen[0] == ("100.87.0.2", 40000)
        listener.remote = (ip_address("100.87.0.9"), 40001)  # an unknown tailnet node
        async with backend.channel(port) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await whoami(ch, timeout=3)
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
