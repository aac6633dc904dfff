"""mDNS / DNS-SD for lmlink: advertise `_lmlink._tcp.local.` (server) and the shared TXT codec.

Discovery finds, the tailnet carries. The advertisement goes out on the LAN so nearby clients
find the server at once, but the address it names (SRV/A records and TXT `addr`) is where a
client must connect: the server's tailnet addresses in tailnet modes (TLS, the certificate's
fingerprint in TXT `fp`), 127.0.0.1 in local mode. Nothing ever tells a client to use the LAN
address itself.

Interfaces (`advertise_interfaces`):
- `local` mode: 127.0.0.1 only, and the receiving socket is bound to the loopback device, so
  mDNS queries from other interfaces never reach the responder.
- tailnet modes: the LAN interfaces only: up, multicast-capable, not point-to-point, with a
  private or link-local IPv4 address outside the tailnet range (100.64.0.0/10). Tailnets carry
  no multicast, and public interfaces are where no peer of ours can be. Multicast is accepted
  only on those interfaces (Linux `IP_MULTICAST_ALL=0`), and when there is exactly one the
  receiving socket is bound to it.

TXT record (DNS-SD keys, each value well under 255 bytes):
  txtvers=1  proto=<wire protocol>  name=<server name>  node=<tailnet node / host name>
  mode=local|tailscaled|tsnet  state=loading|ready  addr=<host:port>[,<host:port>...]
  fp=sha256:<hex> (tailnet modes)  http=<HTTP bridge port>  cluster=<ranks>
  models=<id>,<id>...  or, when that would be long, mhash=sha256:<16 hex>  and always nmodels=<n>

A client must treat every field as a claim: the certificate the server presents has to match
`fp` (see lmlink.client.discovery), because anyone on the LAN can answer mDNS.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping

log = logging.getLogger("lmlink.mdns")

SERVICE_TYPE = "_lmlink._tcp.local."
TXT_VERSION = "1"
MODELS_TXT_LIMIT = 200  # bytes of "a,b,c" above which only a hash is advertised
_TAILNET_V4 = ipaddress.ip_network("100.64.0.0/10")
_TAILNET_V6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")
_IFF_UP, _IFF_LOOPBACK, _IFF_POINTOPOINT, _IFF_MULTICAST = 0x1, 0x8, 0x10, 0x1000
_IP_MULTICAST_ALL = 49  # Linux
_IP_BOUND_IF = 25  # macOS


class MdnsError(Exception):
    """mDNS cannot be used here (no interface, socket failure); one-line reason."""


# ----- addresses -------------------------------------------------------------------------


def is_tailnet_ip(host: str) -> bool:
    """Inside Tailscale's address ranges (100.64.0.0/10, fd7a:115c:a1e0::/48)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip in (_TAILNET_V4 if ip.version == 4 else _TAILNET_V6)


@dataclass(frozen=True)
class LanAddress:
    """An IPv4 address of a LAN interface that mDNS may use."""

    ip: str
    device: str
    index: int
    prefix: int


