"""Which local user is on the other end of a loopback connection (Linux: /proc, SO_PEERCRED).

Loopback is reachable by every user of the machine, so "came from 127.0.0.1" does not mean
"is the owner". The kernel knows the uid of every socket: /proc/net/tcp{,6} lists it for TCP
(the `uid` column of the *client's* socket), SO_PEERCRED gives it for unix sockets. Elsewhere
(macOS) these return None and callers decide what None means (lmlink: not the owner).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct
import sys
import time
from urllib.parse import unquote

_LISTEN, _ESTABLISHED = "0A", "01"


def _decode(hex_addr: str) -> tuple[str, int]:
    addr_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(addr_hex)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port_hex, 16)


def _norm(host: str) -> str:
    ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _rows(proc: str = "/proc/net") -> list[tuple[tuple[str, int], tuple[str, int], str, int]]:
    """(local, remote, state, uid) for every TCP socket in this network namespace."""
    out = []
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/{name}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8:
                continue
            out.append((_decode(fields[1]), _decode(fields[2]), fields[3], int(fields[7])))
    return out


def supported() -> bool:
    return sys.platform.startswith("linux") and os.path.exists("/proc/net/tcp")


def tcp_peer_uid(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """uid owning the client end of the TCP connection client -> server (both as we see them).

    Matches the full 4-tuple, so a socket of another user that happens to use the same source
    port towards a different destination is not confused with it. None if not found/unsupported.
    """
    if not supported():
        return None
    c = (_norm(client[0]), int(client[1]))
    s = (_norm(server[0]), int(server[1]))
    for local, remote, state, uid in _rows():
        if local == c and remote == s and state == _ESTABLISHED:
            return uid
    return None


def listener_uid(host: str, port: int) -> int | None:
    """uid owning the TCP socket listening on host:port (or on a wildcard, same port)."""
    if not supported():
        return None
    want = _norm(host)
    for local, _remote, state, uid in _rows():
        if state == _LISTEN and local[1] == port and local[0] in (want, "0.0.0.0", "::"):
            return uid
    return None


def unix_peer_uid(sock: socket.socket) -> int | None:
    """SO_PEERCRED of a connected unix socket (Linux); None elsewhere."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return struct.unpack("3i", creds)[1]


# -- local mode: who on this machine is calling ---------------------------------------------

_PEER_RE = re.compile(r"^ipv[46]:\[?(?P<host>[^\]]+?)\]?:(?P<port>\d+)$")
_PORTS_TTL = 2.0
_our_ports: tuple[float, frozenset[int]] = (0.0, frozenset())


def _own_listening_ports() -> frozenset[int]:
    """TCP ports this process listens on (cached briefly: servers rarely add ports)."""
    global _our_ports
    now = time.monotonic()
    if now - _our_ports[0] > _PORTS_TTL:
        from lmlink.net.listeners import listening_sockets

        try:
            ports = frozenset(s.port for s in listening_sockets(os.getpid()))
        except OSError:
            ports = frozenset()
        _our_ports = (now, ports)
    return _our_ports[1]


def loopback_caller_uid(peer: str) -> int | None:
    """uid of the local process behind a loopback grpc-style peer ("ipv4:127.0.0.1:54321").

    Finds the client's socket by its full 4-tuple towards one of this process's listening
    ports; None when unsupported (not Linux) or not found.
    """
    m = _PEER_RE.match(unquote(peer))
    if m is None or not supported():
        return None
    client = (_norm(m.group("host")), int(m.group("port")))
    ports = _own_listening_ports()
    for local, remote, state, uid in _rows():
        if local == client and state == _ESTABLISHED and remote[1] in ports:
            return uid
    return None
