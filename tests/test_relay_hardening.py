"""Issue 11 #3/#9/#11: the inner hop cannot be borrowed, relay limits, HTTP connection abuse.

Real parts: a grpc aio server and the real uvicorn `HttpListener` (with lmlink's guarded
protocol) on the inner unix sockets, the real `Relay` in front on loopback, real grpc/httpx
clients. A "local process" is modelled as direct connections to the inner sockets, from this
uid (same user) and from another uid (a forked child that drops to nobody).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lmlink.access.identity import Identity
from lmlink.api.http_shell import HttpListener, peer_string
from lmlink.net.httpserver import uvicorn_options
from lmlink.net.inner import InnerHop
from lmlink.net.relay import PeerIdentities, Relay, WhoIsPool

OWNER = Identity(login_name="owner@example.com", source="tailnet", is_owner=True)


class _WhoAmI(health.aio.HealthServicer):
    """Health.Check answering with whom PeerIdentities says the caller is (in `status`)."""

    def __init__(self, ids: PeerIdentities) -> None:
        super().__init__()
        self.ids = ids
        self.seen: list[str | None] = []

    async def Check(self, request, context):  # noqa: N802
        who = self.ids.lookup(context.peer())
        self.seen.append(who.login_name if who else None)
        status = health_pb2.HealthCheckResponse.SERVING if who else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


def _http_app(ids: PeerIdentities) -> Starlette:
    async def whoami(request: Request) -> JSONResponse:
        who = ids.lookup(peer_string(request.scope))
        return JSONResponse({"who": who.login_name if who else None})

    return Starlette(routes=[Route("/whoami", whoami)])


async def _check(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as ch:
        res = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return res.status


def _connect_as_nobody(path: str) -> str:
    """Connect to `path` from a child process running as uid nobody; its errno name or 'ok'."""
    code = (
        "import os, socket, sys\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1]); print('ok')\n"
        "except OSError as e:\n    import errno; print(errno.errorcode[e.errno])\n"
    )
    return subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                          timeout=20).stdout.strip()


async def test_inner_hop_cannot_be_borrowed_by_a_local_process(tmp_path):
    hop = InnerHop(tmp_path / "inner")
    ids = PeerIdentities()
    servicer = _WhoAmI(ids)
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(hop.grpc_target)
    await server.start()
    http = HttpListener(_http_app(ids), hop.http_socket(), None, uvicorn_options())
    await http.start()

    async def resolve(ip: str, port: int) -> Identity | None:
        return OWNER

    grpc_relay = Relay(hop.grpc_path, resolve, ids)
    http_relay = Relay(hop.http_path, resolve, ids)
    [(_, gport)] = await grpc_relay.listen(["127.0.0.1"], 0)
    [(_, hport)] = await http_relay.listen(["127.0.0.1"], 0)
    try:
        # the owner, through the relay, is known on both doors
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gport}") as owner_ch:
            stub = health_pb2_grpc.HealthStub(owner_ch)
            res = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert res.status == health_pb2.HealthCheckResponse.SERVING
            async with httpx.AsyncClient() as c:
                assert (await c.get(f"http://127.0.0.1:{hport}/whoami")).json() == \
                    {"who": "owner@example.com"}
            assert len(ids) >= 1  # the owner's relayed connection is live right now

            # no TCP port reaches the inner servers at all: only the relay's
            assert os.stat(hop.dir).st_mode & 0o777 == 0o700
            # a local process of this uid dialling the inner sockets is nobody
            assert await _check(hop.grpc_target) == health_pb2.HealthCheckResponse.NOT_SERVING
            transport = httpx.AsyncHTTPTransport(uds=hop.http_path)
            async with httpx.AsyncClient(transport=transport) as c:
                assert (await c.get("http://inner/whoami")).json() == {"who": None}
            # ... also when it names its own socket inside the directory (not a relay name)
            mine = [hop.client_path(), str(hop.dir / "c-owner")]
            for name in mine:
                s = socket.socket(socket.AF_UNIX)
                s.bind(name)
                s.connect(hop.http_path)
                s.sendall(b"GET /whoami HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                data = await asyncio.to_thread(_recv_all, s)
                assert b'{"who":null}' in data, data
            # another local user cannot even connect
            if os.geteuid() == 0:
                assert _connect_as_nobody(hop.grpc_path) == "EACCES"
                assert _connect_as_nobody(hop.http_path) == "EACCES"
        assert servicer.seen.count("owner@example.com") == 1
        assert servicer.seen.count(None) == 1
    finally:
        await grpc_relay.aclose()
        await http_relay.aclose()
        await http.stop()
        await server.stop(None)
    # every relay client name is gone once its connection ended
    await asyncio.sleep(0.1)
    assert len(ids) == 0
    left = {str(p) for p in hop.dir.iterdir() if p.name.startswith("c-")}
    assert left == set(mine)


def _recv_all(s: socket.socket) -> bytes:
    s.settimeout(5)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    finally:
        s.close()
    return out


async def test_relay_caps_connections_per_peer(tmp_path):
    hop = InnerHop(tmp_path / "inner")
    ids = PeerIdentities()
    http = HttpListener(_http_app(ids), hop.http_socket(), None, uvicorn_options())
    await http.start()

    async def resolve(ip: str, port: int) -> Identity | None:
        return OWNER

    relay = Relay(hop.http_path, resolve, ids, max_per_peer=8)
    [(_, port)] = await relay.listen(["127.0.0.1"], 0)
    held = []
    try:
        for _ in range(8):
            held.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.2)
        assert relay.stats.active == 8
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(r.read(), 5) == b""  # closed at once
        assert relay.stats.over_cap == 1
        w.close()
        # a held connection still works, and freeing one admits a new one
        r0, w0 = held.pop()
        w0.write(b"GET /whoami HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert b"owner@example.com" in await asyncio.wait_for(r0.read(), 5)
        w0.close()
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"http://127.0.0.1:{port}/whoami")).status_code == 200
    finally:
        for _, w in held:
            w.close()
        await relay.aclose()
        await http.stop()


async def test_whois_runs_in_its_own_bounded_pool():
    """A flood of slow WhoIs lookups must not occupy asyncio's default executor."""
    gate = threading.Event()
    threads: set[str] = set()

    def slow_whois(ip: str, port: int) -> Identity | None:
        threads.add(threading.current_thread().name)
        gate.wait(5)
        return None

    pool = WhoIsPool(slow_whois, workers=2, max_pending=4)
    try:
        lookups = [asyncio.ensure_future(pool("100.64.0.9", 1)) for _ in range(4)]
        await asyncio.sleep(0.1)
        with pytest.raises(RuntimeError):  # the fifth waits nowhere: refused (fail closed)
            await pool("100.64.0.9", 1)
        # the default executor is free for everyone else meanwhile
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 1.0)
        assert time.monotonic() - t0 < 1.0
        gate.set()
        assert await asyncio.gather(*lookups) == [None] * 4
        assert threads and all(t.startswith("lmlink-whois") for t in threads)
    finally:
        pool.close()




async def test_relay_refuses_other_local_users_dialling_the_node_itself(tmp_path):
    """In tailscaled mode WhoIs of the node's own IP names the owner; another uid is not.

    Runs in a network namespace of its own whose lo carries a stand-in tailnet address."""
    from support.netns import require_root
    from test_discovery_tailnet import isolated_namespace

    require_root()
    node = "100.87.0.1"
    with isolated_namespace() as ns:
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{node}/32", "dev", "lo"], check=True,
                       timeout=15)
        res = await asyncio.to_thread(
            subprocess.run, ["ip", "netns", "exec", ns, sys.executable,
                             str(Path(__file__).parent / "support" / "relay_uid_check.py"), node],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["nobody"] == "closed", report  # refused before WhoIs, nothing served
    assert report["owner"] == {"who": "owner@example.com"}  # the server's own uid still passes
    assert report["asked"] == 1 and report["refused"] == 1, report
