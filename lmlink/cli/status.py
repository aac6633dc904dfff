"""`lmlink status` (one server's health and load) and `lmlink discover` (find servers)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from lmlink import defaults

from .common import EXIT_OK, CliError, add_server_flag, client, human_bytes, number


def add_parser(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="show a server's health, load and who you are to it")
    add_server_flag(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=run_status)

    discover = sub.add_parser(
        "discover",
        help="find lmlink servers on the LAN (mDNS) and among tailnet peers",
        description=(
            "Listen for _lmlink._tcp mDNS answers (loopback and LAN) and list tailnet peers "
            "tagged tag:lmlink or named lmlink*, confirm each with an authenticated "
            "GetServerInfo, and show where it was found and whether its tailnet path is direct "
            "or relayed. Exit 1 when no usable server is found (one line on stderr)."
        ),
    )
    discover.add_argument(
        "--timeout", type=number(0.0, 60.0, low_open=True), default=None, metavar="S",
        help="seconds to listen for mDNS answers, up to 60 (default: 2, or discovery_timeout "
        "in config.toml); confirming what was found may take up to 3 s more (15 s for a "
        "tailnet server this device has not connected to yet: its first WireGuard handshake)",
    )
    discover.add_argument("--json", action="store_true", help="print JSON")
    discover.add_argument("--direct-only", action="store_true",
                          help="mark servers reached through a DERP relay as refused")
    discover.add_argument(
        "--localapi-socket",
        default=os.environ.get(defaults.ENV_LOCALAPI_SOCKET),
        help=f"this device's Tailscale LocalAPI socket (env {defaults.ENV_LOCALAPI_SOCKET})",
    )
    discover.set_defaults(run=run_discover)


def run_status(args: argparse.Namespace) -> int:
    from lmlink.client.discovery import check_path

    with client(args) as c:
        health = c.health()
        info = c.server_info()
    path = check_path(c.target, direct_only=False)
    if args.json:
        route = {"kind": path.kind, "detail": path.describe(), "peer": path.peer,
                 "cur_addr": path.cur_addr, "relay": path.relay}
        print(json.dumps({"target": c.target, "health": health, **asdict(info),
                          "path": route}, indent=2))
        return EXIT_OK
    who = info.caller
    lines = [
        f"server     {info.name} at {c.target} ({info.listen_mode} mode)",
        f"path       {path.describe()}",
        f"health     {health}",
        f"version    lmlink {info.version}, protocol v{info.protocol_version}, {info.platform}",
        f"models     {', '.join(info.models) or '(none you may use)'}",
        f"load       {info.active_streams} active / {info.queued_requests} queued streams,"
        f" batch up to {info.max_batch_size}, {info.recent_tokens_per_second:.1f} tok/s now",
        f"served     {info.generated_tokens} tokens in {info.uptime_seconds:.0f} s uptime",
        f"you are    {who.login_name} via {who.source}" + (" (owner)" if who.is_owner else ""),
    ]
    if info.shortcut_url:
        lines.append(f"iPhone     {info.shortcut_url}" + (
            " (install the CA profile first: lmlink phone --serve-profile)"
            if info.shortcut_needs_profile else ""))
    if info.ranks:
        lines.append(f"cluster    {len(info.ranks)} ranks, {info.cluster_backend} backend, "
                     f"{info.cluster_sharding}-parallel")
        for r in info.ranks:
            seen = f", heard {r.seconds_since_heartbeat:.1f} s ago" if r.rank else ""
            lines.append(f"  rank {r.rank}   {r.host} ({r.address or 'local'}): {r.state}, "
                         f"{human_bytes(r.memory_bytes)} used, {r.tokens_per_second:.1f} tok/s"
                         f"{seen}")
    print("\n".join(lines))
    return EXIT_OK


def run_discover(args: argparse.Namespace) -> int:
    from lmlink.client.discovery import discover, load_settings

    settings = load_settings()
    direct_only = args.direct_only or settings.direct_only
    found = discover(args.timeout, settings=settings, direct_only=direct_only,
                     localapi_socket=args.localapi_socket)
    if args.json:
        print(json.dumps({
            "elapsed_seconds": found.elapsed,
            "mdns_interfaces": found.interfaces,
            "notes": found.notes,
            "endpoints": [e.to_dict() for e in found.endpoints],
        }, indent=2))
    else:
        rows = [("NAME", "ADDRESS", "FOUND VIA", "PATH", "MODELS", "STATUS")]
        for e in found.endpoints:
            models = ", ".join(e.models) if e.models else (f"{e.model_count} ({e.models_hash})"
                                                           if e.models_hash else "")
            status = e.status if e.usable else f"{e.status}: {e.error}"
            rows.append((e.name or e.peer or "?", e.target, "+".join(e.origins),
                         e.path_detail or e.path, models, status))
        if len(rows) > 1:
            widths = [max(len(r[i]) for r in rows) for i in range(5)]
            for r in rows:
                print("  ".join(col.ljust(w) for col, w in zip(r, widths)) + "  " + r[5])
        if found.usable:  # on failure the notes join the one error line instead
            for note in found.notes:
                print(f"note: {note}", file=sys.stderr)
    if not found.usable:
        notes = "".join(f"; {n}" for n in found.notes) if not args.json else ""
        if found.endpoints:
            raise CliError(f"no usable lmlink server among {len(found.endpoints)} found{notes}")
        raise CliError(
            f"no lmlink server found in {found.elapsed:.1f} s (mDNS on "
            f"{', '.join(found.interfaces) or 'no interface'}, tailnet peers tagged "
            f"{settings.tailnet_tag} or named lmlink*){notes}"
        )
    return EXIT_OK
