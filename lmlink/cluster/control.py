"""Rank 0's side channel: heartbeats, rank status, and weight files for ranks without them.

A collective on a dead peer can block forever, so failure detection cannot live in the
engine loop. Every rank > 0 keeps one TCP connection to rank 0 (on the cluster link) and sends
a JSON heartbeat line every `HEARTBEAT_INTERVAL` seconds. EOF on that connection (the process
died: the kernel closes its sockets) or silence longer than the timeout (hung, stopped, link
down) makes rank 0 fail every stream with "rank N (host) stopped responding".

The same listener serves model files to ranks that were told to fetch them from rank 0
(`weights = "rank0"`): `{"list": true}` and `{"get": "relative/path"}` requests.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("lmlink.cluster")

HEARTBEAT_INTERVAL = 0.5
_CHUNK = 1 << 20


def memory_in_use() -> int:
    """Bytes this process holds: MLX's active memory on Metal, else the resident set size."""
    try:
        import mlx.core as mx

        active = int(mx.get_active_memory())
        if active > 0:
            return active
    except Exception:  # pragma: no cover
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # macOS without Metal memory: peak RSS (bytes there)
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


@dataclass
class RankStatus:
    rank: int
    host: str
    address: str
    state: str = "starting"  # starting | loading | ready | failed | stopped
    message: str = ""
    memory_bytes: int = 0
    model_bytes: int = 0
    tokens: int = 0
    tokens_per_second: float = 0.0
    last_seen: float = field(default_factory=time.monotonic)
    pid: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank, "host": self.host, "address": self.address, "state": self.state,
            "message": self.message, "memory_bytes": self.memory_bytes,
            "model_bytes": self.model_bytes, "tokens_per_second": round(self.tokens_per_second, 2),
        }


