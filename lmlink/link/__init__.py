"""The laptop side: `lmlink link` serves remote lmlink models on a loopback OpenAI endpoint.

- `config`: link.toml (port, extra servers, discovery, per-model preferred servers)
- `router`: which server answers a request (preference, path, latency, load), probing
- `app`: the Starlette app that forwards OpenAI requests over lmlink's gRPC client
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from lmlink import defaults

from .config import DEFAULT_HOST, DEFAULT_PORT, LinkConfig, load_link_config, set_preference
from .router import Router, Server


class LinkError(Exception):
    """An expected reason `lmlink link` cannot run (port taken, non-loopback host)."""


@dataclass
class LinkOptions:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    servers: tuple[str, ...] = ()
    discovery: bool = True
    prefer: dict[str, str] = field(default_factory=dict)
    refresh_interval: float = 2.0
    status_line: bool = True  # a live one-line status on stderr (when it is a terminal)
    # Browser UIs (origins like "http://localhost:3000") allowed to call the link.
    allowed_origins: tuple[str, ...] = field(default_factory=lambda: tuple(
        o.strip() for o in os.environ.get(defaults.ENV_ALLOWED_ORIGINS, "").split(",") if o.strip()))


@dataclass
class RunningLink:
    url: str
    router: Router
    stopped: asyncio.Event


async def run_link(options: LinkOptions, *,
                   on_ready: Callable[[RunningLink], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or `stopped` is set)."""
    from lmlink.api.http_shell import HttpListener, bind_socket
    from lmlink.client.security import is_loopback_host

    from .app import LinkApp

    if not is_loopback_host(options.host):
        raise LinkError(f"lmlink link listens on loopback only, not {options.host}")
    try:
        sock = bind_socket(options.host, options.port)
    except OSError as exc:
        raise LinkError(f"cannot listen on {options.host}:{options.port}: {exc.strerror}") from None
    router = Router(options.servers, prefer=options.prefer, discovery=options.discovery,
                    refresh_interval=options.refresh_interval)
    from .config import config_path

    router.prefs_file = config_path()
    link = LinkApp(router, allowed_origins=options.allowed_origins)
    from lmlink.net.httpserver import uvicorn_options

    listener = HttpListener(link.app(), sock, None, uvicorn_options())  # head caps, timeouts
    await router.start()
    await listener.start()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stopped.set)
    url = f"http://{listener.address}/v1"
    ticker = None
    if options.status_line:
        ticker = asyncio.ensure_future(_status_line(link, url, stopped))
    try:
        if on_ready:
            on_ready(RunningLink(url, router, stopped))
        await stopped.wait()
    finally:
        if ticker is not None:
            ticker.cancel()
        await listener.stop()
        await router.aclose()


def status_text(link: object, url: str) -> str:
    from .app import LinkApp

    assert isinstance(link, LinkApp)
    servers = list(link.router.servers.values())
    up = [s for s in servers if s.up]
    parts = [f"{s.label} {s.latency_ms:.0f}ms {len(s.models)}m {s.active}a" for s in up]
    down = [s.label for s in servers if not s.up]
    st = link.stats
    text = (f"lmlink link {url}  {len(up)}/{len(servers)} up"
            + (f" [{', '.join(parts)}]" if parts else "")
            + (f" down: {', '.join(down)}" if down else "")
            + f"  req {st.requests} active {st.active} failover {st.failovers}")
    return text


async def _status_line(link: object, url: str, stopped: asyncio.Event) -> None:
    """A live status line on a terminal; a line per change otherwise (e.g. under launchd)."""
    tty = sys.stderr.isatty()
    last = ""
    while not stopped.is_set():
        text = status_text(link, url)
        if tty:
            width = os.get_terminal_size(sys.stderr.fileno()).columns if tty else 200
            sys.stderr.write("\r\x1b[2K" + text[: max(20, width - 1)])
            sys.stderr.flush()
        else:
            summary = text.split("  req ")[0]
            if summary != last:
                print(time.strftime("%H:%M:%S ") + summary, file=sys.stderr, flush=True)
                last = summary
        await asyncio.sleep(1.0)


__all__ = ["LinkConfig", "LinkError", "LinkOptions", "Router", "RunningLink", "Server",
           "load_link_config", "run_link", "set_preference"]
