"""The Tailscale LocalAPI, reduced to what lmlink needs: who am I, who is calling, my cert.

A thin wrapper over `tslocal` (which speaks HTTP to tailscaled over its unix socket on Linux
and finds the macOS app's TCP port + token by itself). It turns tailscaled's answers into
lmlink types (`SelfNode`, `Peer`, `Identity`) and its failures into `LocalAPIError`s with a
one-line reason, so callers never see a tslocal traceback.

Socket path: the `socket_path` argument, else `$LMLINK_LOCALAPI_SOCKET`, else tslocal's
platform default. An explicit path is used as-is (no macOS TCP discovery).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, TypeVar

import tslocal

from lmlink import defaults
from lmlink.access.identity import Identity

SOCKET_ENV = defaults.ENV_LOCALAPI_SOCKET
FORWARD_RETRY_S = 0.5  # how long a forwarded (userspace-mode) connection may be unknown

T = TypeVar("T")


class LocalAPIError(Exception):
    """Any LocalAPI failure; the message is a one-line reason fit for stderr."""


class LocalAPIUnavailable(LocalAPIError):
    """tailscaled (or the macOS app) cannot be reached, or is not logged in and running."""


class LocalAPIForbidden(LocalAPIError):
    """tailscaled answered 403: this OS user may not do that (e.g. fetch certs without root)."""


@dataclass(frozen=True)
class SelfNode:
    """This node as tailscaled sees it; the listener binds only to `tailscale_ips`."""

    dns_name: str  # FQDN without the trailing dot, e.g. "studio.tail1234.ts.net"
    host_name: str
    tailscale_ips: tuple[str, ...]
    user_id: int
    login_name: str  # the owner's login; "tagged-devices" when the node is tagged
    display_name: str
    tags: tuple[str, ...]
    cert_domains: tuple[str, ...]
    backend_state: str
    # False when tailscaled runs with --tun=userspace-networking: the tailnet IPs are not on
    # any host interface, and incoming tailnet connections arrive forwarded from loopback.
    tun: bool = True

    @property
    def is_tagged(self) -> bool:
        """A tagged node has no human owner: only grants authorize callers."""
        return bool(self.tags)


PathKind = Literal["direct", "relayed", "idle"]


@dataclass(frozen=True)
class Peer:
    """Another node of the tailnet, for discovery (no multicast on tailnets)."""

    name: str  # FQDN without trailing dot
    host_name: str
    addresses: tuple[str, ...]
    tags: tuple[str, ...]
    login_name: str
    os: str
    online: bool
    path: PathKind  # "direct": CurAddr set; "relayed": via DERP; "idle": no current path
    cur_addr: str
    relay: str


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(_norm_ip(ip)).is_loopback
    except ValueError:
        return False


def _strip_prefix(addr: str) -> str:
    """'100.64.0.1/32' -> '100.64.0.1' (Node.Addresses carry prefix lengths)."""
    return addr.split("/", 1)[0]


def _norm_ip(ip: str) -> str:
    """Canonical text form; unwraps IPv4-mapped IPv6 ('::ffff:1.2.3.4') from dual-stack sockets."""
    addr = ipaddress.ip_address(ip.strip("[]").split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def _whois_addr(ip: str, port: int | None) -> str:
    """The `addr` query value tailscaled parses: IP, IP:port, or [IPv6]:port."""
    ip = _norm_ip(ip)
    if port is None:
        return ip
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class LocalAPI:
    """Synchronous LocalAPI client, safe to share across threads (one connection per thread).

    Use the `a*` coroutine variants from asyncio code: they run the blocking call in a
    worker thread so a slow daemon never stalls the event loop.
    """

    def __init__(self, socket_path: str | None = None, *, owner_login: str | None = None) -> None:
        """`owner_login` overrides who counts as the owner (e.g. for a tagged server node)."""
        self.socket_path = socket_path or os.environ.get(SOCKET_ENV) or None
        self._owner_login = owner_login
        self._local = threading.local()
        self._self_cache: SelfNode | None = None

    # -- plumbing -----------------------------------------------------------------------

    def _client(self) -> tslocal.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = tslocal.Client(
                socket_path=self.socket_path, use_socket_only=self.socket_path is not None
            )
            self._local.client = client
        return client

    def _where(self) -> str:
        return self.socket_path or "the platform default (tailscaled socket / macOS app)"

    def _call(self, what: str, fn: Callable[[tslocal.Client], T]) -> T:
        """Run one LocalAPI call, mapping tslocal's exceptions to ours."""
        try:
            return fn(self._client())
        except tslocal.AccessDeniedError as e:
            raise LocalAPIForbidden(f"Tailscale LocalAPI refused {what}: {str(e).strip()}") from None
        except tslocal.TailscaleConnectionError as e:
            self._drop_client()
            raise LocalAPIUnavailable(
                f"Tailscale LocalAPI not reachable at {self._where()} ({str(e).strip()}); "
                "is tailscaled (or the Tailscale app) running?"
            ) from None
        except tslocal.HttpError as e:
            raise LocalAPIError(f"Tailscale LocalAPI {what} failed: {str(e).strip()}") from None
        except OSError as e:  # tslocal retries once, then lets OSError escape
            self._drop_client()
            raise LocalAPIUnavailable(
                f"Tailscale LocalAPI not reachable at {self._where()} ({e}); "
                "is tailscaled (or the Tailscale app) running?"
            ) from None
        except Exception as e:  # malformed JSON and the like: still one clear line
            if isinstance(e, LocalAPIError):
                raise
            raise LocalAPIError(f"Tailscale LocalAPI {what}: unexpected answer ({e})") from None

    def _drop_client(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            try:
                client.close()
            except Exception:
                pass
            self._local.client = None

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        self._drop_client()

    # -- queries ------------------------------------------------------------------------

    def self_node(self, *, refresh: bool = True) -> SelfNode:
        """This node's tailnet IPs, DNS name and owner; raises unless the backend is Running."""
        if not refresh and self._self_cache is not None:
            return self._self_cache
        st = self._call("status", lambda c: c.status_without_peers())
        if st.backend_state != "Running":
            raise LocalAPIUnavailable(
                f"Tailscale is not running (state {st.backend_state or 'unknown'}); "
                "log in with `tailscale up` first"
            )
        me = st.self_
        profile = st.user.get(str(me.user_id)) if st.user else None
        node = SelfNode(
            dns_name=me.dns_name.rstrip("."),
            host_name=me.host_name,
            tailscale_ips=tuple(_norm_ip(ip) for ip in (st.tailscale_ips or me.tailscale_ips)),
            user_id=me.user_id,
            login_name=profile.login_name if profile else "",
            display_name=profile.display_name if profile else "",
            tags=tuple(me.tags or ()),
            cert_domains=tuple(st.cert_domains or ()),
            backend_state=st.backend_state,
            tun=bool(st.tun),
        )
        self._self_cache = node
        return node

    def whois(self, ip: str, port: int | None = None) -> Identity | None:
        """Who is the peer at ip[:port]? None when tailscaled does not know it (404).

        A loopback ip:port is a connection userspace-mode tailscaled forwarded to us; its proxy
        map can lag the connection by a moment (tailscale#1616), so a 404 there is retried for
        up to FORWARD_RETRY_S before the caller counts as unknown. Every other local process
        stays unknown (WhoIs has no entry for it) and is refused.
        """
        res = self._whois_once(ip, port)
        if res is None and port and _is_loopback(ip):
            deadline = time.monotonic() + FORWARD_RETRY_S
            while res is None and time.monotonic() < deadline:
                time.sleep(0.05)
                res = self._whois_once(ip, port)
        return res

    def _whois_once(self, ip: str, port: int | None) -> Identity | None:
        addr = _whois_addr(ip, port)

        def lookup(c: tslocal.Client) -> tslocal.WhoIsResponse | None:
            try:
                return c.who_is(addr)
            except tslocal.PeerNotFoundError:
                return None

        res = self._call("whois", lookup)
        if res is None:
            return None
        me = self.self_node(refresh=False)
        return _identity_from_whois(res, me, self._owner_login)

    def cert_pair(self, domain: str) -> tuple[bytes, bytes]:
        """(cert_pem, key_pem) for one of this node's cert domains (needs cert permission)."""
        cert, key = self._call("cert", lambda c: c.cert_pair(domain))
        if b"BEGIN CERTIFICATE" not in cert or b"PRIVATE KEY" not in key:
            raise LocalAPIError(f"Tailscale LocalAPI cert for {domain}: malformed PEM pair")
        return cert, key

    def peers(self) -> list[Peer]:
        """All peers with their path (direct vs DERP-relayed), for tailnet discovery."""
        st = self._call("status", lambda c: c.status())
        out = []
        for ps in (st.peer or {}).values():
            profile = st.user.get(str(ps.user_id)) if st.user else None
            path: PathKind = "direct" if ps.cur_addr else ("relayed" if ps.relay else "idle")
            out.append(
                Peer(
                    name=ps.dns_name.rstrip("."),
                    host_name=ps.host_name,
                    addresses=tuple(_norm_ip(a) for a in ps.tailscale_ips),
                    tags=tuple(ps.tags or ()),
                    login_name=profile.login_name if profile else "",
                    os=ps.os,
                    online=ps.online,
                    path=path,
                    cur_addr=ps.cur_addr,
                    relay=ps.relay,
                )
            )
        return sorted(out, key=lambda p: p.name)

    # -- asyncio variants ---------------------------------------------------------------

    async def awhois(self, ip: str, port: int | None = None) -> Identity | None:
        """`whois` without blocking the event loop; the relay's `resolve` callback."""
        return await asyncio.to_thread(self.whois, ip, port)

    async def aself_node(self) -> SelfNode:
        """`self_node` without blocking the event loop."""
        return await asyncio.to_thread(self.self_node)


def _identity_from_whois(
    res: tslocal.WhoIsResponse, me: SelfNode, owner_login: str | None
) -> Identity:
    """Map a WhoIs answer to an Identity; owner = same user as this node, on an untagged node."""
    node, user = res.node, res.user_profile
    tags = tuple(node.tags or ())
    caps: dict[str, list[Any]] = {k: list(v or []) for k, v in (res.cap_map or {}).items()}
    if tags:
        is_owner = False
    elif owner_login is not None:
        is_owner = user.login_name == owner_login
    else:
        is_owner = (not me.is_tagged) and node.user != 0 and node.user == me.user_id
    return Identity(
        login_name=user.login_name,
        display_name=user.display_name,
        source="tailnet",
        node_name=node.name.rstrip("."),
        tags=tags,
        capabilities=caps,
        addresses=tuple(_strip_prefix(a) for a in node.addresses),
        is_owner=is_owner,
    )
