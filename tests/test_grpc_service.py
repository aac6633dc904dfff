"""A real `lmlink serve` on loopback, driven through the real clients."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lmlink.client import (
    AlreadyExists,
    AsyncClient,
    Client,
    Completed,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Started,
    TokenDelta,
    Unavailable,
)
from lmlink.engine.types import ChatTurn, GenerationRequest, SamplingOptions
from support.checks import wait_idle
from support.collect import CollectingSink, token_ids

QUESTION = [{"role": "user", "content": "Tell me about the river."}]


@pytest.fixture
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def test_stream_order(client):
    events = list(client.stream(messages=QUESTION, max_tokens=16))
    assert isinstance(events[0], Started)
    assert isinstance(events[-1], Completed)
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    assert deltas and all(isinstance(e, TokenDelta) for e in events[1:-1])
    assert len({e.request_id for e in events}) == 1
    done = events[-1]
    assert done.usage.completion_tokens == sum(len(d.token_ids) for d in deltas)
    assert done.timings.time_to_first_token_ms > 0


def test_greedy_matches_in_process_engine(client, engine):
    over_grpc = client.chat(QUESTION, max_tokens=24)
    sink = CollectingSink()
    engine.submit(
        GenerationRequest(
            "", messages=(ChatTurn("user", QUESTION[0]["content"]),), sampling=SamplingOptions(max_tokens=24)
        ),
        sink,
    )
    assert over_grpc.token_ids == token_ids(sink.wait())


def test_max_tokens_and_stop_strings(client):
    base = client.complete("The", max_tokens=30, ignore_eos=True)
    assert len(base.token_ids) == 30 and base.finish_reason == "length"
    assert len(base.text) > 6, base.text
    stop = base.text[2:5]
    cut = client.complete("The", max_tokens=30, stop=[stop], ignore_eos=True)
    assert stop not in cut.text and base.text.startswith(cut.text)
    assert cut.finish_reason == "stop"


def test_sixteen_concurrent_streams_match_solo_runs(server, client):
    prompts = [f"Tell me about thing number {i}." for i in range(16)]
    solo = [client.chat([{"role": "user", "content": p}], max_tokens=20).token_ids for p in prompts]

    async def all_at_once():
        async with AsyncClient(server.address, timeout=120) as ac:
            return await asyncio.gather(
                *(ac.chat([{"role": "user", "content": p}], max_tokens=20) for p in prompts)
            )

    together = asyncio.run(all_at_once())
    assert [g.token_ids for g in together] == solo
    assert all(g.finish_reason in ("stop", "length") for g in together)


def test_client_cancel_frees_the_slot(client):
    stream = client.stream(prompt="Once upon a time", max_tokens=1900, ignore_eos=True)
    got = 0
    for event in stream:
        if isinstance(event, TokenDelta):
            got += 1
            if got >= 3:
                stream.cancel()
    assert wait_idle(client) == 0, "cancelled stream still holds a slot"
    # The engine decodes nothing for the cancelled stream any more: while one more request
    # runs, the server's token counter grows by exactly that request's tokens (a leftover
    # 1900-token sequence in the batch would add one token per step). Counting tokens, not
    # timing them, holds on a loaded machine too.
    before = client.server_info()
    assert before.active_streams == 0 and before.queued_requests == 0
    g = client.complete("Once upon a time", max_tokens=200, ignore_eos=True)
    after = client.server_info()
    assert g.completed.usage.completion_tokens == 200
    assert after.generated_tokens - before.generated_tokens == 200, (before, after)
    assert after.active_streams == 0


def test_cancel_rpc_by_request_id(client):
    stream = client.stream(prompt="Once upon a time", max_tokens=1900, ignore_eos=True, request_id="cancel-me-1")
    reasons = []
    for event in stream:
        if isinstance(event, Started):
            assert client.cancel("cancel-me-1") is True
        if isinstance(event, Completed):
            reasons.append(event.finish_reason)
    assert reasons == ["cancelled"]
    assert client.cancel("cancel-me-1") is False


def test_duplicate_request_id_already_exists(client):
    first = client.stream(prompt="Once", max_tokens=1500, request_id="same-id", ignore_eos=True)
    it = iter(first)
    next(it)  # Started: the id is now in use
    with pytest.raises(AlreadyExists):
        client.complete("x", max_tokens=2, request_id="same-id")
    first.cancel()


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(messages=[]), InvalidArgument, "messages is empty"),
        (dict(prompt="hi", max_tokens=-1), InvalidArgument, "max_tokens"),
        (dict(prompt="hi", max_tokens=10_000_000), InvalidArgument, "does not fit"),
        (dict(prompt="hi", temperature=float("nan")), InvalidArgument, "finite"),
        (dict(prompt="hi", model="no-such-model"), NotFound, "no-such-model"),
        (dict(prompt="word " * 6000), InvalidArgument, "context"),
        (dict(messages=[{"role": "wizard", "content": "x"}]), InvalidArgument, "role"),
    ],
)
def test_bad_input_gets_clear_status_and_server_keeps_serving(server, client, kwargs, error, words):
    background = client.stream(prompt="Once upon a time", max_tokens=80, ignore_eos=True)
    events: list = []
    reader = threading.Thread(target=lambda: events.extend(background))
    reader.start()
    with pytest.raises(error, match=words):
        client.stream(**kwargs).collect()
    reader.join(60)
    assert isinstance(events[-1], Completed), "the other stream was disturbed"
    assert server.alive()
    assert client.complete("The", max_tokens=3).completed is not None


def test_deadline(client):
    with pytest.raises(DeadlineExceeded):
        client.complete("Once upon a time", max_tokens=1900, ignore_eos=True, timeout=0.2)


def test_unreachable_server_is_a_clear_error():
    with Client("127.0.0.1:1", timeout=3) as c:
        with pytest.raises(Unavailable, match="cannot reach"):
            c.list_models()


def test_list_models_and_server_info(client, server):
    models = client.list_models()
    assert [m.id for m in models] == [server.model]
    assert models[0].is_default and models[0].context_length > 0 and models[0].memory_bytes > 0
    info = client.server_info()
    assert info.listen_mode == "local" and server.model in info.models
    assert info.caller.source == "loopback" and info.caller.is_owner


def test_health_check_and_watch(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lmlink.v1.Inference"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_reflection_lists_services(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for s in next(replies).list_services_response.service}
    assert {"lmlink.v1.Inference", "grpc.health.v1.Health"} <= names


async def test_async_client_streams_and_cancels(server):
    async with AsyncClient(server.address, timeout=60) as ac:
        g = await ac.chat(QUESTION, max_tokens=10)
        assert g.completed is not None and g.token_ids
        stream = ac.stream(prompt="Once upon a time", max_tokens=1900, ignore_eos=True)
        n = 0
        async for event in stream:
            if isinstance(event, TokenDelta):
                n += 1
                if n == 2:
                    stream.cancel()
        for _ in range(100):
            if (await ac.server_info()).active_streams == 0:
                break
            await asyncio.sleep(0.02)
        assert (await ac.server_info()).active_streams == 0
