"""Child processes of the test run die with it, even if pytest itself is killed."""

from __future__ import annotations

import ctypes
import json
import selectors
import signal
import subprocess
import sys
import time

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for Popen: SIGTERM this child when the test process goes away (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as dead), read from /proc by the test
    itself rather than through the product's own private check."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def read_json_line(proc: subprocess.Popen, timeout: float) -> dict:
    """Next JSON line from proc's stdout, within `timeout` seconds."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = proc.stdout.readline()
        if not line:
            break
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    proc.kill()
    raise AssertionError(f"no JSON line from server: {proc.stderr.read()[-3000:]}")


def stop(proc: subprocess.Popen) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=5)
