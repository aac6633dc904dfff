"""The inner hop: where the relay hands authenticated connections to the gRPC/HTTP servers.

In tailnet modes the real servers must be reachable only through the relay, and they must
learn which caller each relayed connection carries. Loopback TCP gives neither: any local
process can dial a loopback port, and (127.0.0.1, source port) is not unique across
destinations, so a local process could be attributed a relayed caller's identity.

So the inner servers listen on unix sockets inside a private 0700 directory (other local users
cannot even reach them), and the relay binds each of its client sockets to a fresh random name
in that same directory before connecting. The servers see that name as the peer
(grpc: "unix:/dir/c-<hex>", uvicorn: the socket's peer path) and `PeerIdentities` maps it back
to the caller. A connection that did not come from the relay has an unnamed peer ("unix:") or a
name the relay never registered, and gets no identity.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from lmlink.net.files import private_dir

GRPC_SOCKET = "grpc.sock"
HTTP_SOCKET = "http.sock"
_MAX_UNIX_PATH = 100  # sun_path is 104 (macOS) / 108 (Linux) bytes, keep a margin


class InnerHop:
    """A private directory holding the inner servers' sockets and the relay's client names."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = private_dir(Path(directory))
        if len(str(self.client_path())) > _MAX_UNIX_PATH:
            raise ValueError(f"inner socket directory path too long for a unix socket: {self.dir}")

    @property
    def grpc_path(self) -> str:
        return str(self.dir / GRPC_SOCKET)

    @property
    def grpc_target(self) -> str:
        """What grpc's add_secure_port takes."""
        return f"unix:{self.grpc_path}"

    @property
    def http_path(self) -> str:
        return str(self.dir / HTTP_SOCKET)

    def http_socket(self) -> socket.socket:
        """A bound (not yet listening) unix socket for the HTTP server, mode 0600."""
        return bind_unix(self.http_path)

    def client_path(self) -> str:
        """A fresh, unguessable name for one relay->server connection."""
        return str(self.dir / f"c-{secrets.token_hex(8)}")

    def owns(self, path: str) -> bool:
        """Is `path` a relay client name in this directory?"""
        return os.path.dirname(path) == str(self.dir) and os.path.basename(path).startswith("c-")


def bind_unix(path: str) -> socket.socket:
    """A unix stream socket bound at `path` (stale file replaced), readable by us only."""
    with_stale = Path(path)
    if with_stale.is_socket():
        with_stale.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o077)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
    except OSError:
        sock.close()
        raise
    return sock


def unix_peer_path(sock: socket.socket | None) -> str | None:
    """The peer's bound name of a unix socket connection ("" or None when unnamed)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        name = sock.getpeername()
    except OSError:
        return None
    if isinstance(name, bytes):  # abstract names: never ours
        return None
    return name or None