def iface_flags(device: str) -> int | None:
    """The interface's IFF_* flags from sysfs (public so tests can stand in for a machine's
    interfaces), or None where they cannot be read."""
    try:
        return int(Path(f"/sys/class/net/{device}/flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return None  # not Linux: judge by the address alone


def lan_addresses() -> list[LanAddress]:
    """IPv4 addresses of interfaces where LAN peers could be (see the module docstring)."""
    import ifaddr

    out: list[LanAddress] = []
    for adapter in ifaddr.get_adapters():
        flags = iface_flags(adapter.name)
        if flags is not None and (
            not flags & _IFF_UP
            or not flags & _IFF_MULTICAST
            or flags & (_IFF_LOOPBACK | _IFF_POINTOPOINT)
        ):
            continue
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):  # IPv6: not advertised on (IPv4 mDNS only)
                continue
            addr = ipaddress.ip_address(ip.ip)
            if addr.is_loopback or addr in _TAILNET_V4 or addr.is_unspecified:
                continue
            if not (addr.is_private or addr.is_link_local):
                continue
            out.append(LanAddress(ip.ip, adapter.name, adapter.index or 0, ip.network_prefix))
    return out


def advertise_interfaces(mode: str) -> list[str]:
    """Interface addresses to advertise on for a listen mode (may be empty: no LAN here)."""
    if mode == "local":
        return ["127.0.0.1"]
    return [a.ip for a in lan_addresses()]


def browse_interfaces() -> list[str]:
    """Interface addresses a client browses on: loopback (local servers) and the LAN."""
    return ["127.0.0.1", *(a.ip for a in lan_addresses())]


def _device_for(ip: str) -> tuple[str, int] | None:
    import ifaddr

    for adapter in ifaddr.get_adapters():
        if any(isinstance(a.ip, str) and a.ip == ip for a in adapter.ips):
            return adapter.name, adapter.index or 0
    return None


def restrict_receive(zc: object, interfaces: list[str]) -> list[str]:
    """Keep python-zeroconf's shared receive socket (0.0.0.0:5353) to our interfaces.

    Returns what was applied, for logs and tests. Best effort: an option the platform lacks
    is skipped (the interface list passed to zeroconf still limits where we send).
    """
    sock = getattr(getattr(zc, "engine", None), "_listen_socket", None)
    if not isinstance(sock, socket.socket):
        return []
    applied: list[str] = []
    if sys.platform.startswith("linux"):
        try:  # multicast only for the groups this socket joined (= our interfaces)
            sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
            applied.append("multicast_all=0")
        except OSError as exc:
            log.debug("mDNS: IP_MULTICAST_ALL: %s", exc)
    devices = {d for d in (_device_for(ip) for ip in interfaces) if d is not None}
    if len(devices) == 1:
        name, index = next(iter(devices))
        try:
            if sys.platform.startswith("linux"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, name.encode())
                applied.append(f"device={name}")
            elif sys.platform == "darwin" and index:
                sock.setsockopt(socket.IPPROTO_IP, _IP_BOUND_IF, index)
                applied.append(f"device={name}")
        except OSError as exc:
            log.debug("mDNS: binding the receive socket to %s: %s", name, exc)
    return applied


# ----- the TXT record --------------------------------------------------------------------


def models_digest(models: Iterable[str]) -> str:
    """A short stable digest of a model list (order-independent)."""
    text = "\n".join(sorted(models))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def instance_label(name: str) -> str:
    """A DNS-SD instance label: no dots, at most 63 bytes."""
    label = "".join(c if c.isprintable() and c != "." else "-" for c in name).strip() or "lmlink"
    return label.encode()[:63].decode(errors="ignore")


@dataclass(frozen=True)
class Advertisement:
    """What a server says about itself on the LAN."""

    name: str
    node: str
    mode: str
    port: int  # gRPC port (the SRV port)
    hosts: tuple[str, ...]  # addresses to connect to: tailnet IPs, or loopback in local mode
    fingerprint: str = ""
    http_port: int | None = None
    models: tuple[str, ...] = ()
    state: str = "loading"
    cluster_size: int = 1
    protocol: int = 1

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(_host_port(h, self.port) for h in self.hosts)

    def txt(self) -> dict[str, str]:
        props = {
            "txtvers": TXT_VERSION,
            "proto": str(self.protocol),
            "name": self.name.encode()[:200].decode(errors="ignore"),
            "node": self.node.encode()[:200].decode(errors="ignore"),
            "mode": self.mode,
            "state": self.state,
            "addr": _fit(",", self.targets, 250),
            "cluster": str(self.cluster_size),
            "nmodels": str(len(self.models)),
        }
        if self.fingerprint:
            props["fp"] = self.fingerprint
        if self.http_port:
            props["http"] = str(self.http_port)
        joined = ",".join(self.models)
        if len(joined.encode()) <= MODELS_TXT_LIMIT and "," not in "".join(self.models):
            props["models"] = joined
        else:
            props["mhash"] = models_digest(self.models)
        return props


def _fit(sep: str, items: Iterable[str], limit: int) -> str:
    out = ""
    for item in items:
        candidate = f"{out}{sep}{item}" if out else item
        if len(candidate.encode()) > limit:
            break
        out = candidate
    return out


@dataclass(frozen=True)
class AdvertisedServer:
    """A TXT record decoded on the client side. Every field is an unverified claim."""

    instance: str  # full DNS-SD name, e.g. "studio._lmlink._tcp.local."
    name: str
    node: str
    mode: str
    state: str
    targets: tuple[str, ...]
    fingerprint: str
    http_port: int | None
    models: tuple[str, ...] | None  # None when only a hash was advertised
    models_hash: str
    model_count: int
    cluster_size: int
    protocol: int
    txt_version: str
    problems: tuple[str, ...] = field(default=())


def _text(v: bytes | str | None) -> str:
    if v is None:
        return ""
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def _int(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default


def parse_txt(
    instance: str, props: Mapping[bytes | str, bytes | str | None], port: int = 0,
    addresses: Iterable[str] = (),
) -> AdvertisedServer:
    """Decode a TXT record; SRV port + A records fill in when TXT `addr` is missing."""
    p = {_text(k).lower(): _text(v) for k, v in props.items()}
    problems: list[str] = []
    targets = tuple(t for t in p.get("addr", "").split(",") if t)
    if not targets and port:
        targets = tuple(_host_port(a, port) for a in addresses)
    if not targets:
        problems.append("no address advertised")
    http = _int(p.get("http", ""), 0) or None
    models = tuple(m for m in p["models"].split(",") if m) if "models" in p else None
    proto = _int(p.get("proto", ""), 0)
    if not proto:
        problems.append("no protocol version advertised")
    label = instance.removesuffix("." + SERVICE_TYPE).removesuffix(SERVICE_TYPE)
    return AdvertisedServer(
        instance=instance,
        name=p.get("name") or label,
        node=p.get("node", ""),
        mode=p.get("mode", ""),
        state=p.get("state", ""),
        targets=targets,
        fingerprint=p.get("fp", ""),
        http_port=http,
        models=models,
        models_hash=p.get("mhash", "") or (models_digest(models) if models is not None else ""),
        model_count=_int(p.get("nmodels", ""), len(models) if models is not None else 0),
        cluster_size=_int(p.get("cluster", ""), 1),
        protocol=proto,
        txt_version=p.get("txtvers", ""),
        problems=tuple(problems),
    )


# ----- the advertiser --------------------------------------------------------------------


class MdnsAdvertiser:
    """Register, update and (with goodbye packets) unregister one `_lmlink._tcp` service.

    `start()` returns at once; probing (~1.2 s) and the announcement run in the background so
    the server never waits on mDNS. Every failure is logged, never raised into the server.
    """

    def __init__(self, ad: Advertisement, interfaces: list[str]) -> None:
        self.ad = ad
        self.interfaces = list(interfaces)
        self.applied: list[str] = []
        self.registered = asyncio.Event()
        self.instance = f"{instance_label(ad.name)}.{SERVICE_TYPE}"
        self._zc: object | None = None
        self._info: object | None = None
        self._announced: Advertisement | None = None
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    def _service_info(self) -> object:
        from zeroconf import ServiceInfo

        label = self.instance.removesuffix("." + SERVICE_TYPE)
        return ServiceInfo(
            SERVICE_TYPE,
            self.instance,
            port=self.ad.port,
            properties=self.ad.txt(),
            server=f"{label}.local.",
            parsed_addresses=list(self.ad.hosts),
        )

    async def start(self) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncZeroconf

        if not self.interfaces:
            raise MdnsError("no LAN interface to advertise on")
        try:
            self._zc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        except OSError as exc:
            raise MdnsError(f"cannot open mDNS sockets: {exc}") from None
        self.applied = restrict_receive(self._zc.zeroconf, self.interfaces)  # type: ignore[attr-defined]
        self._tasks.append(asyncio.ensure_future(self._register()))

    async def _register(self) -> None:
        assert self._zc is not None
        t0 = time.monotonic()
        info, announced = self._service_info(), self.ad
        try:
            task = await self._zc.async_register_service(  # type: ignore[attr-defined]
                info, allow_name_change=True
            )
            await task  # probing, then the announcement
        except Exception as exc:  # noqa: BLE001 - mDNS must never take the server down
            log.warning("mDNS: could not advertise %s: %s", self.instance, exc)
            return
        self._info, self._announced = info, announced
        self.instance = info.name  # type: ignore[attr-defined]  # renamed on a conflict
        self.registered.set()
        log.info(
            "mDNS: advertising %s on %s (%.1f s)", self.instance, ", ".join(self.interfaces),
            time.monotonic() - t0,
        )
        await self._announce()  # changes made while probing

    async def _announce(self) -> None:
        async with self._lock:
            if self._zc is None or self._info is None or self._closed or self.ad == self._announced:
                return
            info, announced = self._service_info(), self.ad
            try:
                await self._zc.async_update_service(info)  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001
                log.warning("mDNS: could not update %s: %s", self.instance, exc)
                return
            self._info, self._announced = info, announced
        log.info("mDNS: updated %s (state %s, %d models)", self.instance, announced.state,
                 len(announced.models))

    async def update(self, **changes: object) -> bool:
        """Change fields (models, state, ...) and re-announce; never waits for probing."""
        new = replace(self.ad, **changes)  # type: ignore[arg-type]
        if new == self.ad:
            return False
        self.ad = new
        await self._announce()  # a no-op until registered; _register catches up then
        return True

    async def serving(self, models: Callable[[], Iterable[str]]) -> None:
        """The server is ready: advertise its models and keep them current."""
        await self.update(models=tuple(sorted(models())), state="ready")
        self.watch_models(models)

    def watch_models(self, current: Callable[[], Iterable[str]], interval: float = 1.0) -> None:
        """Re-announce whenever `current()` (the served model ids) changes."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    models = tuple(sorted(current()))
                except Exception:  # noqa: BLE001
                    continue
                if models != tuple(sorted(self.ad.models)):
                    await self.update(models=models)

        self._tasks.append(asyncio.ensure_future(loop()))

    async def aclose(self) -> None:
        """Unregister (goodbye packets: TTL 0, so browsers drop us at once) and close."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._zc is None:
            return
        try:
            if self._info is not None:
                goodbye = await self._zc.async_unregister_service(self._info)  # type: ignore[attr-defined]
                await asyncio.wait_for(goodbye, 3.0)
                log.info("mDNS: withdrew %s", self.instance)
        except Exception as exc:  # noqa: BLE001
            log.warning("mDNS: could not withdraw %s: %s", self.instance, exc)
        finally:
            try:
                await asyncio.wait_for(self._zc.async_close(), 3.0)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001
                pass


# ----- wiring for lmlink serve -----------------------------------------------------------


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.strip().rpartition(":")
    return host.strip("[]"), int(port)


def node_name(mode: str, *, localapi_socket: str | None = None, tsnet_hostname: str = "") -> str:
    """The node id advertised: the MagicDNS name (tailscaled), the tsnet hostname, else hostname."""
    if mode == "tailscaled":
        try:
            from lmlink.net.localapi import LocalAPI

            return LocalAPI(localapi_socket).self_node(refresh=False).dns_name
        except Exception:  # noqa: BLE001
            pass
    if mode == "tsnet" and tsnet_hostname:
        return tsnet_hostname
    return socket.gethostname()


async def start_for_server(
    *,
    mode: str,
    name: str,
    grpc_address: str,
    http_address: str | None,
    fingerprint: str,
    localapi_socket: str | None = None,
    tsnet_hostname: str = "",
    protocol: int | None = None,
) -> MdnsAdvertiser | None:
    """Start advertising a server from its ready-line facts; None (logged) when not possible.

    `grpc_address` / `http_address` are what `FrontDoor.expose` returned ("h:p" or
    "h1:p, [h2]:p"). The advertisement starts in state `loading` with no models; call
    `update(models=..., state="ready")` once the model is served.
    """
    try:
        pairs = [_split_address(a) for a in grpc_address.split(",") if a.strip()]
        http_port = _split_address(http_address.split(",")[0])[1] if http_address else None
    except ValueError:
        log.warning("mDNS: cannot parse the server address %r; not advertising", grpc_address)
        return None
    node = await asyncio.to_thread(
        node_name, mode, localapi_socket=localapi_socket, tsnet_hostname=tsnet_hostname
    )
    if protocol is None:
        from lmlink import PROTOCOL_VERSION as protocol
    hosts = tuple("127.0.0.1" if h == "localhost" else h for h, _ in pairs)
    ad = Advertisement(
        name=name, node=node, mode=mode, port=pairs[0][1], hosts=hosts,
        fingerprint=fingerprint, http_port=http_port, protocol=protocol,
    )
    try:
        advertiser = MdnsAdvertiser(ad, advertise_interfaces(mode))
        await advertiser.start()
    except MdnsError as exc:
        log.warning("mDNS: not advertising: %s", exc)
        return None
    except Exception as exc:  # noqa: BLE001 - mDNS must never take the server down
        log.warning("mDNS: not advertising: %s: %s", type(exc).__name__, exc)
        return None
    return advertiser
