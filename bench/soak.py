"""Hostile-client soak: a real `lmlink serve` on loopback under a bounded mix of abuse.

    python bench/soak.py [--seconds 60] [--concurrency 24] [--json]

For `--seconds`, `--concurrency` workers loop over: normal streams (openai SDK over HTTP and
the lmlink gRPC client), streams abandoned after two chunks (both doors), invalid sampling
values (negative/huge top_k, NaN temperature, negative max_tokens), a lone UTF-16 surrogate,
deeply nested JSON, a huge body (8 MB), 64 MB of headers, and slow clients (a request head
trickled one byte a second). Loopback only; everything it starts is stopped.

Then it waits for the server to go idle and compares with the baseline taken after warm-up:
active/queued streams (GetServerInfo), open fds, threads, RSS (/proc), audit rows still
`running` (state.db), and whether a normal request still completes and /health tells the
truth. Exit status 0 only if everything is back to baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def proc_facts(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    facts = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
    for line in status.splitlines():
        if line.startswith("Threads:"):
            facts["threads"] = int(line.split()[1])
        if line.startswith("VmRSS:"):
            facts["rss_mb"] = int(line.split()[1]) // 1024
    return facts


def start_server(state: Path) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmlink.cli", "serve", "--grpc-port", "0", "--http-port", "0",
         "--json", "--no-mdns", "--state-dir", str(state), "--max-batch", "8",
         "--max-queue", "64", "--log-level", "error"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if ev.get("event") == "ready":
            return proc, ev
    raise SystemExit("lmlink serve did not start")


class Soak:
    def __init__(self, ready: dict, seconds: float, concurrency: int) -> None:
        self.grpc = ready["grpc"]
        self.http = f"http://{ready['http']}"
        self.host, self.port = ready["http"].rsplit(":", 1)
        self.model = ready["model"]
        self.seconds = seconds
        self.concurrency = concurrency
        self.outcomes: Counter[str] = Counter()

    # -- the kinds of traffic ------------------------------------------------------------

    async def normal_http(self) -> str:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=f"{self.http}/v1", api_key="unused", max_retries=0)
        try:
            stream = await client.chat.completions.create(
                model=self.model, max_tokens=16, stream=True,
                messages=[{"role": "user", "content": "Tell me a story."}])
            n = 0
            async for _ in stream:
                n += 1
            return "ok" if n else "empty"
        finally:
            await client.close()

    async def normal_grpc(self) -> str:
        from lmlink.client import AsyncClient

        async with AsyncClient(self.grpc, timeout=60) as c:
            g = await c.complete("Once upon a time", max_tokens=16, ignore_eos=True)
            return "ok" if len(g.token_ids) == 16 else "short"

    async def abandoned_http(self) -> str:
        async with httpx.AsyncClient(timeout=30) as c:
            async with c.stream("POST", f"{self.http}/v1/chat/completions", json={
                    "model": self.model, "max_tokens": 400, "stream": True,
                    "messages": [{"role": "user", "content": "Go on and on."}]}) as r:
                n = 0
                async for _ in r.aiter_lines():
                    n += 1
                    if n >= 3:
                        break
        return "abandoned"

    async def abandoned_grpc(self) -> str:
        from lmlink.client import AsyncClient

        async with AsyncClient(self.grpc, timeout=60) as c:
            stream = c.stream(prompt="Go on and on.", max_tokens=400, ignore_eos=True)
            n = 0
            async for _ in stream:
                n += 1
                if n >= 2:
                    break
            stream.cancel() if hasattr(stream, "cancel") else None
        return "abandoned"

    async def invalid(self) -> str:
        bad = random.choice([
            {"top_k": 5000}, {"top_k": -1}, {"temperature": float("nan")},
            {"max_tokens": -5}, {"top_p": 7}, {"messages": [{"role": "user", "content": "a\ud800b"}]},
        ])
        body = {"model": self.model, "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}], **bad}
        raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.post(f"{self.http}/v1/chat/completions", content=raw,
                             headers={"content-type": "application/json"})
        return f"invalid:{next(iter(bad))}={r.status_code}"

    async def nested(self) -> str:
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.post(f"{self.http}/v1/chat/completions",
                             content=b"[" * 50_000 + b"]" * 50_000,
                             headers={"content-type": "application/json"})
        return f"nested:{r.status_code}"

    async def huge_body(self) -> str:
        body = json.dumps({"model": self.model, "max_tokens": 4, "messages": [
            {"role": "user", "content": "x" * (8 << 20)}]}).encode()
        try:
            async with httpx.AsyncClient(timeout=60) as c:
                r = await c.post(f"{self.http}/v1/chat/completions", content=body,
                                 headers={"content-type": "application/json"})
            return f"huge:{r.status_code}"
        except httpx.HTTPError as exc:
            return f"huge:{type(exc).__name__}"

    async def huge_headers(self) -> str:
        def run() -> str:
            s = socket.create_connection((self.host, int(self.port)), timeout=10)
            try:
                s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
                pad = b"x-pad: " + b"a" * 8000 + b"\r\n"
                for _ in range((64 << 20) // len(pad)):
                    s.sendall(pad)
            except OSError:
                pass
            try:
                return "headers:" + s.recv(64).split(b" ")[1].decode()
            except (OSError, IndexError):
                return "headers:closed"
            finally:
                s.close()

        return await asyncio.to_thread(run)

    async def slow_client(self) -> str:
        """A request head trickled one byte a second (slowloris): what does the server say?"""
        reader, writer = await asyncio.open_connection(self.host, int(self.port))
        answer = asyncio.ensure_future(reader.read(64))
        try:
            for b in b"GET /health HTTP/1.1\r\nhost: x\r\n":
                if answer.done():
                    break
                writer.write(bytes([b]))
                await writer.drain()
                await asyncio.sleep(1.0)
            data = await asyncio.wait_for(answer, 15)
            return "slow:" + (data.split(b" ")[1].decode() if data else "closed")
        except (OSError, asyncio.TimeoutError, IndexError):
            return "slow:closed"
        finally:
            answer.cancel()
            writer.close()

    # -- driver --------------------------------------------------------------------------

    async def worker(self, deadline: float) -> None:
        kinds = [self.normal_http, self.normal_grpc, self.abandoned_http, self.abandoned_grpc,
                 self.invalid, self.invalid, self.nested, self.huge_body, self.huge_headers]
        while time.monotonic() < deadline:
            kind = random.choice(kinds)
            try:
                self.outcomes[await asyncio.wait_for(kind(), 90)] += 1
            except Exception as exc:  # noqa: BLE001 - a soak counts, it does not stop
                self.outcomes[f"{kind.__name__}:{type(exc).__name__}"] += 1

    async def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        slow = [asyncio.ensure_future(self.slow_client()) for _ in range(4 if self.seconds > 15 else 0)]
        await asyncio.gather(*(self.worker(deadline) for _ in range(self.concurrency)))
        for r in await asyncio.gather(*slow, return_exceptions=True):
            self.outcomes[r if isinstance(r, str) else f"slow:{type(r).__name__}"] += 1


async def idle_state(grpc: str) -> dict[str, int]:
    from lmlink.client import AsyncClient

    async with AsyncClient(grpc, timeout=10) as c:
        info = await c.server_info()
    return {"active_streams": info.active_streams, "queued_requests": info.queued_requests}


def running_rows(state: Path) -> int:
    db = sqlite3.connect(state / "state.db")
    try:
        return db.execute("SELECT count(*) FROM requests WHERE outcome = 'running'").fetchone()[0]
    finally:
        db.close()


async def main_async(args: argparse.Namespace) -> int:
    state = Path(tempfile.mkdtemp(prefix="lmlink-soak-"))
    proc, ready = start_server(state)
    try:
        soak = Soak(ready, args.seconds, args.concurrency)
        # Warm up with a short round of the same mix, so the baseline already includes what
        # a server legitimately keeps after load (full executor pools, allocator arenas).
        await Soak(ready, args.warm_seconds, args.concurrency).run()
        await asyncio.sleep(6)
        base = proc_facts(proc.pid)
        t0 = time.monotonic()
        await soak.run()
        elapsed = time.monotonic() - t0
        end = time.monotonic() + 30
        while time.monotonic() < end:  # let abandoned work and keep-alives drain
            idle = await idle_state(soak.grpc)
            if not any(idle.values()):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(6)  # keep-alive timeout (5 s) closes idle client connections
        after = proc_facts(proc.pid)
        idle = await idle_state(soak.grpc)
        final = await soak.normal_grpc()
        async with httpx.AsyncClient(timeout=10) as c:
            health = (await c.get(f"{soak.http}/health")).status_code
        report = {
            "seconds": round(elapsed, 1), "concurrency": args.concurrency,
            "requests": sum(soak.outcomes.values()), "outcomes": dict(sorted(soak.outcomes.items())),
            "baseline": base, "after": after, "idle": idle,
            "audit_rows_running": running_rows(state), "final_request": final,
            "health": health,
        }
        ok = (not any(idle.values()) and report["audit_rows_running"] == 0 and final == "ok"
              and health == 200 and after["fds"] <= base["fds"] + 4
              and after["threads"] <= base["threads"] + 4
              and after["rss_mb"] <= base["rss_mb"] + max(64, base["rss_mb"] // 2))
        report["back_to_baseline"] = ok
        print(json.dumps(report, indent=None if args.json else 2))
        return 0 if ok else 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--warm-seconds", type=float, default=20)
    p.add_argument("--json", action="store_true")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
