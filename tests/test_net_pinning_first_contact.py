"""Fetching a server's certificate on first contact over a tailnet.

The first connection to a peer that has just joined often loses WireGuard's first handshake
initiation; WireGuard retries only after 5 s, so the TLS handshake starts a little over 5 s
late (seen on the real tailnet test bed: `lmlink status` to a fresh `--listen tsnet` server
failed with "cannot fetch the TLS certificate ...: timed out" at the old fixed 5 s bound). The
stand-in server here accepts TCP at once, as the kernel does, but answers TLS only after a delay.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

from lmlink.net.pinning import FETCH_TIMEOUT, PinningError, fetch_server_certificate
from lmlink.net.tls import fingerprint, server_tls


def late_tls_server(tmp_path, delay: float) -> tuple[int, str, threading.Event]:
    """A TLS listener on loopback that starts each handshake `delay` seconds after accepting."""
    tls = server_tls(tmp_path / "srv", ["127.0.0.1"])
    cert, key = tls.write_files(tmp_path / "run")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    lsock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        with lsock:
            conn, _ = lsock.accept()
            stop.wait(delay)  # the lost WireGuard handshake, as the client sees it
            try:
                with ctx.wrap_socket(conn, server_side=True) as s:
                    s.recv(1)
            except OSError:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return lsock.getsockname()[1], tls.fingerprint, stop


def test_first_contact_after_a_lost_handshake_still_fetches(tmp_path):
    assert FETCH_TIMEOUT > 2 * 5.0  # WireGuard's REKEY_TIMEOUT, retried once, with room to spare
    port, fp, stop = late_tls_server(tmp_path, 5.5)
    t0 = time.monotonic()
    try:
        pem = fetch_server_certificate("127.0.0.1", port)
    finally:
        stop.set()
    assert fingerprint(pem) == fp
    assert 5.4 < time.monotonic() - t0 < FETCH_TIMEOUT


def test_timeout_bounds_the_whole_fetch(tmp_path):
    port, _, stop = late_tls_server(tmp_path, 30)
    t0 = time.monotonic()
    try:
        with pytest.raises(PinningError, match="cannot fetch the TLS certificate of 127.0.0.1:.*timed out"):
            fetch_server_certificate("127.0.0.1", port, timeout=1.0)
    finally:
        stop.set()
    assert 0.9 < time.monotonic() - t0 < 4.0


def test_a_client_deadline_bounds_the_certificate_fetch(tmp_path, monkeypatch):
    """`lmlink status --timeout 3` gives up after 3 s, not after the 12 s first-contact bound."""
    from lmlink.client import Client, Unavailable

    monkeypatch.setenv("LMLINK_CONFIG_DIR", str(tmp_path / "cfg"))
    port, _, stop = late_tls_server(tmp_path, 30)
    t0 = time.monotonic()
    try:
        with pytest.raises(Unavailable, match="cannot reach lmlink server.*timed out"):
            Client(f"127.0.0.1:{port}", tls=True, timeout=1.0)
    finally:
        stop.set()
    assert 0.9 < time.monotonic() - t0 < 4.0


def test_a_server_not_routed_yet_is_retried_within_the_deadline(tmp_path, monkeypatch):
    """Seen on the real tailnet: a client whose netmap does not list a just-joined server yet
    gets "Network is unreachable" from its kernel; the fetch tries again until the route
    appears (here: the first two connects are unroutable), and gives up at its deadline."""
    import errno

    from lmlink.net import proxy

    port, fp, stop = late_tls_server(tmp_path, 0)
    real = proxy.create_connection
    calls: list[float] = []

    def unroutable_at_first(address, timeout=None, source_address=None):
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
        return real(address, timeout=timeout, source_address=source_address)

    monkeypatch.setattr(proxy, "create_connection", unroutable_at_first)
    try:
        assert fingerprint(fetch_server_certificate("127.0.0.1", port)) == fp
    finally:
        stop.set()
    assert len(calls) == 3
    calls.clear()
    monkeypatch.setattr(proxy, "create_connection",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENETUNREACH, "unreachable")))
    t0 = time.monotonic()
    with pytest.raises(PinningError, match="unreachable"):
        fetch_server_certificate("127.0.0.1", 1, timeout=1.0)
    assert 0.7 < time.monotonic() - t0 < 2.0
