"""Start the servers under test as real subprocesses on loopback, and always stop them.

Each server runs in its own session (process group), so stopping it takes down any children
too; `ServerSet` stops everything it started on exit, on error and on SIGINT/SIGTERM.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from common import eprint

LOOPBACK = "127.0.0.1"


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the driver dies, even by SIGKILL (Linux only)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    cmd: list[str]
    proc: subprocess.Popen
    log_path: Path
    address: str = ""
    settings: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


class ServerSet:
    """Context manager owning every server subprocess of a run."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.servers: list[Server] = []
        self.logdir = Path(tempfile.mkdtemp(prefix="lmlink-bench-"))
        self._old_handlers: dict[int, object] = {}

    def __enter__(self) -> "ServerSet":
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop_all()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        if exc_type is None:  # keep the logs (and lmlink's state dir) only when a run failed
            shutil.rmtree(self.logdir, ignore_errors=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_all()
        raise SystemExit(128 + signum)

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    def _spawn(self, name: str, cmd: list[str], stdout: int | None,
               stdin: int = subprocess.DEVNULL) -> Server:
        log_path = self.logdir / f"{name}.log"
        log = open(log_path, "wb")
        proc = subprocess.Popen(
            cmd,
            stdin=stdin,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            env=self.env,
            start_new_session=True,  # own process group: killpg reaches every child
            preexec_fn=_die_with_parent,
        )
        log.close()
        server = Server(name, cmd, proc, log_path)
        self.servers.append(server)
        return server

    def start_worker(self, name: str, cmd: list[str]) -> Server:
        """A helper process spoken to by JSON lines on stdin/stdout (bench/inproc.py serve)."""
        return self._spawn(name, cmd, subprocess.PIPE, stdin=subprocess.PIPE)

    def start_lmlink(self, model_path: str, max_batch: int, timeout: float = 180.0) -> Server:
        exe = shutil.which("lmlink", path=str(Path(sys.executable).parent))
        base = [exe] if exe else [sys.executable, "-m", "lmlink.cli"]
        flags = ["--max-batch", str(max_batch), "--log-level", "warning"]
        # Keep the run self-contained where this lmlink has the options: its own state dir
        # (keys, audit trail), no fixed HTTP-bridge port, no LAN advertising.
        helptext = subprocess.run([*base, "serve", "--help"], capture_output=True, text=True,
                                  env=self.env, timeout=60).stdout
        extra = []
        if "--state-dir" in helptext:
            extra += ["--state-dir", str(self.logdir / "lmlink-state")]
        if "--http-port" in helptext:
            extra += ["--http-port", "0"]
        if "--no-mdns" in helptext:
            extra += ["--no-mdns"]
        cmd = [*base, "serve", "--model", model_path, "--listen", "local",
               "--host", LOOPBACK, "--grpc-port", "0", "--json", *flags, *extra]
        server = self._spawn("lmlink", cmd, subprocess.PIPE)
        server.settings = "lmlink serve " + " ".join(flags) + (
            " (engine: prefill batch 8, prefill step 512, prompt cache 16 entries)"
        )
        # `--json` prints one line {"event": "ready", "grpc": "host:port", ...} when serving.
        assert server.proc.stdout is not None
        fd = server.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not server.alive():
                raise RuntimeError(f"lmlink serve did not become ready:\n{server.log_tail()}")
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"lmlink serve exited:\n{server.log_tail()}")
                buf += chunk
        info = json.loads(buf.split(b"\n", 1)[0])
        server.address = info["grpc"]
        server.extra["model_id"] = info.get("model")
        server.extra["http"] = info.get("http")
        return server

    def start_mlx_lm(self, model_path: str, decode: int, prompt: int, prefill_step: int,
                     cache_size: int, timeout: float = 180.0) -> Server:
        port = free_port()
        flags = ["--decode-concurrency", str(decode), "--prompt-concurrency", str(prompt),
                 "--prefill-step-size", str(prefill_step), "--prompt-cache-size", str(cache_size),
                 "--temp", "0.0", "--log-level", "WARNING"]
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", model_path,
               "--host", LOOPBACK, "--port", str(port), *flags]
        server = self._spawn("mlx_lm.server", cmd, None)
        server.settings = "mlx_lm.server " + " ".join(flags)
        server.address = f"http://{LOOPBACK}:{port}"
        deadline = time.monotonic() + timeout
        while True:
            if not server.alive():
                raise RuntimeError(f"mlx_lm.server exited:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(server.address + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlx_lm.server did not answer /health:\n{server.log_tail()}")
            time.sleep(0.2)
        return server


def describe_failure(server: Server) -> None:
    eprint(f"--- {server.name} log ({server.log_path}) ---")
    eprint(server.log_tail())
