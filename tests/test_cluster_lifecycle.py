"""Issue 11 #12/#13: a cluster dies with `lmlink cluster up` and listens only where it should.

Real `lmlink cluster up cluster/local-2-mpi.toml` (MPI, two ranks on loopback), killed with
SIGKILL the way the OOM killer would; a planted leftover process of an older run; /proc
listeners of every cluster process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, lmlink_cmd
from lmlink.client import Client
from lmlink.net.listeners import listening_sockets
from support.procs import die_with_parent
from support.cluster import NEEDS_MPIRUN, assert_gone, down, up

pytestmark = NEEDS_MPIRUN


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


@pytest.mark.parametrize("how", ["pdeathsig", "guard"])
def test_sigkilled_cluster_up_takes_launcher_and_ranks_with_it(how, monkeypatch):
    if how == "guard":  # what macOS uses (no PR_SET_PDEATHSIG there): forced on here
        monkeypatch.setenv("LMLINK_CLUSTER_GUARD", "1")
    c = up("local-2-mpi.toml")
    pids = c.all_pids()
    assert len(c.pids) == 2 and len(pids) >= 4  # cluster up, launcher, two ranks
    grpc_port = int(c.address.rsplit(":", 1)[1])
    with Client(c.address, timeout=30) as client:
        assert len(client.complete("The", max_tokens=3, ignore_eos=True).token_ids) == 3
    t0 = time.monotonic()
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait(5)
    assert_gone(pids - {c.proc.pid}, within=5.0)
    elapsed = time.monotonic() - t0
    assert elapsed < 5.0
    # nobody listens on the cluster's port any more (TIME_WAIT of the client may remain)
    deadline = time.monotonic() + 2.0
    while grpc_port in {s.port for s in listening_sockets()} and time.monotonic() < deadline:
        time.sleep(0.1)
    held = subprocess.run(["ss", "-ltnp", f"sport = :{grpc_port}"], capture_output=True,
                          text=True).stdout
    assert grpc_port not in {s.port for s in listening_sockets()}, held


def test_cluster_processes_listen_on_loopback_only():
    c = up("local-2-mpi.toml")
    try:
        seen = {}
        for pid in c.all_pids():
            try:
                seen[pid] = (_comm(pid), listening_sockets(pid))
            except OSError:
                continue
        ranks = set(c.pids.values())
        for pid in ranks:  # rank 0's servers, its control channel: loopback; rank 1: nothing
            name, socks = seen[pid]
            assert socks == [] or all(not s.wildcard and s.host == "127.0.0.1" for s in socks), \
                (pid, socks)
        assert any(seen[p][1] for p in ranks)  # rank 0 does listen (on loopback)
        launcher_wild = [(name, s.host, s.port) for pid, (name, socks) in seen.items()
                         if pid not in ranks for s in socks if s.wildcard]
        # PRRTE binds its bootstrap listener to every interface whatever it is told (see
        # cluster/README.md); nothing else of the cluster may.
        assert all(name == "prterun" for name, _, _ in launcher_wild), launcher_wild
        assert len(launcher_wild) <= 2, launcher_wild
    finally:
        down(c)


PLANT = (
    "import socket, sys, time\n"
    "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
    "print(s.getsockname()[1], flush=True)\n"
    "time.sleep(120)\n"
)


def _plant(up_pid: int) -> subprocess.Popen:
    env = {**os.environ, "LMLINK_CLUSTER_NAME": "local-2-mpi",
           "LMLINK_CLUSTER_UP_PID": str(up_pid)}
    return subprocess.Popen([sys.executable, "-c", PLANT], env=env, stdout=subprocess.PIPE,
                            text=True, preexec_fn=die_with_parent)


def test_cluster_up_clears_what_a_dead_run_left_behind():
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = _plant(dead.pid)  # a rank of a `cluster up` that no longer exists
    port = int(leftover.stdout.readline())
    proc = subprocess.Popen(
        lmlink_cmd("cluster", "up", str(REPO / "cluster" / "local-2-mpi.toml"), "--grpc-port", "0",
                   "--http-port", "0", "--json", "--no-mdns"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=die_with_parent)
    try:
        first = proc.stderr.readline()
        assert "cleared 1 process(es) a previous `cluster up` of local-2-mpi left behind" in first
        assert leftover.wait(5) == -signal.SIGKILL
        assert port not in {s.port for s in listening_sockets()}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_cluster_up_refuses_while_the_previous_one_runs():
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "cluster"],
                             preexec_fn=die_with_parent)
    leftover = _plant(owner.pid)
    leftover.stdout.readline()
    try:
        res = subprocess.run(
            lmlink_cmd("cluster", "up", str(REPO / "cluster" / "local-2-mpi.toml"),
                       "--grpc-port", "0", "--http-port", "0", "--no-mdns", "--json"),
            capture_output=True, text=True, timeout=30)
        assert res.returncode == 1
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert f"already running (lmlink cluster up, pid {owner.pid}); stop it first" in lines[0]
        assert leftover.poll() is None  # not ours to kill
    finally:
        leftover.kill()
        owner.kill()
        leftover.wait()
        owner.wait()
