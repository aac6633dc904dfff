"""Running the server like infrastructure, against real parts: a SIGTERM drain with running
streams (gRPC client, curl-like httpx), the status page rendered by headless Chromium, and a
real Prometheus scraping /metrics and answering queries. Everything stays on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import REPO, start_server, stop_server
from lmlink.client import Client
from lmlink.client.errors import LmlinkError

ARTIFACTS = REPO / "test-artifacts"
LONG = {"max_tokens": 1500, "ignore_eos": True}
HI = [{"role": "user", "content": "Tell me about rivers."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Streams:
    """`n` gRPC streams in threads; records first-token arrival and how each one ended."""

    def __init__(self, address: str, n: int, **options: Any) -> None:
        self.started = threading.Barrier(n + 1, timeout=60)
        self.results: list[Any] = [None] * n
        self.threads = [threading.Thread(target=self._run, args=(address, i, options), daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()
        self.started.wait()

    def _run(self, address: str, i: int, options: dict[str, Any]) -> None:
        first = True
        text = []
        try:
            with Client(address) as client:
                for event in client.stream(messages=HI, **options):
                    delta = getattr(event, "text", None)
                    if delta:
                        text.append(delta)
                        if first:
                            first = False
                            self.started.wait()
                    if getattr(event, "finish_reason", None):
                        self.results[i] = ("done", event.finish_reason, event.usage.completion_tokens)
        except LmlinkError as exc:
            self.results[i] = ("error", exc.kind or str(exc.code), str(exc))
            if first:
                self.started.abort()

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)


def _state_dir_server(tmp_path: Path, *extra: str):
    return start_server("--state-dir", str(tmp_path / "state"), *extra)


def _audit_rows(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "state" / "audit.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def test_sigterm_drains_running_streams_and_refuses_new_ones(tmp_path):
    srv = _state_dir_server(tmp_path, "--drain-timeout", "60")
    try:
        streams = Streams(srv.address, 4, max_tokens=300, ignore_eos=True)
        srv.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with Client(srv.address) as client, pytest.raises(LmlinkError) as refused:
            client.chat(HI, max_tokens=4)
        assert refused.value.kind == "unavailable" and "shutting down" in str(refused.value)
        r = httpx.post(f"{srv.http_url}/v1/chat/completions", timeout=10,
                       json={"model": srv.model, "messages": HI, "max_tokens": 4})
        assert r.status_code == 503, r.text
        streams.join(60)
        assert [r[:2] for r in streams.results] == [("done", "length")] * 4
        assert [r[2] for r in streams.results] == [300] * 4  # whole answers
        assert srv.process.wait(30) == 0
    finally:
        stop_server(srv.process)
    rows = [r for r in _audit_rows(tmp_path) if r.get("event") == "request"]
    assert sorted(r["outcome"] for r in rows if r["via"] == "grpc") == ["completed"] * 4
    assert all(r["outcome"] != "running" for r in rows)


def test_second_signal_cuts_running_streams_at_once(tmp_path):
    srv = _state_dir_server(tmp_path, "--drain-timeout", "600")
    try:
        streams = Streams(srv.address, 2, **LONG)
        srv.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        t0 = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        streams.join(30)
        assert time.monotonic() - t0 < 10
        for result in streams.results:
            assert result[0] == "error" and result[1] == "unavailable", result
            assert "shut down before this answer finished" in result[2]
        assert srv.process.wait(30) == 0
    finally:
        stop_server(srv.process)
    rows = [r for r in _audit_rows(tmp_path) if r.get("event") == "request"]
    assert len(rows) == 2 and {r["outcome"] for r in rows} == {"cancelled"}


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed (scripts/system-packages.txt installs it)")
    return path


def _chromium_run(url: str, *args: str) -> str:
    profile = tempfile.mkdtemp(prefix="lmlink-chromium-")
    try:
        out = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=4000",
             *args, url],
            capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_status_page_renders_in_chromium(tmp_path):
    srv = _state_dir_server(tmp_path)
    try:
        streams = Streams(srv.address, 2, **LONG)
        dom = _chromium_run(f"{srv.http_url}/", "--dump-dom")
        models, active = _table(dom, "models"), _table(dom, "active")
        assert models[0][:2] == [srv.model, "loaded"], models
        assert [row[1:3] for row in active] == [[srv.model, "grpc"]] * 2, active  # rendered rows
        assert 'id="error" role="alert"></div>' in dom  # no error shown
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "status-page.png"
        shot.unlink(missing_ok=True)
        _chromium_run(f"{srv.http_url}/", f"--screenshot={shot}", "--window-size=390,844")
        assert shot.stat().st_size > 5000
        for s in streams.threads:
            s.join(0)
    finally:
        stop_server(srv.process)


def _table(dom: str, table_id: str) -> list[list[str]]:
    """The rendered rows (cell texts) of a table in Chromium's DOM dump."""
    import re

    body = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert body, f"no table {table_id}"
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S)]


