"""Checks several test modules make the same way."""

from __future__ import annotations

import subprocess
import time
from typing import Any


def one_line_error(res: subprocess.CompletedProcess, command: str, code: int = 1) -> str:
    """A command failed as the CLI contract says: exit `code`, no traceback, exactly one line on
    stderr (besides "note:" hints) starting with "lmlink COMMAND: "; returns that line."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines()
             if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"lmlink {command}: "), lines[0]
    return lines[0]


def wait_idle(client: Any, timeout: float = 5.0) -> int:
    """Wait until the server reports no active streams (or `timeout`); returns how many are left."""
    deadline = time.monotonic() + timeout
    while client.server_info().active_streams and time.monotonic() < deadline:
        time.sleep(0.02)
    return client.server_info().active_streams
