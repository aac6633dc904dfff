"""Reach tailnet servers through an HTTP CONNECT proxy (userspace-networking tailscaled).

A device whose tailscaled runs with `--tun=userspace-networking` has no route to tailnet
addresses; tailscaled offers `--outbound-http-proxy-listen=127.0.0.1:PORT` (and a SOCKS5
server) instead. gRPC already honours `grpc_proxy` / `https_proxy` / `http_proxy` (and
`no_grpc_proxy` / `no_proxy`) for HTTP CONNECT; this module applies the same variables to the
few raw sockets lmlink opens itself (fetching a server certificate to pin it), so every
client path goes through the same proxy. Loopback targets never use a proxy.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Mapping
from urllib.parse import urlsplit

PROXY_VARS = ("grpc_proxy", "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")
NO_PROXY_VARS = ("no_grpc_proxy", "no_proxy", "NO_PROXY")


class ProxyError(OSError):
    """The proxy refused or broke the CONNECT; one-line reason."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def proxy_for(host: str, env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """(proxy host, port) to reach `host` through, or None for a direct connection."""
    env = os.environ if env is None else env
    if _is_loopback(host):
        return None
    for var in NO_PROXY_VARS:
        for entry in (env.get(var) or "").split(","):
            entry = entry.strip().lstrip(".")
            if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
                return None
    for var in PROXY_VARS:
        value = (env.get(var) or "").strip()
        if value:
            url = urlsplit(value if "://" in value else f"http://{value}")
            if url.scheme not in ("http", "") or not url.hostname:
                raise ProxyError(f"{var}={value!r}: only http:// CONNECT proxies are supported")
            return url.hostname, url.port or 80
    return None


def create_connection(address: tuple[str, int], timeout: float | None = None,
                      source_address: tuple[str, int] | None = None) -> socket.socket:
    """socket.create_connection, through the configured CONNECT proxy when there is one."""
    host, port = address
    proxy = proxy_for(host)
    if proxy is None:
        return socket.create_connection(address, timeout=timeout, source_address=source_address)
    sock = socket.create_connection(proxy, timeout=timeout)
    try:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)  # byte by byte: nothing after the header may be consumed
            if not chunk:
                raise ProxyError(f"proxy {proxy[0]}:{proxy[1]} closed during CONNECT {target}")
            head += chunk
            if len(head) > 16384:
                raise ProxyError(f"proxy {proxy[0]}:{proxy[1]}: oversized CONNECT answer")
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        parts = status.split()
        if len(parts) < 2 or parts[1] != "200":
            raise ProxyError(f"proxy {proxy[0]}:{proxy[1]} refused CONNECT {target}: {status}")
    except BaseException:
        sock.close()
        raise
    return sock
