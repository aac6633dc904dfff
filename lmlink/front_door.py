"""How callers reach a running server, per listen mode.

`local`: the gRPC and HTTP servers bind loopback directly, plaintext; the server's own Unix
user is the owner, other local users are not (`LocalUserGate`).
`tailscaled` / `tsnet`: the servers listen with TLS on unix sockets in a private directory
(`lmlink.net.inner`), and a relay on the tailnet addresses accepts connections, asks WhoIs who
the peer is, refuses strangers, and pipes the still-encrypted bytes inward while
`PeerIdentities` tells the servicers who is calling.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

from lmlink import defaults
from lmlink.access.identity import Identity
from lmlink.api.gate import LoopbackGate

log = logging.getLogger("lmlink.server")
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class FrontDoorError(Exception):
    """The listen mode cannot be set up (no tailnet, bad address); one-line reason."""


def default_state_dir() -> Path:
    """$LMLINK_STATE_DIR, else the platform's per-user state/app-support directory."""
    if os.environ.get(defaults.ENV_STATE_DIR):
        return Path(os.environ[defaults.ENV_STATE_DIR])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "lmlink"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "lmlink"


@dataclass
class TailnetSettings:
    state_dir: Path = field(default_factory=default_state_dir)
    localapi_socket: str | None = None
    require_client_cert: bool = False
    tsnet_hostname: str = "lmlink"
    tsnet_auth_key_file: str | None = None
    tsnet_control_url: str | None = None


@dataclass
class FrontDoor:
    """What serve needs from a listen mode: who a transport peer is, how to bind, and how
    to expose ports. Grants are not the door's business: the access guard decides those."""

    mode: str
    # The identity behind a transport peer (grpc `context.peer()` form), None for strangers.
    identify: Callable[[str], Identity | None]
    bind_host: str
    grpc_credentials: grpc.ServerCredentials | None = None
    http_tls_files: tuple[Path, Path] | None = None
    http_client_ca: Path | None = None  # --require-client-cert: the HTTP bridge requires it too
    inner: Any = None  # tailnet modes: lmlink.net.inner.InnerHop, the servers' private sockets
    fingerprint: str = ""
    public_hosts: list[str] = field(default_factory=list)
    # Ask the tailnet again who a caller is (grants change while connections stay open).
    refresh: Callable[[Identity], Awaitable[Identity | None]] | None = None
    owner_login: str = "local"  # whom an owner-bound bearer token names
    tls: Any = None  # lmlink.net.tls.ServerTLS in tailnet modes (what phones are told)
    _expose: Callable[[int, int], Awaitable[list[str]]] | None = None
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _tmp: Any = None

    async def expose(self, internal_port: int | str, public_port: int) -> str:
        """The public address for a server bound at `internal_port` (relayed in tailnet modes;
        then `internal_port` is the inner unix socket path)."""
        if self._expose is None:
            host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
            return f"{host}:{internal_port}"
        return ", ".join(await self._expose(internal_port, public_port))

    async def aclose(self) -> None:
        for close in reversed(self._closers):
            await close()
        if self._tmp is not None:
            self._tmp.cleanup()


class LocalUserGate(LoopbackGate):
    """Local mode: the server's own user is the owner; other users of the machine are not.

    Loopback is reachable by every account on the machine. On Linux the kernel tells which
    uid holds the client end of each loopback connection (lmlink.net.peercred); a caller of
    another uid gets a non-owner identity ("uid:N"), which has no grants unless the owner
    shares with it. Where the kernel cannot tell (macOS), every local caller stays the owner
    (see README, Security).
    """

    def identify(self, peer: str) -> Identity | None:
        from lmlink.access.identity import loopback_owner
        from lmlink.api.gate import is_loopback_peer
        from lmlink.net import peercred

        if not is_loopback_peer(peer):
            return None
        if peer.startswith("unix:") or not peercred.supported():
            return loopback_owner()
        uid = peercred.loopback_caller_uid(peer)
        if uid is not None and uid == os.getuid():
            return loopback_owner()
        who = f"uid:{uid}" if uid is not None else "uid:unknown"
        return Identity(login_name=who, display_name="another local user", source="loopback")


def local_door(host: str) -> FrontDoor:
    if host not in LOOPBACK_HOSTS:
        raise FrontDoorError(f"local mode only listens on loopback, not {host!r}")
    from lmlink.net import peercred

    if not peercred.supported():
        log.warning("local mode: this platform cannot tell which local user connects; every "
                    "local process is treated as the owner")
    return FrontDoor("local", LocalUserGate().identify, host)


