"""`--listen tsnet` fallback: an embedded tailnet node inside the process, via tailscale-py.

Used only when no `tailscaled` binary is available: lmlink.net.tsnet_child (a private
userspace tailscaled) is preferred because it sees WhoIs users and grants; this one does not.

tailscale-py (tailscale-rs bindings, alpha) needs Python >= 3.12, so it is an optional extra
(`pip install 'lmlink[tsnet]'`) imported only when this mode is used; without it, every entry
point raises `TsnetUnavailable` with a one-line reason instead of an ImportError.

API used (tailscale-py 0.6): `await tailscale.connect(key_file_path, auth_key, *,
control_server_url=, hostname=, tags=, ephemeral=)` -> Device; `Device.ipv4_addr()`,
`ipv6_addr()`, `tcp_listen((ip, port))` -> TcpListener (`accept()` -> TcpStream with
`recv()`, `send()`, `remote_addr()`), `peer_by_tailnet_ip(ip)` -> dict (id, stable_id,
hostname, tailnet, tags, tailnet_addresses, ...). It has no WhoIs user profile and no CapMap
yet: a tsnet caller's identity is its node (name, tags, addresses), so access comes from the
owner-less path only: local shares keyed by node name or tag (`Policy.local_grants`).

The node's state is one key file, `<state_dir>/tsnet-keys.json` (0600, dir 0700). The auth
key comes from a file or `$TS_AUTHKEY`; the control URL may point at Headscale.
lmlink's tests never join a control plane with it (tailscale-py needs a control server with a
public certificate); the real-tailnet tests use the tailscaled child instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from lmlink.access.identity import Identity
from lmlink.net.relay import Relay
from lmlink.net.files import private_dir

log = logging.getLogger(__name__)

AUTHKEY_ENV = "TS_AUTHKEY"
KEY_FILE = "tsnet-keys.json"
MIN_PYTHON = (3, 12)


class TsnetUnavailable(RuntimeError):
    """tsnet mode cannot run here (Python too old, tailscale-py missing, join failed)."""


def import_tailscale() -> ModuleType:
    """Import tailscale-py, or explain in one line why tsnet mode is unavailable."""
    if sys.version_info < MIN_PYTHON:
        raise TsnetUnavailable(
            f"--listen tsnet needs Python >= 3.12 for tailscale-py (this is "
            f"{sys.version_info.major}.{sys.version_info.minor}); use --listen tailscaled with "
            "the Tailscale app/daemon, or run lmlink under Python 3.12+ with lmlink[tsnet]"
        )
    try:
        import tailscale  # type: ignore[import-not-found]
    except ImportError:
        raise TsnetUnavailable(
            "--listen tsnet needs tailscale-py: pip install 'lmlink[tsnet]'"
        ) from None
    if not hasattr(tailscale, "connect"):
        raise TsnetUnavailable("the installed 'tailscale' module is not tailscale-py (no connect())")
    return tailscale


def load_auth_key(auth_key_file: str | os.PathLike[str] | None = None,
                  env: Mapping[str, str] | None = None) -> str | None:
    """The auth key from `auth_key_file` (first line) or $TS_AUTHKEY; None if neither is set."""
    env = os.environ if env is None else env
    if auth_key_file is not None:
        path = Path(auth_key_file)
        try:
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                log.warning("auth key file %s is readable by others; chmod 600 it", path)
            key = path.read_text().strip().splitlines()
        except OSError as e:
            raise TsnetUnavailable(f"cannot read auth key file {path}: {e.strerror or e}") from None
        if not key or not key[0].strip():
            raise TsnetUnavailable(f"auth key file {path} is empty")
        return key[0].strip()
    value = env.get(AUTHKEY_ENV, "").strip()
    return value or None


@dataclass(frozen=True)
class TsnetConfig:
    """How to join: node hostname, where its keys live, and (optionally) auth key and control."""

    hostname: str
    state_dir: Path
    auth_key: str | None = field(default=None, repr=False)  # never logged
    control_url: str | None = None  # e.g. a Headscale URL; None = Tailscale's default
    tags: tuple[str, ...] = ()
    ephemeral: bool = False
    join_timeout: float = 60.0

    @property
    def key_file(self) -> Path:
        return self.state_dir / KEY_FILE


def _identity_from_node(info: Mapping[str, Any]) -> Identity:
    """tailscale-py NodeInfo dict -> Identity (node-level only: no user, no CapMap)."""
    hostname = str(info.get("hostname") or "")
    tailnet = str(info.get("tailnet") or "")
    name = f"{hostname}.{tailnet}" if hostname and tailnet and "." not in hostname else hostname
    return Identity(
        login_name="",
        source="tailnet",
        node_name=name.rstrip("."),
        tags=tuple(str(t) for t in info.get("tags") or ()),
        addresses=tuple(str(a) for a in info.get("tailnet_addresses") or ()),
        is_owner=False,
    )


class TsnetNode:
    """A joined embedded node: its addresses, its listeners, and peer lookup for the relay."""

    def __init__(self, device: Any, config: TsnetConfig) -> None:
        self.device = device
        self.config = config

    @classmethod
    async def start(cls, config: TsnetConfig, *, module: ModuleType | None = None) -> TsnetNode:
        """Join the tailnet (or resume from the key file); raises TsnetUnavailable on failure."""
        ts = module or import_tailscale()
        private_dir(config.state_dir)
        kwargs: dict[str, Any] = {"hostname": config.hostname, "ephemeral": config.ephemeral}
        if config.control_url:
            kwargs["control_server_url"] = config.control_url
        if config.tags:
            kwargs["tags"] = list(config.tags)
        try:
            device = await asyncio.wait_for(
                ts.connect(str(config.key_file), config.auth_key, **kwargs), config.join_timeout
            )
        except asyncio.TimeoutError:
            raise TsnetUnavailable(
                f"could not join the tailnet within {config.join_timeout:.0f} s "
                f"(control {config.control_url or 'default'}; auth key "
                f"{'given' if config.auth_key else 'missing'})"
            ) from None
        except (ValueError, OSError, RuntimeError) as e:
            raise TsnetUnavailable(f"tailscale-py could not join the tailnet: {e}") from None
        finally:
            if config.key_file.exists():  # tailscale-py writes it 0644; it holds private keys
                os.chmod(config.key_file, 0o600)
        return cls(device, config)

    async def addresses(self) -> list[str]:
        """This node's tailnet IPs (IPv4 first)."""
        out = [str(await self.device.ipv4_addr())]
        try:
            out.append(str(await self.device.ipv6_addr()))
        except Exception:  # IPv6 is optional
            pass
        return out

    async def whois(self, ip: str, port: int) -> Identity | None:
        """The relay's resolver: the peer node behind a tailnet IP, None if unknown."""
        try:
            info = await self.device.peer_by_tailnet_ip(ip)
        except Exception as e:
            log.info("tsnet peer lookup for %s failed: %s", ip, e)
            return None
        if not info:
            return None
        return _identity_from_node(info)

    async def serve(self, relay: Relay, port: int) -> None:
        """Listen on every tailnet address of this node and relay until cancelled."""
        listeners = [await self.device.tcp_listen((ip, port)) for ip in await self.addresses()]
        log.info("tsnet node %s listening on port %d", self.config.hostname, port)
        await asyncio.gather(*(relay.serve_listener(lst) for lst in listeners))
