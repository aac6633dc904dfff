"""Find lmlink servers without typing an address, and pick the one to use.

Three origins, checked together (`discover()`):
- `mdns`: `_lmlink._tcp.local.` answers on loopback and the LAN (lmlink.net.mdns). An answer is
  only a claim: its address must be a tailnet (or loopback) address, a peer of this tailnet when
  the LocalAPI is available, and the certificate that address presents must match the
  advertised fingerprint, or the endpoint is rejected (mDNS answers can be spoofed).
- `tailnet`: peers tagged `tag:lmlink` or named `lmlink*` in this node's LocalAPI status
  (lmlink.net.tailnet_discovery), dialled on the configured port.
- `configured`: servers listed in the client config file, and the local default 127.0.0.1:47470.

Every candidate is confirmed with an authenticated GetServerInfo (TLS pinned on first use, or
plaintext to loopback) before it counts. `select_endpoint()` prefers a verified direct path found
on the LAN (mDNS, or loopback), then a direct tailnet path, then paths not known, then relayed
ones; with `direct_only` only direct (or loopback) paths are acceptable.

Client settings live in `<config dir>/config.toml` (`$LMLINK_CONFIG_DIR`, else
`~/.config/lmlink`):

    direct_only = true            # refuse DERP-relayed paths (also $LMLINK_DIRECT_ONLY=1)
    servers = ["studio.tail1234.ts.net:47470"]
    discovery_timeout = 2.0       # seconds to listen for mDNS answers
    tailnet_port = 47470          # port dialled on tailnet peers
    tailnet_tag = "tag:lmlink"
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Sequence

from lmlink import defaults

from .errors import LmlinkError, PermissionDenied

Origin = Literal["mdns", "tailnet", "configured"]
Status = Literal["ok", "unverified", "rejected", "unreachable", "denied", "refused"]
DEFAULT_LOCAL = defaults.LOCAL_SERVER
VERIFY_TIMEOUT = 3.0
CONFIG_FILE = "config.toml"
DIRECT_ONLY_ENV = defaults.ENV_DIRECT_ONLY
_ORIGIN_ORDER = {"mdns": 0, "tailnet": 1, "configured": 2}


class DiscoveryError(LmlinkError):
    """Nothing usable was found, or the one found is not acceptable; one-line reason."""


class RelayedPathRefused(DiscoveryError):
    """--direct-only: the path to the server goes through a DERP relay (or is not known)."""


# ----- settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSettings:
    direct_only: bool = False
    servers: tuple[str, ...] = ()
    discovery_timeout: float = 2.0
    tailnet_port: int = defaults.GRPC_PORT
    tailnet_tag: str = "tag:lmlink"
    path: Path | None = None


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def load_settings(config_dir: str | os.PathLike[str] | None = None) -> ClientSettings:
    """Read `config.toml` (missing file: defaults); $LMLINK_DIRECT_ONLY overrides direct_only."""
    import tomllib

    from lmlink.net.pinning import default_config_dir

    path = Path(config_dir) / CONFIG_FILE if config_dir else default_config_dir() / CONFIG_FILE
    data: dict[str, Any] = {}
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LmlinkError(f"cannot read {path}: {exc}") from None
    s = ClientSettings(path=path)
    try:
        if "direct_only" in data:
            if not isinstance(data["direct_only"], bool):
                raise TypeError("direct_only must be true or false")
            s = replace(s, direct_only=data["direct_only"])
        if "servers" in data:
            servers = data["servers"]
            if not isinstance(servers, list) or not all(isinstance(x, str) for x in servers):
                raise TypeError("servers must be a list of \"HOST:PORT\" strings")
            s = replace(s, servers=tuple(servers))
        if "discovery_timeout" in data:
            t = float(data["discovery_timeout"])
            if not 0 < t <= 60:
                raise ValueError("discovery_timeout must be between 0 and 60 seconds")
            s = replace(s, discovery_timeout=t)
        if "tailnet_port" in data:
            port = data["tailnet_port"]
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError("tailnet_port must be a port number")
            s = replace(s, tailnet_port=port)
        if "tailnet_tag" in data:
            s = replace(s, tailnet_tag=str(data["tailnet_tag"]))
    except (TypeError, ValueError) as exc:
        raise LmlinkError(f"{path}: {exc}") from None
    if os.environ.get(DIRECT_ONLY_ENV):
        s = replace(s, direct_only=_truthy(os.environ[DIRECT_ONLY_ENV]))
    return s


# ----- endpoints ---------------------------------------------------------------------------


@dataclass
class Endpoint:
    """One place a server can be reached, where it was found, and whether it checked out."""

    target: str  # HOST:PORT to dial: a tailnet address, or loopback
    origin: Origin  # how it was found first (mdns > tailnet > configured when merged)
    origins: tuple[str, ...] = ()
    name: str = ""
    node: str = ""
    mode: str = ""
    state: str = ""
    advertised_fingerprint: str = ""  # what the mDNS answer claimed
    fingerprint: str = ""  # what the server presented (verified)
    http: str = ""  # HOST:PORT of the HTTP bridge, when advertised
    models: tuple[str, ...] = ()
    models_hash: str = ""
    model_count: int = 0
    cluster_size: int = 1
    protocol: int = 0
    path: str = "unknown"  # direct | relayed | idle | loopback | unknown
    path_detail: str = ""
    relay: str = ""
    cur_addr: str = ""
    peer: str = ""  # the tailnet peer's name
    tags: tuple[str, ...] = ()
    status: Status = "unverified"
    error: str = ""
    found_after: float = 0.0  # seconds after discovery started
    instance: str = ""  # the mDNS service instance

    @property
    def usable(self) -> bool:
        return self.status == "ok"

    @property
    def on_lan(self) -> bool:
        return "mdns" in self.origins or self.path == "loopback"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("origins", "models", "tags"):
            data[key] = list(data[key])
        return data


@dataclass
class Discovery:
    """What `discover()` found (best first) and notes on sources that could not be used."""

    endpoints: list[Endpoint]
    notes: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    interfaces: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self.endpoints)

    def __len__(self) -> int:
        return len(self.endpoints)

    @property
    def usable(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.usable]


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def rank(ep: Endpoint) -> int:
    """0 = best: a verified direct path found on the LAN (or loopback).

    A loopback address known only from an mDNS answer ranks below configured ones: anyone on
    the LAN can send an answer naming 127.0.0.1 (see `_check_claims`).
    """
    if ep.path == "loopback" and ep.origins == ("mdns",):
        return 1
    if ep.path == "loopback" or (ep.path == "direct" and ep.on_lan):
        return 0
    if ep.path == "direct":
        return 1
    if ep.path in ("unknown", "idle"):
        return 2 if ep.on_lan else 3
    return 4  # relayed


def _order(ep: Endpoint) -> tuple[Any, ...]:
    return (
        not ep.usable, rank(ep), ep.state not in ("", "ready"),
        _ORIGIN_ORDER.get(ep.origin, 9), ep.found_after,
    )


def explain(endpoints: Sequence[Endpoint], *, direct_only: bool, what: str) -> str:
    """One line saying why nothing usable was found."""
    if not endpoints:
        return f"no lmlink server found ({what})"
    reasons = "; ".join(f"{e.name or e.target} ({e.target}): {e.error or e.status}" for e in endpoints[:4])
    more = f" and {len(endpoints) - 4} more" if len(endpoints) > 4 else ""
    return f"no usable lmlink server among {len(endpoints)} found: {reasons}{more}"


def select_endpoint(
    endpoints: Sequence[Endpoint] | Discovery, *, direct_only: bool = False, model: str = "",
) -> Endpoint:
    """The best usable endpoint (see the module docstring), else DiscoveryError with reasons."""
    eps = list(endpoints)
    usable = [e for e in eps if e.usable and (not direct_only or e.path in ("direct", "loopback"))]
    if model:
        serving = [e for e in usable if model in e.models]
        usable = serving or usable
    if usable:
        return sorted(usable, key=_order)[0]
    if direct_only and any(e.usable for e in eps):
        e = next(e for e in sorted(eps, key=_order) if e.usable)
        raise RelayedPathRefused(refusal(e))
    raise DiscoveryError(explain(eps, direct_only=direct_only, what="nothing answered"))


def refusal(ep: Endpoint) -> str:
    where = f"{ep.name or ep.peer or ep.target} ({ep.target})"
    if ep.path == "relayed":
        return (
            f"refusing {where}: its tailnet path is relayed via DERP"
            f"{' ' + ep.relay if ep.relay else ''}, and direct-only is set "
            "(--direct-only / direct_only in config.toml); retry once Tailscale finds a direct "
            "path, or allow relayed paths"
        )
    return (
        f"refusing {where}: its path is {ep.path_detail or ep.path}, and direct-only needs a "
        "verified direct path (Tailscale LocalAPI shows none)"
    )


# ----- mDNS browsing -----------------------------------------------------------------------


@dataclass(frozen=True)
class BrowseEvent:
    kind: Literal["added", "updated", "removed"]
    instance: str
    server: Any = None  # lmlink.net.mdns.AdvertisedServer (added / updated)
    at: float = 0.0  # time.time() when seen


class MdnsBrowser:
    """Watch `_lmlink._tcp.local.`: `async with MdnsBrowser() as b: async for ev in b.events()`."""

    def __init__(self, interfaces: list[str] | None = None, resolve_timeout: float = 1.5) -> None:
        from lmlink.net.mdns import browse_interfaces

        self.interfaces = interfaces if interfaces is not None else browse_interfaces()
        self.resolve_timeout = resolve_timeout
        self._queue: asyncio.Queue[BrowseEvent] = asyncio.Queue()
        self._zc: Any = None
        self._browser: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> "MdnsBrowser":
        from zeroconf import DNSQuestionType, IPVersion, ServiceStateChange
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        from lmlink.net.mdns import SERVICE_TYPE, restrict_receive

        try:
            self._zc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        except OSError as exc:
            raise DiscoveryError(f"cannot browse mDNS: {exc}") from None
        restrict_receive(self._zc.zeroconf, self.interfaces)

        def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
            now = time.time()
            if state_change is ServiceStateChange.Removed:
                self._queue.put_nowait(BrowseEvent("removed", name, None, now))
                return
            kind = "added" if state_change is ServiceStateChange.Added else "updated"
            task = asyncio.ensure_future(self._resolve(kind, name, now))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        # Multicast questions (QM): a unicast answer to port 5353 may land in another process's
        # socket on this host (SO_REUSEPORT), which cost ~1 s in tests.
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[on_change], question_type=DNSQuestionType.QM
        )
        return self

    async def _resolve(self, kind: Literal["added", "updated"], name: str, seen: float) -> None:
        from zeroconf import DNSQuestionType, IPVersion
        from zeroconf.asyncio import AsyncServiceInfo

        from lmlink.net.mdns import SERVICE_TYPE, parse_txt

        info = AsyncServiceInfo(SERVICE_TYPE, name)
        try:
            ok = await info.async_request(
                self._zc.zeroconf, int(self.resolve_timeout * 1000), question_type=DNSQuestionType.QM
            )
        except Exception:  # noqa: BLE001 - a malformed answer is just not an endpoint
            return
        if not ok:
            return
        server = parse_txt(
            name, info.properties or {}, info.port or 0,
            info.parsed_addresses(IPVersion.V4Only),
        )
        self._queue.put_nowait(BrowseEvent(kind, name, server, seen))

    async def events(self) -> AsyncIterator[BrowseEvent]:
        while True:
            yield await self._queue.get()

    async def next_event(self, timeout: float) -> BrowseEvent | None:
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()


# ----- discovery ---------------------------------------------------------------------------


def _peers(localapi_socket: str | None) -> tuple[list[Any] | None, str]:
    from lmlink.net.localapi import LocalAPI, LocalAPIError

    api = LocalAPI(localapi_socket)
    try:
        return api.peers(), ""
    except LocalAPIError as exc:
        return None, str(exc)
    finally:
        api.close()


def _apply_path(ep: Endpoint, peers: list[Any] | None, note: str) -> None:
    from lmlink.net.tailnet_discovery import path_for

    info = path_for(_split(ep.target)[0], peers, note=note)
    ep.path, ep.path_detail = info.kind, info.describe()
    ep.relay, ep.cur_addr = info.relay, info.cur_addr
    if info.peer:
        ep.peer, ep.tags = info.peer, info.tags


def _check_claims(ep: Endpoint, peers: list[Any] | None) -> str:
    """Why an mDNS answer must not be dialled at all, or ''."""
    from lmlink.net.mdns import is_tailnet_ip

    host = _split(ep.target)[0]
    if ep.path == "loopback":
        # Anyone on the LAN can answer "127.0.0.1:<port>". With a fingerprint, _confirm checks
        # it like any other; without (local mode: plaintext), the port must be held by one of
        # this user's own processes, or a LAN host could steer us to any local service.
        if ep.advertised_fingerprint or "configured" in ep.origins:
            return ""
        from lmlink.net.peercred import listener_uid

        uid = listener_uid(host, _split(ep.target)[1])
        if uid is None or uid != os.getuid():
            return (f"advertised loopback port {_split(ep.target)[1]} without a TLS fingerprint "
                    "is not held by a process of this user; ignoring the answer")
        return ""
    if not is_tailnet_ip(host):
        return f"advertised address {host} is not a tailnet address; lmlink never dials LAN addresses"
    if peers is not None and not ep.peer:
        return f"advertised address {host} is not a peer of this tailnet"
    if not ep.advertised_fingerprint:
        return "advertised no TLS fingerprint for a tailnet address"
    return ""


def _confirm(ep: Endpoint, timeout: float) -> dict[str, Any]:
    """Authenticated GetServerInfo; returns what the server itself says, as field changes.

    Runs in a worker thread and changes nothing itself: `check` applies the result on the
    event loop, so a check abandoned at the deadline cannot alter an endpoint mid-merge."""
    from lmlink.net.pinning import PinningError

    from .security import TrustError
    from .sync import Client

    expected = ep.advertised_fingerprint or None
    try:
        with Client(ep.target, timeout=timeout, expected_fingerprint=expected) as client:
            info = client.server_info()
            fingerprint = client.fingerprint
    except TrustError as exc:
        presented = getattr(exc, "presented", "")
        if expected:
            return {"status": "rejected", "error": (
                f"the certificate at {ep.target} ({presented or 'another one'}) does not match the "
                f"advertised fingerprint {expected}: spoofed or stale mDNS answer")}
        return {"status": "rejected", "error": str(exc)}
    except PermissionDenied as exc:
        return {"status": "denied", "error": str(exc)}
    except (LmlinkError, PinningError, OSError) as exc:  # OSError: e.g. the pin store unwritable
        return {"status": "unreachable", "error": str(exc) or type(exc).__name__}
    return {
        "status": "ok", "error": "", "fingerprint": fingerprint,
        "name": info.name or ep.name, "mode": info.listen_mode or ep.mode,
        "protocol": info.protocol_version, "models": tuple(info.models),
        "model_count": len(info.models), "state": ep.state or "ready",
    }


def _apply(ep: Endpoint, changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        setattr(ep, key, value)


async def adiscover(
    timeout: float | None = None,
    *,
    mdns: bool = True,
    tailnet: bool = True,
    configured: Sequence[str] = (),
    include_default: bool = True,
    settings: ClientSettings | None = None,
    verify: bool = True,
    direct_only: bool | None = None,
    localapi_socket: str | None = None,
    interfaces: list[str] | None = None,
    until: Callable[[list[Endpoint]], bool] | None = None,
) -> Discovery:
    """Listen `timeout` seconds (mDNS), ask LocalAPI for peers, confirm every candidate.

    `until(endpoints)` returning True stops listening early (e.g. once a best-rank endpoint
    is confirmed). Confirmation may add up to VERIFY_TIMEOUT seconds after listening stops, and
    FETCH_TIMEOUT more for a tailnet peer with no connection yet (first WireGuard handshake).
    """
    from lmlink.net.pinning import FETCH_TIMEOUT
    from lmlink.net.tailnet_discovery import tailnet_candidates

    settings = settings or load_settings()
    timeout = settings.discovery_timeout if timeout is None else timeout
    direct_only = settings.direct_only if direct_only is None else direct_only
    start = time.monotonic()
    found: dict[str, Endpoint] = {}
    pending: set[asyncio.Task[None]] = set()
    checking: dict[asyncio.Task[None], Endpoint] = {}
    notes: list[str] = []
    peers_task = asyncio.ensure_future(asyncio.to_thread(_peers, localapi_socket))

    async def check(ep: Endpoint) -> None:
        peers, note = await peers_task
        _apply_path(ep, peers, note)
        if "mdns" in ep.origins and ep.origin == "mdns":
            problem = _check_claims(ep, peers)
            if problem:
                ep.status, ep.error = "rejected", problem
                return
        if direct_only and ep.path == "relayed":
            ep.status, ep.error = "refused", refusal(ep)
            return
        if not verify:
            return
        # no connection to this peer yet: its first WireGuard handshake may need the retry
        bound = FETCH_TIMEOUT if ep.path == "idle" else VERIFY_TIMEOUT
        _apply(ep, await asyncio.to_thread(_confirm, ep, bound))
        if ep.path == "idle" and peers is not None:  # connecting may have set up a path
            peers, note = await asyncio.to_thread(_peers, localapi_socket)
            _apply_path(ep, peers, note)
        if ep.usable and direct_only and ep.path not in ("direct", "loopback"):
            ep.status, ep.error = "refused", refusal(ep)

    def add(ep: Endpoint) -> None:
        # mDNS answers are checked on their own (a spoofed answer may name a real address);
        # the rest are keyed by address. Agreeing confirmed entries are merged at the end.
        key = f"mdns:{ep.instance}" if ep.origin == "mdns" else ep.target
        if key in found:
            old = found[key]
            if ep.origin not in old.origins:
                old.origins = (*old.origins, ep.origin)
            return
        ep.found_after = round(time.monotonic() - start, 3)
        ep.origins = (ep.origin,)
        found[key] = ep
        task = asyncio.ensure_future(check(ep))
        pending.add(task)
        checking[task] = ep

    if tailnet:
        peers, note = await peers_task
        if peers is None:
            notes.append(f"tailnet: {note}")
        else:
            for c in tailnet_candidates(peers, port=settings.tailnet_port, tag=settings.tailnet_tag):
                add(Endpoint(c.target, "tailnet", name=c.peer.host_name, node=c.peer.name,
                             peer=c.peer.name, tags=c.peer.tags))
    for target in (*configured, *settings.servers, *((DEFAULT_LOCAL,) if include_default else ())):
        add(Endpoint(target, "configured"))

    browser_ifaces: list[str] = []
    if mdns:
        try:
            async with MdnsBrowser(interfaces) as browser:
                browser_ifaces = browser.interfaces
                deadline = start + timeout
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    if until is not None and until(list(found.values())):
                        break
                    ev = await browser.next_event(min(left, 0.05))
                    if ev is None or ev.kind == "removed" or ev.server is None:
                        continue
                    _add_advertised(ev.server, add)
        except DiscoveryError as exc:
            notes.append(f"mdns: {exc}")
    else:
        left = start + timeout - time.monotonic()
        while left > 0 and not (until is not None and until(list(found.values()))):
            await asyncio.sleep(min(left, 0.05))
            left = start + timeout - time.monotonic()
    if pending:
        await asyncio.wait(pending, timeout=VERIFY_TIMEOUT + 1.0)
        # A tailnet peer this device has no connection to yet may need WireGuard's handshake
        # retry (5 s) before it answers at all: give those the certificate fetch's own bound.
        first = [t for t in pending if not t.done() and checking[t].path == "idle"]
        if first:
            await asyncio.wait(first, timeout=FETCH_TIMEOUT)
    for task in pending:
        task.cancel()
    endpoints = merge_endpoints(list(found.values()))
    endpoints.sort(key=_order)
    return Discovery(endpoints, notes, round(time.monotonic() - start, 3), browser_ifaces)


def merge_endpoints(endpoints: list[Endpoint]) -> list[Endpoint]:
    """One entry per confirmed server address: a confirmed mDNS answer absorbs the tailnet or
    configured entry that reached the same address and certificate. A configured default with
    nothing behind it is dropped (it was never "found").

    Either check of a pair may be the one that did not finish (a loaded machine): an mDNS answer
    whose own check is unfinished or timed out is confirmed by a tailnet or configured entry
    that reached its address and was presented exactly the advertised certificate. A rejected
    answer (wrong fingerprint, LAN address) never is: it stays listed, apart."""
    out: list[Endpoint] = []
    confirmed = {e.target: e for e in endpoints if e.origin != "mdns" and e.usable and e.fingerprint}
    for e in endpoints:
        proof = confirmed.get(e.target) if e.origin == "mdns" else None
        if (proof is not None and e.status in ("unverified", "unreachable")
                and e.advertised_fingerprint == proof.fingerprint):
            _apply(e, {"status": "ok", "error": "", "fingerprint": proof.fingerprint,
                       "name": proof.name or e.name, "mode": proof.mode or e.mode,
                       "protocol": proof.protocol, "models": proof.models,
                       "model_count": proof.model_count, "state": e.state or "ready"})
    lan = {e.target: e for e in endpoints if e.origin == "mdns" and e.usable}
    for e in endpoints:
        twin = lan.get(e.target) if e.origin != "mdns" else None
        # Same address and certificate, or a check of the same address that merely did not
        # finish (slow machine): the confirmed mDNS entry already proves that server.
        if twin is not None and not (
            (e.usable and e.fingerprint == twin.fingerprint)
            or e.status in ("unverified", "unreachable")
        ):
            twin = None
        if twin is not None:
            twin.origins = (*twin.origins, *(o for o in e.origins if o not in twin.origins))
            twin.peer, twin.tags = twin.peer or e.peer, twin.tags or e.tags
            continue
        if e.origins == ("configured",) and e.target == DEFAULT_LOCAL and e.status == "unreachable":
            continue
        out.append(e)
    return out


def _add_advertised(server: Any, add: Callable[[Endpoint], None]) -> None:
    """An mDNS answer becomes an endpoint on its first advertised address."""
    if not server.targets:
        return
    target = server.targets[0]
    host, port = target.rpartition(":")[0].strip("[]"), target.rpartition(":")[2]
    http = ""
    if server.http_port:
        http = f"[{host}]:{server.http_port}" if ":" in host else f"{host}:{server.http_port}"
    if not port.isdigit():
        return
    add(Endpoint(
        target, "mdns", name=server.name, node=server.node, mode=server.mode, state=server.state,
        advertised_fingerprint=server.fingerprint, http=http,
        models=server.models or (), models_hash=server.models_hash,
        model_count=server.model_count, cluster_size=server.cluster_size,
        protocol=server.protocol, instance=server.instance,
    ))


def discover(timeout: float | None = None, **options: Any) -> Discovery:
    """Blocking `adiscover` (do not call from a running event loop; await `adiscover` there)."""
    return asyncio.run(adiscover(timeout, **options))


def best_found(endpoints: list[Endpoint]) -> bool:
    """An `until` for callers that want one server fast: a confirmed best-rank endpoint."""
    return any(e.usable and rank(e) == 0 for e in endpoints)


def find_server(
    *, timeout: float | None = None, direct_only: bool | None = None, model: str = "",
    localapi_socket: str | None = None, settings: ClientSettings | None = None,
) -> Endpoint:
    """Discover and select one server, stopping early once a best-rank one is confirmed."""
    settings = settings or load_settings()
    direct_only = settings.direct_only if direct_only is None else direct_only
    found = discover(
        timeout, settings=settings, direct_only=direct_only, localapi_socket=localapi_socket,
        until=best_found,
    )
    if not found.endpoints:
        raise DiscoveryError(
            f"no lmlink server found in {found.elapsed:.1f} s (mDNS on "
            f"{', '.join(found.interfaces) or 'no interface'}; tailnet peers tagged "
            f"{settings.tailnet_tag} or named lmlink*"
            + (f"; {'; '.join(found.notes)}" if found.notes else "")
            + "); pass --server HOST:PORT or set $LMLINK_SERVER"
        )
    return select_endpoint(found, direct_only=direct_only, model=model)


def check_path(target: str, *, direct_only: bool, localapi_socket: str | None = None) -> Any:
    """The path to a configured target; RelayedPathRefused under direct_only unless direct."""
    from lmlink.net.localapi import LocalAPI
    from lmlink.net.tailnet_discovery import path_to

    api = LocalAPI(localapi_socket)
    try:
        info = path_to(_split(target)[0], api)
    finally:
        api.close()
    if direct_only and info.kind not in ("direct", "loopback"):
        ep = Endpoint(target, "configured", path=info.kind, path_detail=info.describe(),
                      relay=info.relay, peer=info.peer)
        raise RelayedPathRefused(refusal(ep))
    return info
