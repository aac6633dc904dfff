"""Durable access state: `kill -9` a serving `lmlink serve` and start it again on the same state dir.

A local-mode server; a bearer token bound to bob (whose local share has a daily token quota)
makes bob a non-owner caller over the real HTTP bridge. After the kill: shares, tokens and
usage read back exactly (the stream that was running is recorded as interrupted, with the
tokens it had been charged), the quota goes on from where it was, and the audit file has
every record once.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time

import httpx
import pytest

from conftest import lmlink_cmd, start_server, stop_server
from lmlink.client import Client, LmlinkError, TokenDelta

MODEL = "lmlink-tiny"


def cli(state, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(lmlink_cmd(*args, "--state-dir", str(state)), capture_output=True,
                          text=True, timeout=30)


def ask(srv, token: str, max_tokens: int) -> httpx.Response:
    return httpx.post(f"{srv.http_url}/v1/completions", timeout=30,
                      headers={"authorization": f"Bearer {token}"},
                      json={"model": MODEL, "prompt": "Once", "max_tokens": max_tokens,
                            "ignore_eos": True})


def snapshot(state) -> dict:
    out = {}
    for name, args in {"shares": ("share", "list", "--all", "--json"),
                       "tokens": ("token", "list", "--all", "--json"),
                       "usage": ("usage", "--json"),
                       "by_model": ("usage", "--by", "model", "--json")}.items():
        res = cli(state, *args)
        assert res.returncode == 0, res.stderr
        out[name] = json.loads(res.stdout)
    return out


def db_counts(state) -> dict:
    db = sqlite3.connect(state / "state.db")
    try:
        usage = dict(db.execute("SELECT principal, sum(tokens) FROM usage WHERE window = 'day'"
                                " GROUP BY principal").fetchall())
        requests = dict(db.execute("SELECT principal, sum(completion_tokens) FROM requests"
                                   " GROUP BY principal").fetchall())
        outcomes = db.execute("SELECT outcome, count(*) FROM requests GROUP BY outcome").fetchall()
    finally:
        db.close()
    return {"usage": usage, "requests": requests, "outcomes": dict(outcomes)}


@pytest.mark.timeout(90)
def test_kill_9_keeps_shares_tokens_and_usage(tmp_path):
    state = tmp_path / "state"
    made = cli(state, "token", "create", "--name", "script", "--as", "bob@example.com", "--json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    assert cli(state, "share", "add", "bob@example.com", "--model", MODEL,
               "--tokens-per-day", "100").returncode == 0
    assert cli(state, "share", "add", "tag:ci", "--model", "*", "--max-streams", "3",
               "--expires", "30d").returncode == 0
    assert cli(state, "share", "add", "group:eng", "--model", MODEL).returncode == 0
    assert cli(state, "share", "revoke", "group:eng").returncode == 0

    srv = start_server("--state-dir", str(state))
    try:
        for _ in range(3):
            r = ask(srv, token, 20)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 20
        # the owner streams a long answer; the server is killed in the middle of it
        seen = threading.Event()
        got = {"tokens": 0}

        def long_stream() -> None:
            try:
                with Client(srv.address, timeout=30) as c:
                    for ev in c.stream(prompt="Once upon a time", max_tokens=1800, ignore_eos=True):
                        if isinstance(ev, TokenDelta):
                            got["tokens"] += len(ev.token_ids)
                            if got["tokens"] >= 50:
                                seen.set()
            except LmlinkError:
                pass
            seen.set()

        t = threading.Thread(target=long_stream, daemon=True)
        t.start()
        assert seen.wait(20)
        time.sleep(1.3)  # at least one periodic flush of the running stream's tokens
        os.killpg(srv.process.pid, signal.SIGKILL)
        srv.process.wait(10)
        t.join(10)
    finally:
        stop_server(srv.process)

    before = snapshot(state)
    counts_before = db_counts(state)
    assert counts_before["outcomes"].get("running") == 1  # the killed stream, mid-way
    running_tokens = counts_before["requests"]["local"]
    assert 50 <= running_tokens <= got["tokens"]  # charged what was flushed, never more
    bob = {r["user"]: r for r in before["usage"]["rows"]}["bob@example.com"]
    assert bob["completion_tokens"] == 60 and bob["completed"] == 3

    srv = start_server("--state-dir", str(state))
    try:
        after = snapshot(state)
        counts_after = db_counts(state)
        # nothing lost, nothing counted twice; the running request is now "interrupted"
        assert after["shares"] == before["shares"]
        assert after["tokens"] == before["tokens"]
        assert counts_after["usage"] == counts_before["usage"]
        assert counts_after["requests"] == counts_before["requests"]
        assert counts_after["usage"] == counts_after["requests"]  # buckets == audit rows
        assert counts_after["outcomes"].get("interrupted") == 1
        assert "running" not in counts_after["outcomes"]
        rows_before = {r["user"]: r for r in before["usage"]["rows"]}
        rows_after = {r["user"]: r for r in after["usage"]["rows"]}
        assert rows_after["bob@example.com"] == rows_before["bob@example.com"]
        assert rows_after["local"]["completion_tokens"] == rows_before["local"]["completion_tokens"]
        assert rows_after["local"]["failed"] == 1 and rows_after["local"]["running"] == 0
        assert after["by_model"]["rows"][0]["completion_tokens"] == 60 + running_tokens

        # the quota continues: 40 of bob's 100 tokens per day are left
        r = ask(srv, token, 60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40
        assert r.json()["choices"][0]["finish_reason"] == "length"
        r = ask(srv, token, 5)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "quota_exceeded"
        assert "100 tokens per day" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) > 80000  # a day, minus a few seconds
        # the token and the share survived: a revoked token is refused at once
        assert cli(state, "token", "revoke", "script").returncode == 0
        assert ask(srv, token, 5).status_code == 401
    finally:
        stop_server(srv.process)

    # audit.jsonl: every record exactly once, in order, the interrupted stream included
    lines = [json.loads(x) for x in (state / "audit.jsonl").read_text().splitlines()]
    assert [x["seq"] for x in lines] == list(range(1, len(lines) + 1))
    outcomes = [x["outcome"] for x in lines if x["event"] == "request"]
    assert outcomes == ["completed"] * 3 + ["interrupted", "completed", "rate_limited"]
    interrupted = next(x for x in lines if x.get("outcome") == "interrupted")
    assert interrupted["completion_tokens"] == running_tokens and interrupted["login"] == "local"
    assert all("prompt" not in x for x in lines)
