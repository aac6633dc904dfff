"""Find (or build once) the pinned headscale / tailscaled / tailscale binaries.

They come from tools/tailnet/go.mod via scripts/build-tailnet-tools.sh, which caches them under
~/.cache/lmlink/tailnet-tools/<hash of go.mod+go.sum>/bin. `make test` runs the script before
pytest; calling it again here is a no-op when the binaries are there.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "build-tailnet-tools.sh"
NAMES = ("headscale", "tailscaled", "tailscale")


@functools.lru_cache(maxsize=1)
def tool_dir() -> Path:
    """The bin dir holding the three programs; fails the test (never skips) if Go cannot build them."""
    override = os.environ.get("LMLINK_TAILNET_TOOLS")
    if override:
        return Path(override)
    if shutil.which("go") is None:
        pytest.fail("real-tailnet tests need Go 1.26+ to build headscale/tailscaled (tools/tailnet)")
    res = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        pytest.fail(f"building the tailnet tools failed:\n{res.stderr[-3000:]}")
    return Path(res.stdout.strip().splitlines()[-1])


def tool(name: str) -> str:
    assert name in NAMES
    path = tool_dir() / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} missing: run scripts/build-tailnet-tools.sh")
    return str(path)
