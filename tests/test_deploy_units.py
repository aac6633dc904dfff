"""The service files in deploy/ are valid for their managers and name only real options."""

from __future__ import annotations

import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, lmlink_cmd

DEPLOY = REPO / "deploy"
UNITS = {"lmlink-serve.service": "serve", "lmlink-link.service": "link"}
PLISTS = {"dev.lmlink.serve.plist": "serve", "dev.lmlink.link.plist": "link"}


def _options(command: str) -> set[str]:
    out = subprocess.run(lmlink_cmd(command, "--help"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"--[a-z][a-z0-9-]*", out.stdout))


def _exec_start(unit: Path) -> list[str]:
    line = next(l for l in unit.read_text().splitlines() if l.startswith("ExecStart="))
    return line.split("=", 1)[1].split()


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_unit_verifies(name: str, tmp_path: Path) -> None:
    verify = shutil.which("systemd-analyze")
    if verify is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's binary exists: point it at this checkout's lmlink.
    lmlink = Path(sys.executable).with_name("lmlink")
    unit = tmp_path / name
    text = (DEPLOY / name).read_text()
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={lmlink}", text, flags=re.M)
    unit.write_text(text)
    # (user units are checked as system units: no user manager runs here; same syntax)
    res = subprocess.run([verify, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [l for l in res.stderr.splitlines() if name in l or "Unknown" in l]
    assert res.returncode == 0 and not problems, res.stderr


@pytest.mark.parametrize("name,command", sorted(UNITS.items()))
def test_systemd_unit_uses_real_options(name: str, command: str) -> None:
    argv = _exec_start(DEPLOY / name)
    assert argv[1] == command
    used = {a for a in argv if a.startswith("--")}
    assert used <= _options(command), used - _options(command)


@pytest.mark.parametrize("name,command", sorted(PLISTS.items()))
def test_launchd_plist_parses_and_uses_real_options(name: str, command: str) -> None:
    plist = plistlib.loads((DEPLOY / name).read_bytes())
    assert plist["Label"] == name.removesuffix(".plist")
    argv = plist["ProgramArguments"]
    assert argv[1] == command
    used = {a for a in argv if a.startswith("--")}
    assert used <= _options(command), used - _options(command)
    assert plist["RunAtLoad"] is True


def test_serve_unit_waits_for_readiness_and_drains() -> None:
    text = (DEPLOY / "lmlink-serve.service").read_text()
    assert "Type=notify" in text
    timeout = int(re.search(r"^TimeoutStopSec=(\d+)", text, re.M).group(1))
    drain = int(re.search(r"--drain-timeout (\d+)", text).group(1))
    assert timeout > drain  # systemd must not SIGKILL a drain that is still within its bound
