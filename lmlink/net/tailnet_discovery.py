"""lmlink servers among tailnet peers (LocalAPI status), and the path traffic takes to a peer.

Tailnets carry no multicast, so off the LAN a client asks its own tailscaled for the peer list
and keeps the peers that follow lmlink's naming convention:

- the peer carries the ACL tag `tag:lmlink` (recommended for shared servers: tag the node in
  the tailnet policy, e.g. `tailscale up --advertise-tags=tag:lmlink`), or
- its host name is `lmlink` or starts with `lmlink-` (the tsnet node's default host name is
  `lmlink`; a personal server can simply be named `lmlink-studio`).

Candidates are dialled on the default gRPC port (47470, configurable on the client) and only
count once a cheap authenticated GetServerInfo succeeds (lmlink.client.discovery does that).

Paths: LocalAPI reports per peer a current direct address (`CurAddr`, "direct") or only a DERP
relay region (`Relay`, "relayed"); neither means no connection yet ("idle"). lmlink never
chooses a relay itself, but Tailscale falls back to DERP when it cannot punch through, so the
client shows the path and can refuse relayed ones (`--direct-only`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Literal

from lmlink import defaults
from lmlink.net.localapi import LocalAPI, Peer

LMLINK_TAG = "tag:lmlink"
NAME_PREFIX = "lmlink"
DEFAULT_PORT = defaults.GRPC_PORT

PathKind = Literal["direct", "relayed", "idle", "loopback", "unknown"]


def lmlink_reason(peer: Peer, tag: str = LMLINK_TAG) -> str | None:
    """Why `peer` looks like an lmlink server ("tag:lmlink", "name lmlink-x"), else None."""
    if tag in peer.tags:
        return tag
    host = (peer.host_name or peer.name.split(".", 1)[0]).lower()
    if host == NAME_PREFIX or host.startswith(NAME_PREFIX + "-"):
        return f"name {host}"
    return None


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class TailnetCandidate:
    """A peer that follows the convention; not yet confirmed to run lmlink."""

    peer: Peer
    reason: str
    target: str  # first tailnet address (IPv4 preferred) and the port


def tailnet_candidates(
    peers: Iterable[Peer], *, port: int = DEFAULT_PORT, tag: str = LMLINK_TAG,
    include_offline: bool = False,
) -> list[TailnetCandidate]:
    """Peers tagged or named as lmlink servers (online ones unless `include_offline`)."""
    out = []
    for peer in peers:
        reason = lmlink_reason(peer, tag)
        if reason is None or not peer.addresses or (not peer.online and not include_offline):
            continue
        host = sorted(peer.addresses, key=lambda a: ":" in a)[0]
        out.append(TailnetCandidate(peer, reason, _target(host, port)))
    return out


def list_peers(localapi: LocalAPI) -> list[Peer]:
    """All tailnet peers with their paths (raises LocalAPIError with a one-line reason)."""
    return localapi.peers()


@dataclass(frozen=True)
class PathInfo:
    """How traffic to a host travels, as this node's tailscaled sees it."""

    kind: PathKind
    peer: str = ""  # the peer's MagicDNS name
    cur_addr: str = ""  # direct: the peer's current underlay address
    relay: str = ""  # the peer's DERP home region
    tags: tuple[str, ...] = ()
    note: str = ""

    def describe(self) -> str:
        if self.kind == "direct":
            return f"direct ({self.cur_addr})" if self.cur_addr else "direct"
        if self.kind == "relayed":
            return f"relayed via DERP {self.relay}" if self.relay else "relayed via DERP"
        if self.kind == "idle":
            return "idle (no connection yet)"
        if self.kind == "loopback":
            return "loopback"
        return f"unknown ({self.note})" if self.note else "unknown"


def _ip(host: str) -> str | None:
    try:
        addr = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def path_for(host: str, peers: list[Peer] | None, *, note: str = "") -> PathInfo:
    """The path to `host` given a peer list (None: LocalAPI not available, `note` says why)."""
    if host == "localhost":
        return PathInfo("loopback")
    ip = _ip(host)
    if ip is not None and ipaddress.ip_address(ip).is_loopback:
        return PathInfo("loopback")
    if peers is None:
        return PathInfo("unknown", note=note or "no Tailscale LocalAPI")
    for peer in peers:
        if ip is not None and ip in peer.addresses or host.lower().rstrip(".") == peer.name.lower():
            return PathInfo(peer.path, peer.name, peer.cur_addr, peer.relay, peer.tags)
    return PathInfo("unknown", note="not a peer of this tailnet")


def path_to(host: str, localapi: LocalAPI) -> PathInfo:
    """`path_for` asking LocalAPI now; never raises (unknown path, with the reason)."""
    from lmlink.net.localapi import LocalAPIError

    if path_for(host, []).kind == "loopback":
        return PathInfo("loopback")
    try:
        peers = localapi.peers()
    except LocalAPIError as exc:
        return PathInfo("unknown", note=str(exc))
    return path_for(host, peers)
