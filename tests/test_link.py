"""`lmlink link` with two real lmlink servers on loopback (different models), driven by the
`openai` package: listing, streaming from each, preferences, failover before the first token,
503 when everything is down and recovery; plus remote model management over gRPC.

The tests in this module share the servers (some kill and restart them); each first puts the
rig in the state it needs (`Rig.ready`), so every test also passes when run alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import httpx
import openai
import pytest

from support.procs import die_with_parent

from lmlink.client import (Client, Completed, LoadProgress, ModelInfo, NotFound,
                           ResourceExhausted, TokenDelta)
from lmlink.engine.types import ModelNotFound
from lmlink.engine.loader import BUILTIN_MODEL_DIR
from lmlink.link.router import NoServer, Router, Server
from lmlink.v1 import inference_pb2 as pb
from lmlink.v1 import inference_pb2_grpc as pb_grpc

from conftest import ServerProcess, lmlink_cmd, start_server, stop_server
from support.link import ASK, start_link



def model_dir(root: Path, name: str) -> Path:
    d = root / name
    shutil.copytree(BUILTIN_MODEL_DIR, d)
    return d


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.alpha = model_dir(tmp, "alpha")
        self.beta = model_dir(tmp, "beta")
        self.a = self._serve("a", self.alpha)
        self.b = self._serve("b", self.beta)
        self.link, self.url = start_link(self.a.address, self.b.address)
        self.oai = openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=60)

    def _serve(self, name: str, model: Path, port: str = "0") -> ServerProcess:
        return start_server("--no-mdns", "--name", f"srv-{name}", "--state-dir",
                            str(self.tmp / f"state-{name}"), "--grpc-port", port, model=str(model))

    def restart(self, which: str) -> None:
        old = getattr(self, which)
        port = old.address.rpartition(":")[2]
        setattr(self, which, self._serve(which, self.alpha if which == "a" else self.beta, port))

    def ready(self, *, alpha_on_b: bool) -> None:
        """Put the rig in the state a test starts from, whatever earlier tests did to it: both
        servers up, alpha loaded on srv-b or not, and the link having seen it (each test must
        pass when run alone)."""
        for which in ("a", "b"):
            if not getattr(self, which).alive():
                self.restart(which)
        with Client(self.b.address, timeout=60) as c:
            loaded = {m.id for m in c.list_models() if m.state == "loaded"}
            if alpha_on_b and "alpha" not in loaded:
                assert isinstance(list(c.load_model(str(self.alpha)))[-1], ModelInfo)
            if not alpha_on_b and "alpha" in loaded:
                c.unload_model("alpha", drain_timeout=5)
        want = {"alpha", "beta"} | ({"alpha@srv-b"} if alpha_on_b else set())
        deadline = time.monotonic() + 10
        while not want <= (ids := {m.id for m in self.oai.models.list().data}):
            assert time.monotonic() < deadline, f"the link never listed {want - ids}"
            time.sleep(0.3)

    def close(self) -> None:
        for p in (self.link, self.a.process, self.b.process):
            stop_server(p)


@pytest.fixture(scope="module")
def rig(tmp_path_factory) -> Iterator[Rig]:
    r = Rig(tmp_path_factory.mktemp("link"))
    yield r
    r.close()


def served_by(rig: Rig, model: str, **extra) -> tuple[str, str]:
    raw = rig.oai.chat.completions.with_raw_response.create(
        model=model, messages=ASK, max_tokens=8, **extra)
    return raw.headers["x-lmlink-server"], raw.parse().choices[0].message.content


def link_status(rig: Rig) -> dict:
    return httpx.get(rig.url.removesuffix("/v1") + "/status", timeout=10).json()


# ----- routing units (no servers) --------------------------------------------------------------


def test_router_orders_by_preference_path_and_load():
    r = Router()
    near = r.add("127.0.0.1:1", name="near")
    far = r.add("100.64.0.2:1", name="far", path="relayed")
    busy = r.add("127.0.0.2:1", name="busy")
    for s, ms, active in ((near, 2.0, 0), (far, 1.0, 0), (busy, 1.0, 3)):
        s.up, s.models, s.latency_ms, s.active = True, ("m",), ms, active
    assert [s.name for s in r.candidates("m")[0]] == ["near", "busy", "far"]  # direct before relayed
    r.prefer = {"m": "far"}
    assert [s.name for s in r.candidates("m")[0]] == ["far", "near", "busy"]
    assert r.candidates("m@busy") == ([busy], True)
    with pytest.raises(NoServer) as missing:
        r.candidates("other")
    assert missing.value.status == 404 and "near: m" in missing.value.message
    for s in (near, far, busy):
        s.up, s.error = False, "connection refused"
    with pytest.raises(NoServer) as down:
        r.candidates("m")
    assert down.value.status == 503 and "127.0.0.1:1" in down.value.message


class _ProbedServer:
    """Answers the link's probes after a scripted delay (seconds), with a fixed load."""

    def __init__(self, name: str, active: int, delays: list[float]) -> None:
        self.name, self.active, self.delays = name, active, delays

    async def server_info(self, timeout=None):
        import asyncio
        from types import SimpleNamespace

        await asyncio.sleep(self.delays.pop(0) if len(self.delays) > 1 else self.delays[0])
        return SimpleNamespace(name=self.name, active_streams=self.active, queued_requests=0)

    async def list_models(self, timeout=None):
        from types import SimpleNamespace

        return [SimpleNamespace(id="m", state="loaded", aliases=(), context_length=2048)]


