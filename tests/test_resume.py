"""Resumable streams (lmlink.api.resume): a stream whose connection drops is picked up again
by the same caller, token for token, without recomputing; nobody else can; expiry is clear;
memory stays bounded.

Real parts: `lmlink serve` on loopback with the built-in model (greedy, so an uninterrupted
run is the reference), a TCP forwarder whose connections the test resets (tests/support/
cutproxy.py), lmlink's own client, httpx for SSE. In-process servers where a test needs two
identities or a short grace period.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any, AsyncIterator

import grpc
import httpx
import pytest

from conftest import start_server, stop_server
from lmlink.access.identity import Identity
from lmlink.api.errors import CallError, ErrorKind
from lmlink.api.gate import Verdict
from lmlink.api.resume import ResumeOptions, ResumeStore
from lmlink.client import Client
from lmlink.client.events import TokenDelta
from lmlink.engine.types import Completed, Started
from lmlink.engine.types import TokenDelta as EngineDelta
from lmlink.v1 import inference_pb2 as pb
from lmlink.v1 import inference_pb2_grpc as pb_grpc
from support.checks import wait_idle
from support.cutproxy import CutProxy
from support.inprocess import http_bridge

PROMPT = "Once upon a time"
N = 300  # tokens per answer: long enough to cut in the middle


@pytest.fixture(scope="module")
def served():
    srv = start_server()
    with Client(srv.address, timeout=60) as c:
        reference = c.complete(PROMPT, max_tokens=N, ignore_eos=True)
        yield srv, c, reference
    stop_server(srv.process)


def _sse_text(lines: list[str]) -> tuple[str, int | None]:
    """Text of completion chunks, and the last `id:` number seen."""
    import json

    text, last = [], None
    for line in lines:
        if line.startswith("id: "):
            last = int(line.rpartition(":")[2])
        elif line.startswith("data: ") and line != "data: [DONE]":
            body = json.loads(line[len("data: "):])
            if "error" in body:
                raise AssertionError(body)
            text.append(body["choices"][0]["text"])
    return "".join(text), last


# ----- gRPC -----------------------------------------------------------------------------------


def test_grpc_stream_cut_mid_way_resumes_by_itself_token_for_token(served):
    srv, _, reference = served
    host, port = srv.address.rsplit(":", 1)
    proxy = CutProxy((host, int(port)))
    try:
        with Client(proxy.address, timeout=60) as c:
            stream = c.stream(prompt=PROMPT, max_tokens=N, ignore_eos=True)
            text, ids, deltas, cuts = [], [], 0, 0
            for event in stream:
                if isinstance(event, TokenDelta):
                    text.append(event.text)
                    ids.extend(event.token_ids)
                    deltas += 1
                    # early cut points: with prompt lookup the 300 tokens may come in ~20 deltas
                    if deltas in (3, 12) and cuts < 2:
                        cuts += proxy.cut() > 0  # the connection dies, as on a network change
        assert cuts == 2 and stream.resumed >= 2, (cuts, stream.resumed)
        assert proxy.connections >= 3
        assert "".join(text) == reference.text
        assert ids == reference.token_ids
    finally:
        proxy.close()


def test_grpc_resume_rpc_after_a_dropped_call(served):
    """The wire protocol: Generate, drop the call after some events, Resume(after=index)."""
    srv, _, reference = served
    channel = grpc.insecure_channel(srv.address)
    stub = pb_grpc.InferenceStub(channel)
    request = pb.GenerateRequest(prompt=PROMPT, request_id="resume-rpc-1",
                                 sampling=pb.SamplingParams(max_tokens=N, ignore_eos=True))
    call = stub.Generate(request, timeout=60)
    before, last = [], 0
    for message in call:
        assert message.index == last + 1  # numbered 1, 2, 3...
        last = message.index
        if message.WhichOneof("event") == "delta":
            before.append(message.delta.text)
            if len(before) == 10:
                break
    call.cancel()  # the server sees the client go: it detaches, it does not cancel
    time.sleep(0.5)
    after, kinds = [], []
    for message in stub.Resume(pb.ResumeRequest(request_id="resume-rpc-1", after=last), timeout=60):
        assert message.index == last + 1 and message.request_id == "resume-rpc-1"
        last = message.index
        kinds.append(message.WhichOneof("event"))
        if message.WhichOneof("event") == "delta":
            after.append(message.delta.text)
    assert kinds[-1] == "completed"
    assert "".join(before) + "".join(after) == reference.text
    # Kept for the grace period although all was sent (a dying link may not have carried
    # it): resuming after the last event is an empty, successful stream.
    assert list(stub.Resume(pb.ResumeRequest(request_id="resume-rpc-1", after=last), timeout=10)) == []
    channel.close()


def test_cancel_rpc_means_not_kept(served):
    srv, c, _ = served
    stream = c.stream(prompt=PROMPT, max_tokens=1900, ignore_eos=True)
    for event in stream:
        if isinstance(event, TokenDelta):
            stream.cancel()  # explicit: Cancel RPC, the slot is freed now, not after 60 s
            break
    assert wait_idle(c) == 0
    with grpc.insecure_channel(srv.address) as channel:
        with pytest.raises(grpc.RpcError) as gone:
            stub = pb_grpc.InferenceStub(channel)
            next(iter(stub.Resume(pb.ResumeRequest(request_id=stream.request_id), timeout=10)))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


# ----- SSE ------------------------------------------------------------------------------------


def test_sse_stream_dropped_then_resumed_with_last_event_id(served):
    srv, _, reference = served
    url = srv.http_url
    body = {"prompt": PROMPT, "max_tokens": N, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", f"{url}/v1/completions", json=body,
                      headers={"x-request-id": "sse-resume-1"}) as r:
            assert r.status_code == 200
            it = r.iter_lines()
            while sum(line.startswith("data: ") for line in lines) < 8:
                lines.append(next(it))
        # leaving the block closed the connection mid-stream
    before, last = _sse_text(lines)
    assert before and last is not None and last >= 1
    time.sleep(0.3)
    with httpx.Client(timeout=60) as h:
        with h.stream("GET", f"{url}/v1/streams/sse-resume-1",
                      headers={"last-event-id": f"sse-resume-1:{last}"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            rest = list(r.iter_lines())
    after, _ = _sse_text(rest)
    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
    assert before + after == reference.text


def test_sse_resume_refusals(served):
    srv, _, _ = served
    url = srv.http_url
    unknown = httpx.get(f"{url}/v1/streams/never-was")
    assert unknown.status_code == 404 and "no resumable stream" in unknown.json()["error"]["message"]
    bad = httpx.get(f"{url}/v1/streams/x", headers={"last-event-id": "y:3"})
    assert bad.status_code == 400


# ----- identity and expiry (in-process: two callers, short grace) -------------------------------


class TwoCallers:
    """Nobody is known by address; bearer tokens name alice or bob, both may generate."""

    def identify(self, peer: str) -> Identity | None:
        return None

    def check(self, identity: Identity, action: str, model: str = "") -> Verdict:
        return Verdict(True)


class Tokens:
    def verify(self, token: str) -> Identity | None:
        return {"alice": Identity(login_name="alice@x", node_name="alice-phone", source="token"),
                "bob": Identity(login_name="bob@x", node_name="bob-phone", source="token")}.get(token)


async def _start_and_drop(h: httpx.AsyncClient, rid: str, who: str, deltas: int = 3) -> int:
    body = {"prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    last = 0
    async with h.stream("POST", "/v1/completions", json=body,
                        headers={"x-request-id": rid, "authorization": f"Bearer {who}"}) as r:
        assert r.status_code == 200
        seen = 0
        async for line in r.aiter_lines():
            if line.startswith("id: "):
                last = int(line.rpartition(":")[2])
                seen += 1
                if seen >= deltas:
                    break
    return last


async def test_another_caller_cannot_resume_and_learns_nothing(engine):
    async with http_bridge(engine, TwoCallers(), bearer=Tokens()) as (url, bridge), \
            httpx.AsyncClient(base_url=url, timeout=60) as h:
        last = await _start_and_drop(h, "alice-1", "alice")
        await asyncio.sleep(0.2)
        assert bridge.core.streams.detached == 1
        theirs = await h.get("/v1/streams/alice-1", headers={"authorization": "Bearer bob",
                                                              "last-event-id": f"alice-1:{last}"})
        nothing = await h.get("/v1/streams/alice-2", headers={"authorization": "Bearer bob"})
        assert theirs.status_code == nothing.status_code == 404
        # The same answer as for an id that never existed: no request id leaks.
        assert theirs.json()["error"]["message"].replace("alice-1", "ID") == \
            nothing.json()["error"]["message"].replace("alice-2", "ID")
        # Bob's attempt did not end it: alice resumes.
        async with h.stream("GET", "/v1/streams/alice-1",
                            headers={"authorization": "Bearer alice",
                                     "last-event-id": f"alice-1:{last}"}) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines()]
        assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
        assert bridge.core.streams.detached == 1 and bridge.core.streams.find("alice-1", "token:alice@x").done


async def test_expired_stream_is_cancelled_and_gets_a_clear_error(engine):
    async with http_bridge(engine, TwoCallers(), bearer=Tokens()) as (url, bridge), \
            httpx.AsyncClient(base_url=url, timeout=60) as h:
        bridge.core.streams.options = ResumeOptions(grace_seconds=0.3)
        await _start_and_drop(h, "late-1", "alice")
        await asyncio.sleep(0.1)
        assert engine.stats().active + engine.stats().queued == 1  # still generating, detached
        await asyncio.sleep(0.8)
        assert engine.stats().active + engine.stats().queued == 0  # expired: engine cancelled
        late = await h.get("/v1/streams/late-1", headers={"authorization": "Bearer alice"})
        assert late.status_code == 404
        assert "expired: nobody reconnected within 0.3 s" in late.json()["error"]["message"]
        other = await h.get("/v1/streams/late-1", headers={"authorization": "Bearer bob"})
        assert other.status_code == 404 and "0.3 s" not in other.json()["error"]["message"]


# ----- memory bounds (units over a fake generation) ----------------------------------------------


class FakeGen:
    """A Generation stand-in fed by the test; records being closed (engine cancel + lease)."""

    def __init__(self, request_id: str, owner: str, text: bool = True) -> None:
        self.text = text
        self.request_id = request_id
        self.model = "fake"
        self.created = 0
        self.caller = SimpleNamespace(identity=owner)
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._events()

    def close(self) -> None:
        self.closed = True

    async def _events(self) -> AsyncIterator[Any]:
        try:
            yield Started("fake", 1, 0)
            if self.text:
                yield EngineDelta("a", [0])  # the first text: from here on it is kept
            while True:
                event = await self.queue.get()
                yield event
                if isinstance(event, Completed):
                    return
        finally:
            self.closed = True


async def _detach(store: ResumeStore, gen: FakeGen, owner: str) -> Any:
    tap = store.start(gen, owner)
    with tap.reader(0) as reader:
        while not tap.handed_text:
            await reader.next(0.5)
    return tap


async def test_detached_streams_are_bounded_per_caller_and_in_total():
    store = ResumeStore(ResumeOptions(grace_seconds=60, max_detached_per_caller=2, max_detached=3))
    gens = [FakeGen(f"a{i}", "alice") for i in range(3)] + [FakeGen(f"b{i}", "bob") for i in range(2)]
    for g in gens:
        await _detach(store, g, g.request_id[0])
    await asyncio.sleep(0.05)
    # alice's oldest went when she left a third; then the server's oldest when it held four.
    assert [g.request_id for g in gens if g.closed] == ["a0", "a1"]
    assert store.detached == 3
    with pytest.raises(CallError) as info:
        store.find("a0", "a")
    assert info.value.kind is ErrorKind.NOT_FOUND and "same caller left more than 2" in info.value.message
    store.close()
    await asyncio.sleep(0.05)
    assert all(g.closed for g in gens)


async def test_a_detached_stream_stops_when_its_buffer_is_full():
    store = ResumeStore(ResumeOptions(grace_seconds=60, max_buffer_bytes=4096))
    gen = FakeGen("big", "alice")
    tap = await _detach(store, gen, "alice")
    for _ in range(200):  # ~200 * 100 bytes: more than the buffer while nobody reads
        gen.queue.put_nowait(EngineDelta("x" * 32, [1]))
    await asyncio.sleep(0.1)
    assert gen.closed and tap.done  # generation stopped: engine request cancelled, slot freed
    assert tap._bytes <= 4096 + 200
    with tap.reader(1) as reader:
        got = [event async for _, event in _drain(reader)]
    assert got and all(isinstance(e, EngineDelta) for e in got)
    assert tap.error is not None and tap.error.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert "while no client was attached" in tap.error.message


async def _drain(reader: Any) -> AsyncIterator[Any]:
    while batch := await reader.next(1.0):
        for item in batch:
            yield item


async def test_an_attached_reader_lets_the_buffer_drop_what_it_was_handed():
    store = ResumeStore(ResumeOptions(grace_seconds=60, max_buffer_bytes=4096))
    gen = FakeGen("long", "alice")
    tap = store.start(gen, "alice")
    total = 0
    with tap.reader(0) as reader:
        for i in range(500):
            gen.queue.put_nowait(EngineDelta("y" * 32, [i]))
            total += len(await reader.next(1.0) or ())
        gen.queue.put_nowait(Completed("length", 1, 500, 0, 0.0, 0.0, 0.0, 0.0, 0.0))
        rest = await reader.next(1.0)
        assert rest and isinstance(rest[-1][1], Completed)
        assert await reader.next(1.0) == []
    assert total == 502 and tap._bytes <= 4096 and tap.error is None and gen.closed
    assert store.detached == 1 and tap.done  # finished, kept for the grace period


async def test_a_stream_dropped_before_its_first_token_is_not_kept():
    """Nothing generated yet means nothing to save: cancelled at once, as a client that hangs
    up at once must hold no slot. Also when no reader ever attached (the SSE generator never
    started): the door's `release` ends it."""
    store = ResumeStore(ResumeOptions(grace_seconds=60))
    early = FakeGen("early", "alice", text=False)
    early_tap = store.start(early, "alice")
    with early_tap.reader(0) as reader:
        assert isinstance((await reader.next(1.0))[0][1], Started)
        assert not early_tap.handed_text
    unread = FakeGen("unread", "alice", text=False)
    store.start(unread, "alice").release()
    await asyncio.sleep(0.05)
    assert early.closed and unread.closed and len(store) == 0 and store.detached == 0
    with pytest.raises(CallError, match="before its first token"):
        store.find("early", "alice")


def test_link_resumes_its_upstream_when_the_tunnel_drops(served):
    """`lmlink link` on a laptop: its upstream gRPC connection is reset mid-answer; the tool
    reading the link's SSE sees nothing but the same text an uninterrupted run gives."""
    from support.link import start_link
    from support.procs import stop

    srv, _, reference = served
    host, port = srv.address.rsplit(":", 1)
    proxy = CutProxy((host, int(port)))
    link, url = start_link(proxy.address)
    try:
        body = {"model": srv.model, "prompt": PROMPT, "max_tokens": N, "ignore_eos": True, "stream": True}
        lines: list[str] = []
        cut = 0
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: {") and not cut and len(lines) > 20:
                    cut = proxy.cut()
        text, _ = _sse_text(lines)
        assert cut >= 1 and proxy.connections >= 2
        assert text == reference.text
    finally:
        stop(link)
        proxy.close()
