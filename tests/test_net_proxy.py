"""lmlink.net.proxy: which targets use the CONNECT proxy, and the CONNECT exchange itself.

The proxy here is a few lines on loopback that answers CONNECT and then echoes; it never
dials the (tailnet) address it is asked for. The real one (tailscaled's
--outbound-http-proxy-listen) is exercised in tests/test_real_tailnet_userspace.py.
"""

from __future__ import annotations

import socket
import threading

import pytest

from lmlink.net import proxy


def test_proxy_for_reads_grpc_style_env():
    env = {"grpc_proxy": "http://127.0.0.1:1056"}
    assert proxy.proxy_for("100.64.0.1", env) == ("127.0.0.1", 1056)
    assert proxy.proxy_for("127.0.0.1", env) is None  # loopback never proxied
    assert proxy.proxy_for("100.64.0.1", {**env, "no_proxy": "100.64.0.1"}) is None
    assert proxy.proxy_for("studio.tn.example", {"https_proxy": "127.0.0.1:3128",
                                                 "no_proxy": ".example"}) is None
    assert proxy.proxy_for("100.64.0.1", {"http_proxy": "127.0.0.1:3128"}) == ("127.0.0.1", 3128)
    assert proxy.proxy_for("100.64.0.1", {}) is None
    with pytest.raises(proxy.ProxyError, match="only http://"):
        proxy.proxy_for("100.64.0.1", {"grpc_proxy": "socks5://127.0.0.1:1055"})


def fake_proxy(answer: bytes) -> tuple[int, list[bytes]]:
    srv = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(1024)
            seen.append(head)
            conn.sendall(answer)
            if answer.startswith(b"HTTP/1.1 200"):
                conn.sendall(conn.recv(1024))  # echo one message
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1], seen


def test_connect_through_proxy(monkeypatch):
    port, seen = fake_proxy(b"HTTP/1.1 200 Connection established\r\n\r\n")
    monkeypatch.setenv("grpc_proxy", f"http://127.0.0.1:{port}")
    with proxy.create_connection(("100.64.0.9", 47470), timeout=5) as sock:
        sock.sendall(b"ping")
        assert sock.recv(16) == b"ping"
    assert seen[0].startswith(b"CONNECT 100.64.0.9:47470 HTTP/1.1\r\n")


def test_connect_refused_is_one_clear_error(monkeypatch):
    port, _ = fake_proxy(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
    monkeypatch.setenv("grpc_proxy", f"http://127.0.0.1:{port}")
    with pytest.raises(proxy.ProxyError, match="refused CONNECT 100.64.0.9:47470: HTTP/1.1 502"):
        proxy.create_connection(("100.64.0.9", 47470), timeout=5)
