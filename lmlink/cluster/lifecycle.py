"""A cluster lives exactly as long as the `lmlink cluster up` that started it.

`cluster up` may die by SIGKILL (OOM killer, kill -9, a crash) with no chance to clean up,
and the MPI launcher runs in its own session, so nothing would stop the ranks. Three links
close that gap, each enough on its own where it applies:

- the launcher gets PR_SET_PDEATHSIG(SIGKILL) (Linux): it dies with `cluster up`; elsewhere
  (macOS) a small guard process runs it and kills the whole process group when `cluster up`
  is gone (`guard_main`);
- every rank exits when its parent (the launcher or its remote daemon) goes away
  (PR_SET_PDEATHSIG plus a parent-pid watch, which also works on macOS);
- ranks > 0 exit when their control connection to rank 0 breaks (`control.Heartbeat`).

Each launched process carries `LMLINK_CLUSTER_NAME` and `LMLINK_CLUSTER_UP_PID`, so a new
`cluster up` can find what an older one left behind on this machine (`leftovers`) and clear
it, or refuse in one line if that older `cluster up` is still running.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

ENV_NAME = "LMLINK_CLUSTER_NAME"
ENV_UP_PID = "LMLINK_CLUSTER_UP_PID"
_PR_SET_PDEATHSIG = 1
EXIT_ORPHANED = 4


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` when our parent dies (Linux only); True if set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig)) == 0
    except (OSError, AttributeError):
        return False


def launcher_preexec() -> None:
    """`preexec_fn` for the MPI launcher: die with `cluster up`."""
    set_parent_death_signal(signal.SIGKILL)


def watch_launcher(*, interval: float = 0.5) -> None:
    """In a rank: exit as soon as the process that launched it is gone."""
    parent = os.getppid()
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent or parent == 1:  # it died before prctl took effect
        os._exit(EXIT_ORPHANED)

    def parent_watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(EXIT_ORPHANED)

    threading.Thread(target=parent_watch, name="lmlink-parent-watch", daemon=True).start()


@dataclass(frozen=True)
class Leftover:
    pid: int
    up_pid: int
    cmdline: str


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        if item.startswith(b"LMLINK_CLUSTER_"):
            k, _, v = item.partition(b"=")
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def leftovers(name: str) -> list[Leftover]:
    """Processes of this user launched for cluster `name` by another `cluster up` (Linux /proc)."""
    if not os.path.isdir("/proc"):
        return []
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        env = _environ(int(entry))
        if env.get(ENV_NAME) != name:
            continue
        try:
            up_pid = int(env.get(ENV_UP_PID, "0"))
        except ValueError:
            up_pid = 0
        if up_pid == me:
            continue
        found.append(Leftover(int(entry), up_pid, _cmdline(int(entry))))
    return found


class StillRunning(Exception):
    """Another `cluster up` for the same cluster is alive; one-line reason."""


def clear_leftovers(name: str, *, wait: float = 5.0) -> list[Leftover]:
    """Kill what a dead `cluster up` left of cluster `name`; raise StillRunning if it lives."""
    found = leftovers(name)
    live_owners = sorted({f.up_pid for f in found if f.up_pid and _alive(f.up_pid)
                          and "cluster" in _cmdline(f.up_pid)})
    if live_owners:
        raise StillRunning(
            f"cluster {name} is already running (lmlink cluster up, pid {live_owners[0]}); "
            "stop it first")
    for f in found:
        try:
            os.kill(f.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(_alive(f.pid) for f in found):
        time.sleep(0.05)
    return found


# -- the launcher guard (platforms without PR_SET_PDEATHSIG) --------------------------------

ENV_FORCE_GUARD = "LMLINK_CLUSTER_GUARD"  # "1": use the guard even where prctl exists (tests)


def needs_guard() -> bool:
    return os.environ.get(ENV_FORCE_GUARD) == "1" or not sys.platform.startswith("linux")


def guarded(cmd: list[str]) -> list[str]:
    """`cmd` wrapped in the guard when this platform cannot tie the launcher to us otherwise."""
    if not needs_guard():
        return cmd
    return [sys.executable, "-m", "lmlink.cluster.lifecycle", "guard", str(os.getpid()), "--", *cmd]


def guard_main(up_pid: int, cmd: list[str], interval: float = 0.25) -> int:
    """Run the launcher; when `cluster up` (our parent) is gone, kill our whole process group.

    `cluster up` starts us as a session leader, so the group is us, the launcher and the local
    ranks (ranks that left the group watch their own parent).
    """
    import subprocess

    proc = subprocess.Popen(cmd)

    def forward(signum: int, frame: object) -> None:
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while True:
        try:
            return proc.wait(interval)
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != up_pid:  # `cluster up` died without cleaning up
            os.killpg(0, signal.SIGKILL)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "guard" and sys.argv[3] == "--":
        ret = guard_main(int(sys.argv[2]), sys.argv[4:])
        sys.exit(ret if ret >= 0 else 128 - ret)
    sys.exit("usage: python -m lmlink.cluster.lifecycle guard UP_PID -- LAUNCHER ARGS...")
