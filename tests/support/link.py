"""Start a real `lmlink link` subprocess for tests (shared by the link tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support.procs import die_with_parent

ASK = [{"role": "user", "content": "Tell me about the river."}]


def start_link(*servers: str, refresh: float = 30.0) -> tuple[subprocess.Popen, str]:
    """`lmlink link --port 0` forwarding to `servers` only; returns (process, its /v1 URL)."""
    args = ["link", "--port", "0", "--no-discovery", "--json", "--refresh", str(refresh)]
    for s in servers:
        args += ["--server", s]
    env = {k: v for k, v in os.environ.items() if k != "LMLINK_SERVER"}
    proc = subprocess.Popen([sys.executable, "-m", "lmlink.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
                            preexec_fn=die_with_parent)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"lmlink link exited: {proc.stderr.read() if proc.stderr else ''}")
    return proc, json.loads(line)["url"]
