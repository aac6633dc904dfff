"""`lmlink models [list|load|unload]`: what a server serves, and (owner) changing it."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from .common import EXIT_OK, add_server_flag, client, human_bytes, non_negative, usage_error


def add_parser(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser(
        "models", help="list the models on a server; load or unload them (owner only)",
        description="list: loaded, loading and available models with memory. load MODEL: load "
        "an available model id, a model directory on the server or a Hugging Face id, showing "
        "progress (refused if it would not fit in memory). unload MODEL: stop serving it; its "
        "running streams are waited for (--drain-timeout) then cancelled, or cancelled at once "
        "with --cancel-streams.",
    )
    models.add_argument("action", nargs="?", choices=("list", "load", "unload"), default="list")
    models.add_argument("name", nargs="?", help="the model to load or unload")
    add_server_flag(models)
    models.add_argument("--json", action="store_true", help="print JSON")
    models.add_argument("--default", action="store_true", help="load: make it the default model")
    models.add_argument("--idle-ttl", type=non_negative, default=0.0, metavar="S",
                        help="load: unload after S idle seconds (0 = the server's --idle-ttl)")
    models.add_argument("--cancel-streams", action="store_true",
                        help="unload: cancel running streams at once instead of waiting")
    models.add_argument("--drain-timeout", type=non_negative, default=0.0, metavar="S",
                        help="unload: wait up to S seconds for running streams (default 30)")
    models.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.action in ("load", "unload"):
        return _manage(args)
    if args.name:
        raise usage_error(f"unexpected argument {args.name!r} (did you mean 'load {args.name}'?)")
    with client(args) as c:
        models = c.list_models()
    if args.json:
        print(json.dumps([asdict(m) for m in models], indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "aliases", "state", "context", "memory", "default", "source")
    for m in models:
        table.add_row(m.id, ", ".join(m.aliases), m.state, str(m.context_length),
                      human_bytes(m.memory_bytes), "yes" if m.is_default else "", m.source)
    Console().print(table)
    return EXIT_OK


def _manage(args: argparse.Namespace) -> int:
    from lmlink.client import ModelInfo

    if not args.name or not args.name.strip():
        raise usage_error(f"name the model to {args.action}: lmlink models {args.action} MODEL")
    with client(args) as c:
        if args.action == "unload":
            result = c.unload_model(args.name, cancel_streams=args.cancel_streams,
                                    drain_timeout=args.drain_timeout)
            if args.json:
                print(json.dumps(asdict(result)))
            else:
                print(f"unloaded {result.model}: freed {human_bytes(result.freed_bytes)}, "
                      f"{result.drained_streams} stream(s) finished, "
                      f"{result.cancelled_streams} cancelled")
            return EXIT_OK
        for event in c.load_model(args.name, make_default=args.default, idle_ttl=args.idle_ttl):
            if args.json:
                kind = "loaded" if isinstance(event, ModelInfo) else "progress"
                print(json.dumps({"event": kind, **asdict(event)}), flush=True)
            elif isinstance(event, ModelInfo):
                print(f"loaded {event.id} ({human_bytes(event.memory_bytes)}, context "
                      f"{event.context_length})")
            else:
                print(f"[{event.fraction * 100:3.0f}%] {event.message}", file=sys.stderr,
                      flush=True)
    return EXIT_OK