async def tailnet_door(mode: str, settings: TailnetSettings) -> FrontDoor:
    """Set up TLS material, identities and the relay for `tailscaled` or `tsnet` mode."""
    from lmlink.net.listeners import ListenError, tailnet_ips, tailscaled_bind_hosts
    from lmlink.net.localapi import LocalAPI, LocalAPIError
    from lmlink.net.inner import InnerHop
    from lmlink.net.relay import PeerIdentities, Relay, WhoIsPool
    from lmlink.net.tls import TLSMaterialError, server_credentials, server_tls

    identities = PeerIdentities()
    pool: WhoIsPool | None = None
    resolve: Callable[[str, int], Awaitable[Identity | None]]
    closers: list[Callable[[], Awaitable[None]]] = []
    node: Any = None
    refresh: Callable[[Identity], Awaitable[Identity | None]]
    owner_login = ""
    try:
        socket_path = settings.localapi_socket
        if mode == "tsnet":  # a private tailscaled child when one can run (sees grants)
            from lmlink.net.tsnet_child import ChildConfig, TailscaledChild, find_tailscaled

            binaries = find_tailscaled()
            if binaries is not None:
                child = await TailscaledChild.start(ChildConfig(
                    hostname=settings.tsnet_hostname, state_dir=settings.state_dir / "tsnet",
                    auth_key_file=settings.tsnet_auth_key_file,
                    auth_key=os.environ.get("TS_AUTHKEY") or None,
                    control_url=settings.tsnet_control_url), binaries)
                closers.append(child.aclose)
                socket_path, mode = str(child.socket), "tsnet-child"
        if mode in ("tailscaled", "tsnet-child"):
            api = LocalAPI(socket_path)
            me = api.self_node()
            hosts = tailscaled_bind_hosts(api)  # loopback under userspace-networking tailscaled
            public = tailnet_ips(api)  # what clients dial (and the certificate names)
            tls = server_tls(settings.state_dir, [me.dns_name, *public], localapi=api)
            pool = WhoIsPool(api.whois)  # not the default executor (see WhoIsPool)
            resolve = pool
            owner_login = "" if me.is_tagged else me.login_name

            async def refresh(identity: Identity) -> Identity | None:
                return await api.awhois(identity.addresses[0])
        elif mode == "tsnet":
            from lmlink.net.tsnet import TsnetConfig, TsnetNode, load_auth_key

            config = TsnetConfig(
                hostname=settings.tsnet_hostname,
                state_dir=settings.state_dir / "tsnet",
                auth_key=load_auth_key(settings.tsnet_auth_key_file),
                control_url=settings.tsnet_control_url,
            )
            node = await TsnetNode.start(config)
            hosts = await node.addresses()
            public = list(hosts)
            tls = server_tls(settings.state_dir, [settings.tsnet_hostname, *hosts])
            resolve = node.whois

            async def refresh(identity: Identity) -> Identity | None:
                return await node.whois(identity.addresses[0], 0)
        else:
            raise FrontDoorError(f"unknown listen mode {mode!r}")
    except Exception as exc:
        from lmlink.net.tsnet import TsnetUnavailable
        from lmlink.net.tsnet_child import ChildUnavailable

        for close in closers:
            await close()
        if isinstance(exc, (TsnetUnavailable, ChildUnavailable, LocalAPIError, ListenError,
                            TLSMaterialError)):
            raise FrontDoorError(str(exc)) from None
        raise
    mode = "tsnet" if mode == "tsnet-child" else mode

    tmp = tempfile.TemporaryDirectory(prefix="lmlink-tls-")
    os.chmod(tmp.name, 0o700)
    http_files = tls.write_files(tmp.name)
    client_ca = None
    if settings.require_client_cert:
        client_ca = Path(tmp.name) / "client-ca.pem"
        client_ca.write_bytes(tls.client_ca_pem)
    inner = InnerHop(Path(tmp.name) / "inner")
    if pool is not None:
        closers.append(pool.aclose)

    async def expose(internal: int | str, public_port: int) -> list[str]:
        relay = Relay(internal if isinstance(internal, str) else ("127.0.0.1", internal),
                      resolve, identities)
        closers.append(relay.aclose)
        if node is not None:
            import asyncio

            task = asyncio.ensure_future(node.serve(relay, public_port))

            async def stop_task() -> None:
                task.cancel()

            closers.append(stop_task)
            return [f"{h}:{public_port}" for h in hosts]
        try:
            bound = await relay.listen(hosts, public_port)
        except ListenError as exc:  # e.g. the public port is taken on a tailnet address
            raise FrontDoorError(str(exc)) from None
        except OSError as exc:
            raise FrontDoorError(f"cannot listen on port {public_port}: {exc.strerror}") from None
        port = bound[0][1]  # shared by every bound host; the tailnet forwards to the same port
        return [f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in public]

    return FrontDoor(
        mode=mode,
        identify=identities.lookup,
        bind_host="127.0.0.1",
        grpc_credentials=server_credentials(tls, require_client_cert=settings.require_client_cert),
        http_tls_files=http_files,
        http_client_ca=client_ca,
        inner=inner,
        fingerprint=tls.fingerprint,
        public_hosts=list(public),
        refresh=refresh,
        owner_login=owner_login or "owner",
        tls=tls,
        _expose=expose,
        _closers=closers,
        _tmp=tmp,
    )
