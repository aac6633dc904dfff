"""`lmlink link` settings: `<config dir>/link.toml` (written by `lmlink link prefer`).

    port = 47472                      # loopback port of the OpenAI-compatible endpoint
    servers = ["studio.tail1234.ts.net:47470"]   # dialled besides the discovered ones
    discovery = true                  # mDNS + tailnet peers (lmlink.client.discovery)

    [prefer]                          # model -> preferred server (name or HOST:PORT)
    "qwen-7b" = "studio"

Servers in `config.toml` (`servers = [...]`) and `$LMLINK_SERVER` are dialled too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmlink import defaults
from lmlink.client.errors import LmlinkError

LINK_FILE = "link.toml"
DEFAULT_PORT = defaults.LINK_PORT  # `--port 1234` for tools preconfigured for LM Studio's server
DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class LinkConfig:
    port: int = DEFAULT_PORT
    servers: tuple[str, ...] = ()
    discovery: bool = True
    prefer: dict[str, str] = field(default_factory=dict)
    path: Path | None = None


def config_path(config_dir: str | os.PathLike[str] | None = None) -> Path:
    from lmlink.net.pinning import default_config_dir

    return (Path(config_dir) if config_dir else default_config_dir()) / LINK_FILE


def load_link_config(config_dir: str | os.PathLike[str] | None = None) -> LinkConfig:
    import tomllib

    path = config_path(config_dir)
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return LinkConfig(path=path)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LmlinkError(f"cannot read {path}: {exc}") from None
    cfg = LinkConfig(path=path)
    try:
        if "port" in data:
            if not isinstance(data["port"], int) or not 0 <= data["port"] < 65536:
                raise ValueError("port must be a port number")
            cfg = replace(cfg, port=data["port"])
        if "servers" in data:
            servers = data["servers"]
            if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
                raise ValueError('servers must be a list of "HOST:PORT" strings')
            cfg = replace(cfg, servers=tuple(servers))
        if "discovery" in data:
            if not isinstance(data["discovery"], bool):
                raise ValueError("discovery must be true or false")
            cfg = replace(cfg, discovery=data["discovery"])
        prefer = data.get("prefer", {})
        if not isinstance(prefer, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prefer.items()
        ):
            raise ValueError('[prefer] must map model names to server names ("model" = "server")')
        cfg = replace(cfg, prefer=dict(prefer))
    except ValueError as exc:
        raise LmlinkError(f"{path}: {exc}") from None
    return cfg


def save_link_config(cfg: LinkConfig, config_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write link.toml (0600 dir as for the rest of the client config)."""
    from lmlink.net.files import private_dir, write_private

    path = cfg.path or config_path(config_dir)
    if not path.parent.exists():
        private_dir(path.parent)
    q = json.dumps  # a JSON string is a valid TOML basic string
    lines = ["# lmlink link settings (see `lmlink link --help`)", f"port = {cfg.port}",
             f"servers = [{', '.join(q(s) for s in cfg.servers)}]",
             f"discovery = {'true' if cfg.discovery else 'false'}", "", "[prefer]"]
    lines += [f"{q(model)} = {q(server)}" for model, server in sorted(cfg.prefer.items())]
    write_private(path, ("\n".join(lines) + "\n").encode())
    return path


def set_preference(model: str, server: str | None,
                   config_dir: str | os.PathLike[str] | None = None) -> LinkConfig:
    """`lmlink link prefer MODEL SERVER` (server None: forget the preference)."""
    cfg = load_link_config(config_dir)
    prefer = dict(cfg.prefer)
    if server is None:
        prefer.pop(model, None)
    else:
        prefer[model] = server
    cfg = replace(cfg, prefer=prefer)
    save_link_config(cfg, config_dir)
    return cfg
