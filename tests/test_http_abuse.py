"""Issue 11 #4/#9: the HTTP bridge refuses huge and slow request heads and unenrolled devices.

Real `lmlink serve` (local mode) for the connection-abuse checks, real uvicorn with the
server's TLS material for `--require-client-cert`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

import httpx
import pytest

from conftest import start_server, stop_server
from lmlink.api.http_shell import HttpListener, bind_socket
from lmlink.net.httpserver import HEAD_TIMEOUT, uvicorn_options
from lmlink.net.tls import issue_client_cert, server_tls


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _send_huge_head(host: str, port: int, total: int) -> tuple[bytes, int]:
    """Send a request head of `total` bytes of headers; (what came back, bytes we got out)."""
    s = socket.create_connection((host, port), timeout=10)
    sent = 0
    reply = b""
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        line = b"x-pad: " + b"a" * 8000 + b"\r\n"
        while sent < total:
            try:
                s.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(line)
        s.settimeout(5)
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    finally:
        s.close()
    return reply, sent


@pytest.fixture(scope="module")
def local_server():
    srv = start_server()
    yield srv
    stop_server(srv.process)


def test_64mb_of_headers_is_refused_without_ballooning(local_server):
    host, port = local_server.http.rsplit(":", 1)
    pid = local_server.process.pid
    httpx.get(f"{local_server.http_url}/health", timeout=10).raise_for_status()
    before = _rss_kb(pid)
    reply, sent = _send_huge_head(host, int(port), 64 * 1024 * 1024)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert sent < 64 * 1024 * 1024  # the server hung up long before all 64 MB were sent
    grown_mb = (_rss_kb(pid) - before) / 1024
    assert grown_mb < 10, f"RSS grew {grown_mb:.1f} MB"
    # and the server still answers normal requests
    assert httpx.get(f"{local_server.http_url}/health", timeout=10).status_code == 200


def test_a_slow_head_is_cut(local_server):
    host, port = local_server.http.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=HEAD_TIMEOUT + 10)
    t0 = time.monotonic()
    s.sendall(b"GET /health HTTP/1.1\r\n")  # ... and never the rest (slowloris)
    data = s.recv(4096)
    elapsed = time.monotonic() - t0
    s.close()
    assert data.startswith(b"HTTP/1.1 408"), data
    assert HEAD_TIMEOUT - 1 < elapsed < HEAD_TIMEOUT + 5


async def test_require_client_cert_covers_the_http_bridge(tmp_path):
    state = tmp_path / "state"
    tls = server_tls(state, ["127.0.0.1"])
    files = tls.write_files(tmp_path / "tls")
    ca = tmp_path / "tls" / "client-ca.pem"
    ca.write_bytes(tls.client_ca_pem)

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    listener = HttpListener(ok, bind_socket("127.0.0.1", 0), files, uvicorn_options(ca))
    await listener.start()
    server_ca = tmp_path / "server.pem"
    server_ca.write_bytes(tls.cert_chain_pem)
    url = f"https://127.0.0.1:{listener.port}/"
    try:
        trust = ssl.create_default_context(cafile=str(server_ca))
        trust.check_hostname = False
        trust.verify_mode = ssl.CERT_NONE  # pinning is not what this test is about
        async with httpx.AsyncClient(verify=trust) as c:  # an unenrolled device
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                await c.get(url)
        issued = issue_client_cert(state, "laptop")
        cert, key = tmp_path / "c.pem", tmp_path / "c.key"
        cert.write_bytes(issued.cert_pem)
        key.write_bytes(issued.key_pem)
        trust.load_cert_chain(str(cert), str(key))
        async with httpx.AsyncClient(verify=trust) as c:  # the enrolled device
            assert (await c.get(url)).status_code == 200
    finally:
        await listener.stop()


def test_deeply_nested_json_is_a_400_not_a_500(local_server):
    """Found by tests/test_fuzz.py (corpus: fuzz_corpus/openai_chat/deeply-nested-array.json)."""
    for path, body in (("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000),
                       ("/v1/shortcuts/ask", b'{"a":' * 60_000 + b"1" + b"}" * 60_000)):
        r = httpx.post(local_server.http_url + path, content=body, timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, r.status_code, r.text[:200])
        assert "nested too deeply" in r.text and "Traceback" not in r.text
    assert httpx.get(f"{local_server.http_url}/health", timeout=10).status_code == 200
