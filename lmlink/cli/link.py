"""`lmlink link`: a loopback OpenAI-compatible endpoint in front of remote lmlink servers."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lmlink import defaults

from .common import EXIT_OK, CliError, env_server, host_port, number, port, usage_error


def add_parser(sub: argparse._SubParsersAction) -> None:
    link = sub.add_parser(
        "link",
        help="serve remote models on a loopback OpenAI-compatible endpoint (laptop side)",
        description="Serve /v1/models, /v1/chat/completions and /v1/completions on loopback, "
        "forwarding each request over gRPC to the best reachable lmlink server that has the "
        "model (your preference, else path, latency and load), with one retry before the "
        "first token. 'lmlink link prefer MODEL SERVER' stores a preferred server for a model "
        "('--clear' forgets it); 'lmlink link prefs' lists them.",
    )
    link.add_argument("action", nargs="?", choices=("prefer", "prefs"), default=None)
    link.add_argument("words", nargs="*", help="prefer: MODEL SERVER")
    link.add_argument("--port", type=port, default=None,
                      help=f"loopback port (default {defaults.LINK_PORT} or port in link.toml; "
                      "1234 for tools preconfigured for LM Studio)")
    link.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    link.add_argument("--server", action="append", default=[], metavar="HOST:PORT", type=host_port,
                      help="a server to use (repeatable), besides link.toml, config.toml, "
                      f"${defaults.ENV_SERVER} and discovery")
    link.add_argument("--no-discovery", action="store_true",
                      help=f"only use the servers given, configured or in ${defaults.ENV_SERVER}")
    link.add_argument("--refresh", type=number(0.2, 3600.0), default=2.0, metavar="S",
                      help="probe servers every S seconds, 0.2-3600 (default 2)")
    link.add_argument("--clear", action="store_true", help="prefer: forget the preference")
    link.add_argument("--json", action="store_true",
                      help="print one JSON line when ready, no status line (scripts, services)")
    link.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from lmlink.client.discovery import load_settings
    from lmlink.link import LinkError, LinkOptions, RunningLink, load_link_config, run_link
    from lmlink.link.config import set_preference

    if args.action == "prefer":
        if len(args.words) != (1 if args.clear else 2):
            raise usage_error("usage: lmlink link prefer MODEL SERVER (or MODEL --clear)")
        cfg = set_preference(args.words[0], None if args.clear else args.words[1])
        print(f"{args.words[0]} -> {cfg.prefer.get(args.words[0], '(automatic)')} "
              f"(saved in {cfg.path})")
        return EXIT_OK
    if args.words:
        raise usage_error(f"unexpected arguments: {' '.join(args.words)}")
    cfg = load_link_config()
    if args.action == "prefs":
        print(json.dumps(cfg.prefer, indent=2) if args.json else
              "\n".join(f"{m} -> {s}" for m, s in sorted(cfg.prefer.items())) or "(none)")
        return EXIT_OK
    settings = load_settings()
    env = env_server()
    servers = tuple(dict.fromkeys([*args.server, *((env,) if env else ()), *cfg.servers,
                                   *settings.servers]))
    options = LinkOptions(
        host=args.host, port=args.port if args.port is not None else (cfg.port or defaults.LINK_PORT),
        servers=servers, discovery=cfg.discovery and not args.no_discovery, prefer=cfg.prefer,
        refresh_interval=args.refresh, status_line=not args.json,
    )
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def on_ready(running: RunningLink) -> None:
        up = [s.label for s in running.router.servers.values() if s.up]
        if args.json:
            print(json.dumps({"event": "ready", "url": running.url, "servers_up": up}), flush=True)
        else:
            print(f"lmlink link: OpenAI-compatible endpoint at {running.url} "
                  f"({len(up)} server(s) up). Ctrl-C to stop.", file=sys.stderr)

    try:
        asyncio.run(run_link(options, on_ready=on_ready))
    except LinkError as exc:
        raise CliError(str(exc)) from None
    print(file=sys.stderr)
    return EXIT_OK
