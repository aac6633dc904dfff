"""Shared fixtures: a real `lmlink serve` subprocess on loopback and an in-process engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from support.procs import die_with_parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Servers started by tests keep their state (CA, shares, audit log) in a throwaway dir and
# clients their pins and config, never in the user's real ones: forced, not defaulted, so an
# exported LMLINK_STATE_DIR / LMLINK_CONFIG_DIR (or LMLINK_SERVER) cannot leak test writes
# into a real setup or point the tests at a real server.
_SCRATCH = tempfile.mkdtemp(prefix="lmlink-tests-")
os.environ["LMLINK_STATE_DIR"] = os.path.join(_SCRATCH, "state")
os.environ["LMLINK_CONFIG_DIR"] = os.path.join(_SCRATCH, "config")
os.environ.pop("LMLINK_SERVER", None)
os.environ.pop("LMLINK_TOKEN", None)
REPO = Path(__file__).resolve().parent.parent
TEST_MODEL = os.environ.get("LMLINK_TEST_MODEL", "builtin")

# Test tiers (markers registered in pyproject.toml). Whole modules are placed here, in one
# table, rather than by decorators scattered over the files; a test may add its own marks.
# The fast tier: pytest -m "not netns and not cluster and not slow".
TIERS: dict[str, tuple[str, ...]] = {
    "test_discovery_netns.py": ("netns",),
    # (these three use WireGuard tunnels and the LocalAPI stand-in, not a real tailnet)
    "test_discovery_tailnet.py": ("netns",),
    "test_net_netns.py": ("netns",),
    "test_link_denied_netns.py": ("netns",),
    "test_serve_tailnet.py": ("netns",),
    "test_sharing_tailnet.py": ("netns",),
    "test_resume_netns.py": ("netns",),  # a WireGuard underlay taken down and up (~40 s)
    # real headscale + tailscaled (they also carry the real_tailnet mark themselves)
    "test_real_tailnet.py": ("netns", "slow"),
    "test_real_tailnet_tsnet.py": ("netns", "slow"),
    "test_real_tailnet_userspace.py": ("netns", "slow"),
    "test_real_tailnet_expiry.py": ("netns", "slow"),
    "test_phone_real_tailnet.py": ("netns", "slow"),
    "test_cluster.py": ("cluster", "slow"),
    # Several servers per test, restarts, or timing measurements (10-55 s each here).
    "test_link.py": ("slow",),
    "test_link_latency.py": ("slow",),
    "test_sharing_restart.py": ("slow",),
    "test_observe_server.py": ("slow",),
    # SmolLM2-135M through real servers (~2 min); llama.cpp comparisons (`make test-reference`).
    "test_real_model.py": ("real_model", "slow"),
    "test_gguf_reference.py": ("reference", "slow"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        test = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        for name in (*TIERS.get(item.path.name, ()), *TIERS.get(test, ())):
            item.add_marker(getattr(pytest.mark, name))


@dataclass
class ServerProcess:
    address: str
    model: str
    process: subprocess.Popen
    http: str = ""  # HOST:PORT of the HTTP bridge

    @property
    def http_url(self) -> str:
        return f"http://{self.http}"

    def alive(self) -> bool:
        return self.process.poll() is None


def lmlink_cmd(*args: str) -> list[str]:
    """The real console entry point, run with this interpreter."""
    return [sys.executable, "-m", "lmlink.cli", *args]


def start_server(*extra: str, model: str = TEST_MODEL, timeout: float = 60.0) -> ServerProcess:
    proc = subprocess.Popen(
        lmlink_cmd("serve", "--model", model, "--grpc-port", "0", "--http-port", "0", "--json", "--log-level", "warning", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"lmlink serve exited early: {err[-2000:]}")
        try:
            ready = json.loads(line)
        except json.JSONDecodeError:
            continue
        if ready.get("event") == "ready":
            return ServerProcess(ready["grpc"], ready["model"], proc, ready.get("http") or "")
    stop_server(proc)
    raise RuntimeError("lmlink serve did not become ready in time")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    srv = start_server()
    yield srv
    stop_server(srv.process)


@pytest.fixture(scope="session")
def loaded_model():
    from lmlink.engine.loader import load_model

    return load_model(TEST_MODEL)


@pytest.fixture(scope="session")
def engine(loaded_model):
    from lmlink.engine.engine import Engine

    eng = Engine(loaded_model)
    eng.start()
    yield eng
    eng.stop()