class ControlServer:
    """Runs on rank 0: accepts rank connections, watches heartbeats, serves weight files."""

    def __init__(
        self,
        ranks: list[RankStatus],
        bind: tuple[str, int],
        timeout: float,
        on_failure: Callable[[RankStatus, str], None],
        on_progress: Callable[[RankStatus], None] | None = None,
        files_root: Path | None = None,
    ) -> None:
        self.ranks = {r.rank: r for r in ranks}
        self.timeout = timeout
        self._on_failure = on_failure
        self._on_progress = on_progress
        self.files_root = files_root
        self.closing = False
        self.failed: tuple[RankStatus, str] | None = None
        self._lock = threading.Lock()
        self._connected = threading.Condition(self._lock)
        self._sock = socket.create_server(bind, reuse_port=False)
        self._sock.settimeout(0.5)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, name="lmlink-control", daemon=True).start()
        threading.Thread(target=self._watch, name="lmlink-watchdog", daemon=True).start()

    def wait_connected(self, timeout: float) -> list[int]:
        """Ranks (other than 0) that have not said hello after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._connected:
            while True:
                missing = [r for r, s in self.ranks.items() if r != 0 and not s.pid]
                left = deadline - time.monotonic()
                if not missing or left <= 0 or self.failed:
                    return missing
                self._connected.wait(min(left, 0.5))

    def close(self) -> None:
        self.closing = True
        try:
            self._sock.close()
        except OSError:
            pass

    def _accept(self) -> None:
        while not self.closing:
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        status: RankStatus | None = None
        reader = conn.makefile("rb")
        try:
            for line in reader:
                msg = json.loads(line)
                if "get" in msg or "list" in msg:
                    self._send_files(conn, msg)
                    continue
                rank = int(msg["rank"])
                status = self.ranks.get(rank)
                if status is None:
                    return
                with self._connected:
                    prev_tokens, prev_seen = status.tokens, status.last_seen
                    prev_message = status.message
                    status.last_seen = time.monotonic()
                    status.pid = int(msg.get("pid", status.pid))
                    status.state = msg.get("state", status.state)
                    status.message = msg.get("message", status.message)
                    status.memory_bytes = int(msg.get("memory", status.memory_bytes))
                    status.model_bytes = int(msg.get("model_bytes", status.model_bytes))
                    status.tokens = int(msg.get("tokens", status.tokens))
                    dt = status.last_seen - prev_seen
                    if dt > 0 and status.tokens >= prev_tokens:
                        rate = (status.tokens - prev_tokens) / dt
                        status.tokens_per_second = 0.5 * status.tokens_per_second + 0.5 * rate
                    self._connected.notify_all()
                if self._on_progress and msg.get("message") and status.message != prev_message:
                    self._on_progress(status)
        except (OSError, ValueError, KeyError):
            pass
        finally:
            conn.close()
        if status is not None and status.state != "stopped" and not self.closing:
            self._fail(status, "exited or closed its connection")

    def _watch(self) -> None:
        while not self.closing:
            time.sleep(HEARTBEAT_INTERVAL / 2)
            now = time.monotonic()
            for s in list(self.ranks.values()):
                if s.rank != 0 and s.pid and s.state not in ("stopped", "failed") \
                        and now - s.last_seen > self.timeout:
                    self._fail(s, f"sent no heartbeat for {now - s.last_seen:.1f} s")

    def _fail(self, status: RankStatus, why: str) -> None:
        with self._lock:
            if self.failed is not None or self.closing:
                return
            status.state = "failed"
            self.failed = (status, why)
        log.error("rank %d (%s) stopped responding: %s", status.rank, status.host, why)
        self._on_failure(status, why)

    def _send_files(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        root = self.files_root
        if root is None:
            conn.sendall(b'{"error": "rank 0 serves no model files"}\n')
            return
        if "list" in msg:
            files = sorted(
                [str(p.relative_to(root)), p.stat().st_size]
                for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
            )
            conn.sendall(json.dumps({"files": files}).encode() + b"\n")
            return
        path = (root / msg["get"]).resolve()
        if root.resolve() not in path.parents or not path.is_file():
            conn.sendall(b'{"error": "no such file"}\n')
            return
        size = path.stat().st_size
        conn.sendall(json.dumps({"size": size}).encode() + b"\n")
        with open(path, "rb") as f:
            conn.sendfile(f)


class Heartbeat:
    """Runs on ranks > 0: one connection to rank 0, a status line every interval."""

    def __init__(self, address: tuple[str, int], rank: int, connect_timeout: float = 30.0) -> None:
        self.rank = rank
        self.state = "loading"
        self.message = ""
        self.model_bytes = 0
        self.tokens: Callable[[], int] = lambda: 0
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self._sock = socket.create_connection(address, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()
        self.send()
        threading.Thread(target=self._loop, name="lmlink-heartbeat", daemon=True).start()

    def send(self, **update: Any) -> None:
        for k, v in update.items():
            setattr(self, k, v)
        line = json.dumps({
            "rank": self.rank, "pid": os.getpid(), "state": self.state, "message": self.message,
            "memory": memory_in_use(), "model_bytes": self.model_bytes, "tokens": self.tokens(),
        }).encode() + b"\n"
        with self._lock:
            try:
                self._sock.sendall(line)
            except OSError:  # rank 0 is gone (also on another machine): so is the cluster
                os._exit(4)

    def _loop(self) -> None:
        while True:
            time.sleep(HEARTBEAT_INTERVAL)
            self.send()


def fetch_files(address: tuple[str, int], dest: Path, wanted: Callable[[str], bool] | None = None,
                progress: Callable[[str], None] | None = None) -> Path:
    """Copy rank 0's model directory into `dest` over the cluster link (skips files that match)."""
    dest.mkdir(parents=True, exist_ok=True)
    with socket.create_connection(address, timeout=60) as sock:
        reader = sock.makefile("rb")
        sock.sendall(b'{"list": true}\n')
        files = json.loads(reader.readline())["files"]
        total = sum(size for name, size in files if wanted is None or wanted(name))
        done = 0
        for name, size in files:
            if wanted is not None and not wanted(name):
                continue
            target = dest / name
            if target.is_file() and target.stat().st_size == size:
                done += size
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            sock.sendall(json.dumps({"get": name}).encode() + b"\n")
            head = json.loads(reader.readline())
            if "error" in head:
                raise OSError(f"rank 0 could not send {name}: {head['error']}")
            left = int(head["size"])
            tmp = target.with_name(target.name + ".part")
            with open(tmp, "wb") as out:
                while left:
                    chunk = reader.read(min(_CHUNK, left))
                    if not chunk:
                        raise OSError(f"connection to rank 0 closed while receiving {name}")
                    out.write(chunk)
                    left -= len(chunk)
                    done += len(chunk)
                    if progress:
                        progress(f"receiving weights from rank 0: {done / max(total, 1):.0%}")
            tmp.replace(target)
    return dest
