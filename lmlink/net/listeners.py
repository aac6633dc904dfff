"""Listen modes -> concrete bind addresses, and a runtime check that nothing listens on a wildcard.

- `local`: loopback only; any other host is refused with a clear error.
- `tailscaled`: exactly this node's tailnet IPs, read from LocalAPI status; never 0.0.0.0/::.
- `tsnet`: the embedded node's own addresses (see `lmlink.net.tsnet`); nothing on the host stack.

In every tailnet mode the gRPC server itself listens on loopback only (its "internal" port)
behind `lmlink.net.relay.Relay`, which is what binds the addresses returned here.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal, Sequence

if TYPE_CHECKING:
    from lmlink.net.localapi import LocalAPI

ListenMode = Literal["local", "tailscaled", "tsnet"]
LISTEN_MODES: tuple[ListenMode, ...] = ("local", "tailscaled", "tsnet")
DEFAULT_LOCAL_HOSTS: tuple[str, ...] = ("127.0.0.1",)


class ListenError(ValueError):
    """A listen configuration that would expose more than it should; one-line reason."""


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def is_wildcard(host: str) -> bool:
    """'', '0.0.0.0', '::' and friends: addresses that mean every interface."""
    if host.strip("[]") in ("", "*"):
        return True
    ip = _ip(host)
    return ip is not None and ip.is_unspecified


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and 'localhost' (which we resolve to 127.0.0.1 ourselves)."""
    if host == "localhost":
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def refuse_wildcard(host: str) -> str:
    """Return `host` unchanged, or raise if it is a wildcard or not an IP literal."""
    if is_wildcard(host):
        raise ListenError(f"refusing to listen on {host or '(empty)'}: lmlink never binds a wildcard address")
    if _ip(host) is None:
        raise ListenError(f"refusing to listen on {host!r}: give an IP address, not a name")
    return str(_ip(host))


def local_bind_hosts(hosts: Sequence[str] | None = None) -> list[str]:
    """`local` mode: the loopback hosts to bind (default 127.0.0.1); anything else is refused."""
    out: list[str] = []
    for h in hosts or DEFAULT_LOCAL_HOSTS:
        if h == "localhost":
            h = "127.0.0.1"
        if not is_loopback(h):
            raise ListenError(
                f"local mode listens on loopback only; refusing {h!r} "
                "(use --listen tailscaled or tsnet to serve other devices, over the tailnet)"
            )
        h = refuse_wildcard(h)
        if h not in out:
            out.append(h)
    return out


def tailscaled_bind_hosts(localapi: LocalAPI, *, ipv6: bool = True) -> list[str]:
    """`tailscaled` mode: this node's tailnet IPs from LocalAPI status (IPv4 first).

    Userspace-networking tailscaled (`--tun=userspace-networking`, reported by LocalAPI as
    TUN false) has no tailnet address on any interface; it forwards incoming tailnet
    connections to 127.0.0.1:<same port>, so there the answer is loopback. Loopback callers
    are then identified only by WhoIs on the forwarded address (lmlink.net.localapi), never
    trusted as local.
    """
    if userspace_mode(localapi):
        return ["127.0.0.1"]
    return tailnet_ips(localapi, ipv6=ipv6)


def userspace_mode(localapi: LocalAPI) -> bool:
    """True when this node's tailscaled runs without a TUN device (userspace networking)."""
    return not localapi.self_node(refresh=False).tun


def tailnet_ips(localapi: LocalAPI, *, ipv6: bool = True) -> list[str]:
    """This node's tailnet addresses (what clients dial), IPv4 first; never loopback/wildcard."""
    me = localapi.self_node()
    hosts = [refuse_wildcard(ip) for ip in me.tailscale_ips]
    if not ipv6:
        hosts = [h for h in hosts if ":" not in h]
    for h in hosts:
        if is_loopback(h):
            raise ListenError(f"LocalAPI reports a loopback tailnet address {h!r}; refusing")
    if not hosts:
        raise ListenError("Tailscale reports no tailnet address for this node; is it logged in?")
    return sorted(hosts, key=lambda h: ":" in h)


def bind_hosts(mode: str, *, localapi: LocalAPI | None = None,
               hosts: Sequence[str] | None = None) -> list[str]:
    """The addresses to bind for a listen mode (tsnet binds on its own node: none here)."""
    if mode == "local":
        return local_bind_hosts(hosts)
    if hosts:
        raise ListenError(f"--listen {mode} picks its own addresses; do not give hosts")
    if mode == "tailscaled":
        if localapi is None:
            raise ListenError("tailscaled mode needs the LocalAPI")
        return tailscaled_bind_hosts(localapi)
    if mode == "tsnet":
        return []
    raise ListenError(f"unknown listen mode {mode!r} (want one of {', '.join(LISTEN_MODES)})")


def assert_plaintext_allowed(mode: str, hosts: Iterable[str]) -> None:
    """No plaintext off-box: only `local` mode on loopback hosts may run without TLS."""
    hosts = list(hosts)
    if mode != "local" or not hosts or not all(is_loopback(h) for h in hosts):
        raise ListenError(
            f"refusing to serve without TLS in {mode} mode on {', '.join(hosts) or 'the tailnet'}: "
            "only local mode on loopback may run without TLS"
        )


# -- what is actually listening ---------------------------------------------------------


@dataclass(frozen=True)
class ListeningSocket:
    """One TCP socket in LISTEN state, as the kernel reports it."""

    host: str
    port: int
    inode: int

    @property
    def wildcard(self) -> bool:
        return is_wildcard(self.host)


def _decode_addr(hex_addr: str) -> tuple[str, int]:
    """Decode /proc/net/tcp{,6} 'local_address' (host-order 32-bit words, hex port)."""
    addr_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(addr_hex)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # dual-stack socket bound to an IPv4 address (or to 0.0.0.0)
    return str(ip), int(port_hex, 16)


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listening_sockets(pid: int | None = None, *, own_only: bool = True) -> list[ListeningSocket]:
    """TCP listeners in `pid`'s network namespace (default: ours); only `pid`'s own if own_only.

    Reads /proc/<pid>/net/tcp{,6}, so it sees the namespace the process lives in (works for a
    server started with `ip netns exec`). Linux only; raises OSError elsewhere.
    """
    proc = f"/proc/{pid if pid is not None else 'self'}"
    own = _socket_inodes(pid) if pid is not None and own_only else None
    out: list[ListeningSocket] = []
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/net/{name}") as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A = TCP_LISTEN
                continue
            inode = int(fields[9])
            if own is not None and inode not in own:
                continue
            host, port = _decode_addr(fields[1])
            out.append(ListeningSocket(host, port, inode))
    return out


def wildcard_listeners(pid: int | None = None, ports: Iterable[int] | None = None) -> list[ListeningSocket]:
    """Listeners on 0.0.0.0/:: (of `pid`, on `ports` if given): should always be empty for us."""
    wanted = set(ports) if ports is not None else None
    return [
        s for s in listening_sockets(pid)
        if s.wildcard and (wanted is None or s.port in wanted)
    ]


def assert_no_wildcard(pid: int | None = None, ports: Iterable[int] | None = None) -> None:
    """Raise ListenError naming every wildcard listener found (a self-check for serve and tests)."""
    bad = wildcard_listeners(pid, ports)
    if bad:
        where = ", ".join(f"{s.host}:{s.port}" for s in bad)
        raise ListenError(f"found listeners on wildcard addresses: {where}")