def test_one_slow_probe_does_not_send_requests_to_the_busy_server():
    """Regression: the idle server's probe landed while it computed a prefill (270 ms on a
    loaded host) and that one sample outweighed the busy server's 4 streams (+100 ms); the
    round trip is now the least of the last few probes."""
    import asyncio

    r = Router()
    idle, busy = r.add("127.0.0.1:1", name="idle"), r.add("127.0.0.1:2", name="busy")
    idle.client = _ProbedServer("idle", 0, [0.01, 0.01, 0.3])  # type: ignore[assignment]
    busy.client = _ProbedServer("busy", 4, [0.03])  # type: ignore[assignment]

    async def probes(n: int) -> None:
        for _ in range(n):
            await r.refresh()

    asyncio.run(probes(3))
    assert idle.latency_ms < 200 and busy.active == 4, (idle, busy)
    assert [s.name for s in r.candidates("m")[0]] == ["idle", "busy"]


def test_link_prefer_command_stores_the_preference(tmp_path):
    env = {**os.environ, "LMLINK_CONFIG_DIR": str(tmp_path)}
    out = subprocess.run(lmlink_cmd("link", "prefer", "qwen", "studio"), env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    from lmlink.link.config import load_link_config

    assert load_link_config(tmp_path).prefer == {"qwen": "studio"}
    subprocess.run(lmlink_cmd("link", "prefer", "qwen", "--clear"), env=env, timeout=30, check=True)
    assert load_link_config(tmp_path).prefer == {}


# ----- the link with real servers --------------------------------------------------------------


def test_lists_every_model_on_every_server(rig):
    rig.ready(alpha_on_b=False)
    ids = {m.id for m in rig.oai.models.list().data}
    assert {"alpha", "beta", "alpha@srv-a", "beta@srv-b"} <= ids
    cards = {m.id: m for m in rig.oai.models.list().data}
    assert cards["alpha"].owned_by == "srv-a" and cards["beta@srv-b"].owned_by == "srv-b"


@pytest.mark.parametrize("model,which", [("alpha", "a"), ("beta", "b")])
def test_streams_from_each_server_end_to_end(rig, model, which):
    rig.ready(alpha_on_b=False)
    server = getattr(rig, which)
    with Client(server.address, timeout=60) as c:
        direct = c.chat(ASK, model=model, max_tokens=16)
    stream = rig.oai.chat.completions.create(model=model, messages=ASK, max_tokens=16,
                                             stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.text and chunks[-1].usage.completion_tokens == len(direct.token_ids)
    assert chunks[0].model == model
    whole = rig.oai.completions.create(model=model, prompt="Once upon a time", max_tokens=8)
    assert whole.choices[0].text and whole.usage.completion_tokens <= 8
    assert served_by(rig, model)[0] == f"srv-{which}"


def test_unknown_model_is_an_openai_404(rig):
    with pytest.raises(openai.NotFoundError) as err:
        rig.oai.chat.completions.create(model="nope", messages=ASK, max_tokens=4)
    assert "not loaded on any reachable server" in err.value.message


def first_token(stream) -> tuple[list[object], threading.Thread]:
    """Read `stream` until its first token (so it is decoding on the server), then keep reading
    it in a thread; the returned list fills with every event."""
    seen: list[object] = []
    it = iter(stream)
    while not isinstance(event := next(it), TokenDelta):
        seen.append(event)
    seen.append(event)
    t = threading.Thread(target=lambda: seen.extend(it))
    t.start()
    return seen, t


def test_load_and_unload_over_grpc(rig, tmp_path):
    rig.ready(alpha_on_b=False)
    with Client(rig.b.address, timeout=60) as c:
        events = list(c.load_model(str(rig.alpha)))
        progress = [e for e in events if isinstance(e, LoadProgress)]
        stages = [p.stage for i, p in enumerate(progress) if i == 0 or p.stage != progress[i - 1].stage]
        assert stages == ["resolving", "checking_memory", "loading", "starting", "ready"]
        assert [p.fraction for p in progress] == sorted(p.fraction for p in progress)
        assert isinstance(events[-1], ModelInfo) and events[-1].state == "loaded"
        states = {m.id: m for m in c.list_models()}
        assert states["alpha"].state == "loaded" and states["beta"].state == "loaded"
        assert states["alpha"].memory_bytes > 0
        assert states["lmlink-tiny"].state == "available"

        # Unloading while a stream runs: wait (drain) for it to finish ...
        # (400 tokens take 1-3 s here, so it is still decoding when the unload arrives)
        seen, t = first_token(c.stream(messages=ASK, model="alpha", max_tokens=400,
                                       ignore_eos=True))
        result = c.unload_model("alpha", drain_timeout=30)
        t.join(30)
        assert not t.is_alive()
        assert (result.drained_streams, result.cancelled_streams) == (1, 0)
        assert isinstance(seen[-1], Completed) and seen[-1].finish_reason == "length"
        assert seen[-1].usage.completion_tokens == 400  # drained in full, not cut
        assert {m.id: m.state for m in c.list_models()}["alpha"] == "available"

        # ... or cancel a long one; it ends with finish_reason "cancelled", no error.
        assert isinstance(list(c.load_model("alpha"))[-1], ModelInfo)  # by id, now "available"
        events_seen, t = first_token(c.stream(messages=ASK, model="alpha", max_tokens=2000,
                                              ignore_eos=True))
        result = c.unload_model("alpha", drain_timeout=0.2)
        t.join(10)
        assert (result.drained_streams, result.cancelled_streams) == (0, 1)
        done = events_seen[-1]
        assert isinstance(done, Completed) and done.finish_reason == "cancelled"
        assert 0 < done.usage.completion_tokens < 2000
        with pytest.raises(NotFound, match="not loaded"):
            c.chat(ASK, model="alpha", max_tokens=2)

        # A model that would not fit is refused before anything is read.
        huge = tmp_path / "huge"
        shutil.copytree(BUILTIN_MODEL_DIR, huge)
        with open(huge / "model.safetensors", "r+b") as f:
            f.truncate(1 << 40)  # sparse: 1 TB on paper
        with pytest.raises(ResourceExhausted, match="needs about .* available"):
            list(c.load_model(str(huge)))
        assert "huge" not in {m.id for m in c.list_models()}
        assert isinstance(list(c.load_model("alpha"))[-1], ModelInfo)  # for the tests below


def test_a_non_owner_may_not_load_or_unload(rig):
    rig.ready(alpha_on_b=True)
    out = subprocess.run(lmlink_cmd("token", "create", "--name", "bob", "--as", "bob@example.com",
                                    "--state-dir", str(rig.tmp / "state-b")),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    bob = [("authorization", f"Bearer {out.stdout.strip()}")]
    with grpc.insecure_channel(rig.b.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for call in (lambda: list(stub.LoadModel(pb.LoadModelRequest(model="builtin"), metadata=bob,
                                                  timeout=10)),
                     lambda: stub.UnloadModel(pb.UnloadModelRequest(model="beta"), metadata=bob,
                                              timeout=10)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "only the owner" in err.value.details()
    cli = subprocess.run(lmlink_cmd("models", "list", "--server", rig.b.address, "--json"),
                         capture_output=True, text=True, timeout=30)
    assert {m["id"] for m in json.loads(cli.stdout)} >= {"alpha", "beta"}


def test_follows_a_preference(rig):
    rig.ready(alpha_on_b=True)
    env = dict(os.environ)
    for target in ("srv-b", "srv-a", "srv-b"):
        subprocess.run(lmlink_cmd("link", "prefer", "alpha", target), env=env, check=True,
                       capture_output=True, timeout=30)
        assert {served_by(rig, "alpha")[0] for _ in range(3)} == {target}
    assert served_by(rig, "alpha@srv-a")[0] == "srv-a"  # a pin beats the preference


def test_fails_over_before_the_first_token_when_a_server_is_killed(rig):
    rig.ready(alpha_on_b=True)
    subprocess.run(lmlink_cmd("link", "prefer", "alpha", "srv-a"), check=True,
                   capture_output=True, timeout=30)
    before = link_status(rig)["failovers"]
    os.killpg(rig.a.process.pid, signal.SIGKILL)
    rig.a.process.wait(10)
    # The link still believes srv-a is up (it probes every 30 s here): the request goes there
    # first, fails before any token, and is retried on srv-b.
    stream = rig.oai.chat.completions.create(model="alpha", messages=ASK, max_tokens=12,
                                             stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    with Client(rig.b.address, timeout=60) as c:
        assert text == c.chat(ASK, model="alpha", max_tokens=12).text  # once, not duplicated
    assert link_status(rig)["failovers"] == before + 1
    assert served_by(rig, "alpha")[0] == "srv-b"


def test_503_when_every_server_is_down_then_recovers(rig):
    rig.ready(alpha_on_b=True)
    for srv in (rig.a, rig.b):
        os.killpg(srv.process.pid, signal.SIGKILL)
        srv.process.wait(10)
    with pytest.raises(openai.APIStatusError) as err:
        rig.oai.chat.completions.create(model="alpha", messages=ASK, max_tokens=4)
    assert err.value.status_code == 503
    body = err.value.response.json()["error"]
    assert body["type"] == "server_error" and body["code"] in ("no_server_reachable",
                                                               "no_server_available")
    assert rig.a.address in body["message"] and rig.b.address in body["message"]
    health = httpx.get(rig.url.removesuffix("/v1") + "/health", timeout=10)
    assert health.status_code == 503
    assert rig.oai.models.list().data == []

    rig.restart("a")
    deadline = time.monotonic() + 20
    while True:
        try:
            who, text = served_by(rig, "alpha")
            break
        except openai.APIStatusError:
            assert time.monotonic() < deadline, "the link did not recover"
            time.sleep(0.2)
    assert who == "srv-a" and text


def test_idle_ttl_unloads_only_idle_models():
    from types import SimpleNamespace

    from lmlink.engine.registry import ModelRegistry

    class FakeEngine:
        def __init__(self, name: str) -> None:
            self.loaded = SimpleNamespace(id=name, aliases=(), context_length=8, memory_bytes=64,
                                          path=Path("/models") / name)
            self.model_id, self.busy, self.stopped = name, 0, False

        def stats(self):
            return SimpleNamespace(active=self.busy, queued=0)

        def stop(self) -> None:
            self.stopped = True

    reg = ModelRegistry()
    idle, busy = FakeEngine("idle"), FakeEngine("busy")
    reg.add(idle, idle_ttl=5)
    reg.add(busy, idle_ttl=5)
    busy.busy = 1
    now = time.monotonic()
    assert reg.idle_expired(now + 1) == []
    assert reg.idle_expired(now + 6) == ["idle"]  # a model with a stream is never idle
    entry = reg.begin_unload("idle")
    with pytest.raises(ModelNotFound, match="being unloaded"):
        reg.resolve("idle")
    assert reg.finish_unload(entry) == 64 and idle.stopped
    assert {e.id: e.state for e in reg.entries()} == {"idle": "available", "busy": "loaded"}
    reg.default_idle_ttl = 0
    assert reg.idle_expired(now + 100) == []  # busy stays: it was used at now + 6


def test_routes_away_from_a_server_under_real_load(tmp_path):
    """Two real servers with the same model; one is kept busy by direct clients. The link sees
    the load in GetServerInfo and sends new requests to the idle one."""
    dirs = [model_dir(tmp_path / side, "gamma") for side in ("x", "y")]
    busy = start_server("--no-mdns", "--name", "busy", "--state-dir", str(tmp_path / "s1"),
                        model=str(dirs[0]))
    idle = start_server("--no-mdns", "--name", "idle", "--state-dir", str(tmp_path / "s2"),
                        model=str(dirs[1]))
    link = None
    streams = []
    try:
        load = Client(busy.address, timeout=120)
        for _ in range(4):  # long streams that keep `busy` loaded for the whole test
            s = load.stream(prompt="Once upon a time", max_tokens=1900, ignore_eos=True)
            it = iter(s)
            next(it)  # Started: the request is on the server
            streams.append((s, it))
        link, url = start_link(busy.address, idle.address, refresh=0.3)
        oai = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            seen = {d["server"]: d for d in httpx.get(url.removesuffix("/v1") + "/status",
                                                      timeout=10).json()["servers"]}
            # both measured over a few probes (the round trip is the least of them)
            if seen.get("busy", {}).get("active_streams", 0) >= 1 and all(
                    seen.get(n, {}).get("up") and seen[n].get("latency_samples", 0) >= 3
                    for n in ("busy", "idle")):
                break
            time.sleep(0.2)
        assert seen["busy"]["active_streams"] >= 1 and seen["idle"]["latency_samples"] >= 3, seen
        who = set()
        for _ in range(4):
            raw = oai.chat.completions.with_raw_response.create(model="gamma", messages=ASK,
                                                                 max_tokens=4)
            who.add(raw.headers["x-lmlink-server"])
        assert who == {"idle"}, who
    finally:
        for s, _ in streams:
            s.cancel()
        if link is not None:
            stop_server(link)
        stop_server(busy.process)
        stop_server(idle.process)
