"""`lmlink top`: a live terminal view of a server (models, streams, rates, ranks, refusals).

Reads the same snapshot as the status page, over gRPC (`lmlink.v1.Observe/GetStatus`), once a
second; works over SSH. `--once` prints one frame (or `--json` one snapshot) and exits.
"""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

SPARK = " ▁▂▃▄▅▆▇█"


def sparkline(samples: list[dict[str, Any]], width: int = 30) -> str:
    values = [float(s.get("tokens_per_second", 0.0)) for s in samples][-width:]
    if not values:
        return ""
    top = max(values) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, round(v / top * (len(SPARK) - 1)))] for v in values)


def render(status: dict[str, Any]) -> Group:
    """One frame: a header line and a table per section (empty sections say so)."""
    head = Text.assemble(("lmlink ", "bold"), (status.get("server", ""), "cyan"),
                         f"  up {int(float(status.get('uptime_seconds', 0)))} s")
    if status.get("draining"):
        head.append("  DRAINING", style="bold red")
    models = Table("model", "state", "active", "queued", "tok/s", "memory MB", title="models",
                   title_justify="left", expand=True)
    for m in status.get("models", []):
        models.add_row(m["name"], m["state"], str(m.get("active", 0)), str(m.get("queued", 0)),
                       f"{float(m.get('tokens_per_second', 0)):.1f}",
                       f"{int(m.get('memory_bytes', 0)) / 1e6:.0f}")
    active = Table("who", "model", "door", "seconds", title="active streams", title_justify="left",
                   expand=True)
    for a in status.get("active", []):
        active.add_row(a["principal"], a["model"], a["door"], f"{float(a['seconds']):.0f}")
    parts: list[Any] = [head, models, active]
    line = sparkline(status.get("tokens_per_second", []))
    if line:
        parts.append(Text(f"tokens/s, last minutes: {line}"))
    if status.get("ranks"):
        ranks = Table("rank", "host", "state", "heartbeat s", title="cluster", title_justify="left",
                      expand=True)
        for r in status["ranks"]:
            ranks.add_row(str(r["rank"]), r["host"], r["state"], f"{float(r['seconds_since_heartbeat']):.1f}")
        parts.append(ranks)
    refusals = status.get("recent_refusals", [])[:5]
    if refusals:
        table = Table("when", "who", "why", title="recent refusals", title_justify="left", expand=True)
        for r in refusals:
            table.add_row(time.strftime("%H:%M:%S", time.localtime(float(r["at"]))), r["principal"], r["reason"])
        parts.append(table)
    return Group(*parts)


def as_json(status: dict[str, Any]) -> str:
    return json.dumps(status, sort_keys=True)


def add_parser(sub: Any) -> None:
    from .common import add_server_flag, number

    top = sub.add_parser(
        "top",
        help="a live view of a server: models, streams per user, tokens/s, ranks, refusals",
        description="Poll a server's status over gRPC (lmlink.v1.Observe) and redraw it in the "
        "terminal until Ctrl-C. Needs the 'info' action (the owner, or a grant).",
    )
    add_server_flag(top)
    top.add_argument("--interval", type=number(0.2, 60.0), default=1.0, metavar="S",
                     help="seconds between refreshes (default: 1)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--json", action="store_true", help="print one JSON snapshot and exit")
    top.set_defaults(run=run)


def run(args: Any) -> int:
    from rich.console import Console
    from rich.live import Live

    from .common import EXIT_OK, client

    with client(args) as c:
        status = c.status()
        if args.json:
            print(as_json(status))
            return EXIT_OK
        console = Console()
        if args.once:
            console.print(render(status))
            return EXIT_OK
        with Live(render(status), console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(render(c.status()), refresh=True)