def _query(prom: str, q: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": q}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def test_real_prometheus_scrapes_both_ports(tmp_path):
    metrics_port = _free_port()
    srv = _state_dir_server(tmp_path, "--metrics-port", str(metrics_port))
    prom_port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: lmlink-local\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
        f"  - job_name: lmlink-bridge\n    static_configs: [{{targets: ['{srv.http}']}}]\n")
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed (scripts/system-packages.txt installs it)")
    prom = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{prom_port}"
    try:
        with Client(srv.address) as client:
            for _ in range(3):
                client.chat(HI, max_tokens=8)
        deadline = time.monotonic() + 60
        done: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                done = _query(url, 'lmlink_requests_total{outcome="completed"}')
                up = _query(url, "up")
            except httpx.HTTPError:
                time.sleep(0.5)
                continue
            if len(done) == 2 and all(float(s["value"][1]) == 3 for s in done) \
                    and all(s["value"][1] == "1" for s in up) and len(up) == 2:
                break
            time.sleep(0.5)
        assert {s["metric"]["job"] for s in done} == {"lmlink-local", "lmlink-bridge"}, done
        assert all(float(s["value"][1]) == 3 for s in done)
        ttft = _query(url, "lmlink_time_to_first_token_seconds_count")
        assert ttft and all(float(s["value"][1]) == 3 for s in ttft)
        state = _query(url, "lmlink_model_state")
        assert {s["metric"]["model"] for s in state} == {srv.model}
    finally:
        prom.terminate()
        prom.wait(10)
        stop_server(srv.process)


def test_lmlink_top_shows_streams_over_grpc(tmp_path):
    from conftest import lmlink_cmd

    srv = _state_dir_server(tmp_path)
    try:
        streams = Streams(srv.address, 2, **LONG)
        snap = subprocess.run(lmlink_cmd("top", "--server", srv.address, "--json"),
                              capture_output=True, text=True, timeout=60)
        assert snap.returncode == 0, snap.stderr
        status = json.loads(snap.stdout)
        assert [m["name"] for m in status["models"]] == [srv.model]
        assert [a["door"] for a in status["active"]] == ["grpc", "grpc"]
        frame = subprocess.run(lmlink_cmd("top", "--server", srv.address, "--once"),
                               capture_output=True, text=True, timeout=60,
                               env={**os.environ, "COLUMNS": "100"})
        assert frame.returncode == 0, frame.stderr
        assert "active streams" in frame.stdout and frame.stdout.count("grpc") == 2
        live = subprocess.Popen(lmlink_cmd("top", "--server", srv.address, "--interval", "0.2"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "COLUMNS": "100"})
        time.sleep(2.0)
        live.send_signal(signal.SIGINT)
        out, err = live.communicate(timeout=20)
        assert live.returncode == 130 and "Traceback" not in err, err
        assert "active streams" in out  # (not a terminal: rich prints the last frame)
        for s in streams.threads:
            s.join(0)
    finally:
        stop_server(srv.process)


def test_link_status_page_shows_servers_and_routing_choices(tmp_path):
    from support.link import start_link

    srv = _state_dir_server(tmp_path)
    link = None
    try:
        link, url = start_link(srv.address)
        base = url.removesuffix("/v1")
        r = httpx.post(f"{url}/chat/completions", timeout=60,
                       json={"model": srv.model, "messages": HI, "max_tokens": 4})
        assert r.status_code == 200, r.text
        dom = _chromium_run(f"{base}/", "--dump-dom")
        servers, routes = _table(dom, "servers"), _table(dom, "routes")
        assert len(servers) == 1 and srv.address in servers[0][0] and servers[0][1] == "loopback"
        assert float(servers[0][2]) > 0  # a measured latency
        assert [row[1:] for row in routes] == [[srv.model, servers[0][0].split(" ")[0],
                                                "best path, latency and load"]]
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "link-page.png"
        shot.unlink(missing_ok=True)
        _chromium_run(f"{base}/", f"--screenshot={shot}", "--window-size=390,844")
        assert shot.stat().st_size > 5000
    finally:
        if link is not None:
            stop_server(link)
        stop_server(srv.process)
