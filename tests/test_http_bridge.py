"""The HTTP bridge against a real `lmlink serve` on loopback, driven by real clients.

Clients: the official `openai` package (streaming and not), `curl -N` for raw SSE, and the
exact requests the iOS Shortcut recipe (deploy/ios-shortcut.md) documents. A few tests run
the bridge in-process instead, where they need a different Gate, a token verifier, a short
time limit or a "still loading" server.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator

import httpx
import openai
import pytest

from lmlink.access.identity import Identity, loopback_owner
from lmlink.api.conversations import ConversationStore
from lmlink.api.gate import LoopbackGate, Verdict
from lmlink.api.http_bridge import BridgeOptions, HttpBridge
from lmlink.api.resume import ResumeOptions
from lmlink.client import Client
from conftest import start_server, stop_server
from support.checks import wait_idle
from support.inprocess import http_bridge
from lmlink.engine.types import ChatTurn

REPO = Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "Tell me about the river."}]


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    # Tools always send some API key; over an identified loopback connection it is ignored.
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def grpc_client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def assert_openai_error(response: httpx.Response, status: int, words: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert words.lower() in error["message"].lower(), error["message"]
    return error


# ----- OpenAI SDK ----------------------------------------------------------------------------


def test_openai_chat_non_streaming(oai, server):
    reply = oai.chat.completions.create(model=server.model, messages=QUESTION, max_tokens=12)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == server.model
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_openai_chat_streaming_matches_grpc_greedy(oai, grpc_client, server):
    over_grpc = grpc_client.chat(QUESTION, max_tokens=24)
    stream = oai.chat.completions.create(
        model=server.model,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == over_grpc.text
    assert finish == [over_grpc.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(over_grpc.token_ids)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    # and the same answer once more, not streamed
    whole = oai.chat.completions.create(model=server.model, messages=QUESTION, max_tokens=24)
    assert whole.choices[0].message.content == over_grpc.text


def test_openai_text_completions_match_grpc(oai, grpc_client):
    over_grpc = grpc_client.complete("Once upon a time", max_tokens=20)
    whole = oai.completions.create(model="", prompt="Once upon a time", max_tokens=20)
    assert whole.object == "text_completion" and whole.choices[0].text == over_grpc.text
    assert whole.usage.completion_tokens == len(over_grpc.token_ids)
    streamed = list(oai.completions.create(model="", prompt="Once upon a time", max_tokens=20, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == over_grpc.text
    assert streamed[-1].choices[0].finish_reason == over_grpc.finish_reason


def test_openai_fields_list_content_stop_seed(oai, grpc_client):
    base = grpc_client.complete("The", max_tokens=30, ignore_eos=True)
    assert len(base.text) > 6, base.text
    stop = base.text[2:5]
    for stop_value in (stop, [stop, "never-appears-xyz"]):
        cut = oai.completions.create(
            model="", prompt="The", max_tokens=30, stop=stop_value, extra_body={"ignore_eos": True}
        )
        assert cut.choices[0].finish_reason == "stop"
        assert stop not in cut.choices[0].text and base.text.startswith(cut.choices[0].text)
    parts = [{"type": "text", "text": "Tell me about "}, {"type": "text", "text": "the river."}]
    as_parts = oai.chat.completions.create(
        model="", messages=[{"role": "user", "content": parts}], max_completion_tokens=10
    )
    as_text = oai.chat.completions.create(model="", messages=QUESTION, max_tokens=10)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    seeded = [
        oai.completions.create(model="", prompt="The", max_tokens=12, temperature=1.0, seed=7, top_p=0.9)
        .choices[0].text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_openai_models(oai, server):
    assert [m.id for m in oai.models.list().data] == [server.model]
    assert oai.models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_openai_errors_raise_the_sdk_exceptions(oai):
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        oai.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        oai.chat.completions.create(model="", messages=QUESTION, n=2, max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="does not fit"):
        oai.completions.create(model="", prompt="hi", max_tokens=10_000_000)


async def test_concurrent_openai_streams_match_solo_runs(server, grpc_client):
    prompts = [f"Tell me about thing number {i}." for i in range(8)]
    solo = [grpc_client.chat([{"role": "user", "content": p}], max_tokens=16).text for p in prompts]

    async with openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0) as ac:

        async def one(p: str) -> str:
            stream = await ac.chat.completions.create(
                model="", messages=[{"role": "user", "content": p}], max_tokens=16, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        together = await asyncio.gather(*(one(p) for p in prompts))
    assert list(together) == solo


# ----- raw SSE with curl ---------------------------------------------------------------------


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=timeout)


def sse_lines(output: str) -> list[str]:
    """The data and comment lines (not the `id:` lines resuming uses)."""
    return [line for line in output.split("\n") if line and not line.startswith("id: ")]


def sse_ids(output: str) -> list[tuple[str, int]]:
    ids = [line[len("id: "):].rpartition(":") for line in output.split("\n") if line.startswith("id: ")]
    return [(rid, int(n)) for rid, _, n in ids]


def test_curl_sse_stream(server, grpc_client):
    expected = grpc_client.chat(QUESTION, max_tokens=16)
    body = json.dumps({"model": server.model, "messages": QUESTION, "max_tokens": 16, "stream": True})
    result = curl("-N", "-i", "-H", "Content-Type: application/json", "-d", body,
                  f"{server.http_url}/v1/chat/completions")
    assert result.returncode == 0, result.stderr
    head, _, payload = result.stdout.partition("\n\n")  # text mode turned CRLF into LF
    assert head.startswith("HTTP/1.1 200") and "content-type: text/event-stream" in head.lower()
    assert payload.endswith("data: [DONE]\n\n")
    events = [json.loads(line[len("data: "):]) for line in sse_lines(payload) if line != "data: [DONE]"]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == expected.text
    assert events[-1]["choices"][0]["finish_reason"] == expected.finish_reason
    # Every data event but [DONE] carries `id: REQUEST_ID:N`, N rising: what resuming takes.
    ids = sse_ids(payload)
    rid = re.search(r"x-request-id: (\S+)", head, re.I).group(1)
    assert len(ids) == len(events) and {r for r, _ in ids} == {rid}
    assert [n for _, n in ids] == sorted({n for _, n in ids}) and ids[0][1] == 0


def test_curl_sse_comments_while_a_long_prompt_is_processed(server, grpc_client):
    # Size a prompt to 3-4 prefill chunks (512 tokens each) of this model's tokenizer.
    probe = grpc_client.complete("Alpha " + "river " * 400, max_tokens=1)
    per_word = probe.completed.usage.prompt_tokens / 401
    words = int(1700 / per_word)
    body = json.dumps({"prompt": "Beta " + "river " * words, "max_tokens": 4, "stream": True})
    result = curl("-N", "-H", "Content-Type: application/json", "-d", body, f"{server.http_url}/v1/completions")
    lines = sse_lines(result.stdout)
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    comments = [line for line in lines[:first_data] if line.startswith(":")]
    assert comments, lines[:5]
    assert all(re.fullmatch(r": (prompt \d+/\d+|keep-alive)", c) for c in comments)
    assert lines[-1] == "data: [DONE]"


# ----- the iOS Shortcut recipe, replayed verbatim --------------------------------------------


def recipe_requests() -> list[tuple[str, str, list[tuple[str, str]], bytes]]:
    """Every request block (```http POST ...) in deploy/ios-shortcut.md, parsed."""
    doc = (REPO / "deploy" / "ios-shortcut.md").read_text()
    requests = []
    for block in re.findall(r"```http\n(.*?)```", doc, flags=re.S):
        if not block.startswith("POST "):
            continue
        head, _, body = block.partition("\n\n")
        request_line, *header_lines = head.split("\n")
        method, path, _ = request_line.split(" ")
        headers = [tuple(h.split(": ", 1)) for h in header_lines]
        requests.append((method, path, headers, body.rstrip("\n").encode()))
    return requests


def replay(server, method: str, path: str, headers: list, body: bytes, replace: dict[str, str] = {}) -> tuple[int, dict, bytes]:
    """Send exactly these headers (Host pointed at the test server) and this body."""
    for old, new in replace.items():
        body = body.replace(old.encode(), new.encode())
    host, port = server.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for name, value in headers:
        if name.lower() == "host":
            value = server.http
        elif name.lower() == "content-length":
            value = str(len(body))
        conn.putheader(name, value)
    conn.endheaders(body)
    response = conn.getresponse()
    result = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    conn.close()
    return result


def test_shortcut_recipe_exchange_with_follow_up(server):
    first, follow_up, plain = recipe_requests()
    for _, _, headers, body in (first, follow_up, plain):  # the doc's lengths are right
        assert dict(headers)["Content-Length"] == str(len(body))

    status, headers, raw = replay(server, *first)
    assert status == 200 and headers["content-type"] == "application/json"
    answer = json.loads(raw)
    assert set(answer) >= {"answer", "conversation", "model", "finish_reason", "usage"}
    assert answer["answer"] and answer["model"] == server.model
    conversation = answer["conversation"]
    assert headers["x-conversation-id"] == conversation

    status, _, raw = replay(server, *follow_up, replace={"Qm9vTGx5OWtD": conversation})
    again = json.loads(raw)
    assert status == 200 and again["conversation"] == conversation
    # the first question and answer were in front of the follow-up, and came from the cache
    assert again["usage"]["prompt_tokens"] > answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

    status, headers, raw = replay(server, *plain)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert raw.decode() and not raw.startswith(b"{")


def test_shortcut_new_conversation_forgets(server):
    url = f"{server.http_url}/v1/shortcuts/ask"
    one = httpx.post(url, json={"question": "Tell me about the river.", "conversation": "kitchen", "max_tokens": 5}).json()
    two = httpx.post(url, json={"question": "And then?", "conversation": "kitchen", "max_tokens": 5}).json()
    fresh = httpx.post(url, json={"question": "And then?", "conversation": "kitchen", "new": True, "max_tokens": 5}).json()
    assert two["usage"]["prompt_tokens"] > fresh["usage"]["prompt_tokens"]
    assert one["usage"]["completion_tokens"] <= 5


@pytest.mark.parametrize(
    "kwargs, status, words",
    [
        (dict(json={"question": ""}), 400, "question is empty"),
        (dict(json={"question": 42}), 400, "question must be a string"),
        (dict(json={"question": "hi", "model": "nope"}), 404, "nope"),
        (dict(json={"question": "hi", "max_tokens": "many"}), 400, "max_tokens"),
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (dict(content=b"\x00\x01", headers={"content-type": "application/octet-stream"}), 415, "cannot read"),
    ],
)
def test_shortcut_errors_are_readable(server, kwargs, status, words):
    url = f"{server.http_url}/v1/shortcuts/ask"
    assert_openai_error(httpx.post(url, **kwargs), status, words)
    as_text = httpx.post(url, params={"format": "text"}, **kwargs)
    assert as_text.status_code == status and as_text.text.startswith("Error: ")
    assert words.lower() in as_text.text.lower()


def test_shortcut_form_and_text_bodies(server):
    url = f"{server.http_url}/v1/shortcuts/ask"
    form = httpx.post(url, data={"question": "Tell me about the river.", "max_tokens": "4"})
    assert form.status_code == 200 and form.json()["usage"]["completion_tokens"] <= 4
    text = httpx.post(url, content="Tell me about the river.", params={"max_tokens": 4},
                      headers={"content-type": "text/plain", "accept": "text/plain"})
    assert text.status_code == 200 and text.headers["x-conversation-id"]


# ----- bad input, errors, the server keeps serving -------------------------------------------


def _background_stream(server) -> tuple[threading.Thread, list[str]]:
    out: list[str] = []

    def run() -> None:
        with httpx.stream("POST", f"{server.http_url}/v1/completions", timeout=60,
                          json={"prompt": "Once upon a time", "max_tokens": 80, "ignore_eos": True, "stream": True}) as r:
            out.extend(line for line in r.iter_lines() if line)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


BIG = b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'


@pytest.mark.parametrize(
    "path, content, status, words",
    [
        ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/chat/completions", b'{"messages": "hi"}', 400, "messages"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, "content"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, "only text"),
        ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "role"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', 400, "n=1"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "stream"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": "ten"}', 400, "max_tokens must be an integer"),
        ("/v1/completions", b'{"prompt": "x", "temperature": "hot"}', 400, "temperature must be a number"),
        ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "finite"),
        ("/v1/completions", b'{"prompt": "x", "stop": 3}', 400, "stop"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": true}', 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": ["a", "b"]}', 400, "prompt"),
        ("/v1/completions", b'{"prompt": "x", "model": "no-such-model"}', 404, "no-such-model"),
        ("/v1/completions", b'{"prompt": "' + b"word " * 6000 + b'"}', 400, "context"),
        ("/v1/completions", BIG, 413, "larger than"),
    ],
)
def test_bad_input_gets_status_and_openai_error_and_server_keeps_serving(server, path, content, status, words):
    thread, lines = _background_stream(server)
    response = httpx.post(f"{server.http_url}{path}", content=content, timeout=60,
                          headers={"content-type": "application/json"})
    error = assert_openai_error(response, status, words)
    assert error["type"] == "invalid_request_error"
    thread.join(60)
    assert lines and lines[-1] == "data: [DONE]", "the other stream was disturbed"
    assert server.alive()


def test_oversized_chunked_body_is_refused(server):
    def chunks():
        for _ in range(50):
            yield b"x" * (128 * 1024)

    response = httpx.post(f"{server.http_url}/v1/completions", content=chunks(), timeout=60,
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 413, "larger than")


def test_unknown_path_and_wrong_method(server):
    assert_openai_error(httpx.get(f"{server.http_url}/v1/nothing-here"), 404)
    wrong = httpx.get(f"{server.http_url}/v1/chat/completions")
    assert assert_openai_error(wrong, 405)["code"] == "method_not_allowed"


def test_duplicate_request_id_is_409(server):
    url = f"{server.http_url}/v1/completions"
    headers = {"x-request-id": "http-dup-1"}
    with httpx.stream("POST", url, headers=headers, timeout=60,
                      json={"prompt": "Once", "max_tokens": 1500, "ignore_eos": True, "stream": True}) as first:
        assert first.headers["x-request-id"] == "http-dup-1"
        lines = first.iter_lines()  # keep a reference: closing the iterator closes the connection
        next(lines)  # streaming: the id is in use
        again = httpx.post(url, headers=headers, json={"prompt": "x", "max_tokens": 2})
        assert assert_openai_error(again, 409)["code"] == "duplicate_request_id"
    # Left mid-stream: kept for resuming, so cancel it explicitly (not kept after that).
    gone = httpx.delete(f"{server.http_url}/v1/streams/http-dup-1")
    assert gone.status_code == 200 and gone.json() == {"cancelled": True}
    assert httpx.get(f"{server.http_url}/v1/streams/http-dup-1").status_code == 404
    too_long = httpx.post(url, headers={"x-request-id": "x" * 200}, json={"prompt": "x"})
    assert_openai_error(too_long, 400, "request id")


# ----- cancellation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_resume_server():
    """A server with resuming off (`--resume-grace 0`): a client that leaves cancels at once.
    (With resuming on, tests/test_resume.py shows the stream kept, then expired.)"""
    srv = start_server("--resume-grace", "0")
    yield srv
    stop_server(srv.process)


@pytest.fixture
def no_resume(no_resume_server):
    with Client(no_resume_server.address, timeout=60) as c:
        yield no_resume_server, c


def test_stream_disconnect_frees_the_slot(no_resume):
    server, grpc_client = no_resume
    assert wait_idle(grpc_client) == 0
    with httpx.stream("POST", f"{server.http_url}/v1/completions", timeout=60,
                      json={"prompt": "Once upon a time", "max_tokens": 1900, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()  # keep a reference: closing the iterator closes the connection
        data = 0
        while data < 3:
            data += next(lines).startswith("data: ")
        assert grpc_client.server_info().active_streams == 1
    assert wait_idle(grpc_client) == 0, "a disconnected SSE client still holds a batch slot"


def test_curl_killed_mid_stream_frees_the_slot(no_resume):
    server, grpc_client = no_resume
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 1900, "ignore_eos": True, "stream": True})
    proc = subprocess.Popen(["curl", "-sN", "-H", "Content-Type: application/json", "-d", body,
                             f"{server.http_url}/v1/completions"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()  # the first event arrived
    proc.kill()
    proc.wait()
    assert wait_idle(grpc_client) == 0


def test_non_streaming_disconnect_frees_the_slot(no_resume):
    server, grpc_client = no_resume
    assert wait_idle(grpc_client) == 0
    path = "/v1/completions"
    payload = json.dumps({"prompt": "Once upon a time", "max_tokens": 1900, "ignore_eos": True}).encode()
    host, port = server.http.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(payload), payload))
        deadline = time.monotonic() + 5
        while grpc_client.server_info().active_streams == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert grpc_client.server_info().active_streams == 1
    assert wait_idle(grpc_client) == 0, "a disconnected client's generation kept running"


# ----- health ---------------------------------------------------------------------------------


def test_health_is_200_when_ready(server):
    response = httpx.get(f"{server.http_url}/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


# ----- in-process: other gates, tokens, limits, loading ---------------------------------------


class RecordingGate:
    """Identifies nobody (like a tailnet listener for an unknown peer); records the peers seen."""

    def __init__(self, allow: bool = True) -> None:
        self.peers: list[str] = []
        self.allow = allow

    def identify(self, peer: str) -> Identity | None:
        self.peers.append(peer)
        return None

    def check(self, identity: Identity, action: str, model: str = "") -> Verdict:
        if self.allow:
            return Verdict(True)
        return Verdict(False, f"{identity.label} may not {action}")


class Tokens:
    def verify(self, token: str) -> Identity | None:
        return Identity(login_name="iphone", source="token") if token == "good-token" else None


class DenyGate(LoopbackGate):
    def check(self, identity: Identity, action: str, model: str = "") -> Verdict:
        return Verdict(False, f"{identity.label} has no grant to {action}")


@contextlib.asynccontextmanager
async def bridge(
    engine, gate: Any = None, ready: bool = True, bearer: Any = None, **options: Any
) -> AsyncIterator[tuple[str, HttpBridge]]:
    """The bridge over the in-process engine on a real uvicorn listener; yields (url, bridge)."""
    async with http_bridge(engine, gate or LoopbackGate(), ready, bearer=bearer,
                           options=BridgeOptions(**options)) as pair:
        yield pair


async def test_identity_from_the_real_peer_never_forwarded_headers(engine):
    gate = RecordingGate()
    async with bridge(engine, gate) as (url, _), httpx.AsyncClient(base_url=url) as http_client:
        response = await http_client.get("/v1/models", headers={"x-forwarded-for": "100.64.0.7"})
        assert_openai_error(response, 401, "not an authenticated peer")
    assert gate.peers and all(p.startswith("ipv4:127.0.0.1:") for p in gate.peers)


async def test_bearer_verifier_plugs_in_for_unidentified_callers(engine):
    async with bridge(engine, RecordingGate(), bearer=Tokens()) as (url, _):
        async with httpx.AsyncClient(base_url=url) as h:
            assert_openai_error(await h.get("/v1/models"), 401, "not an authenticated peer")
            bad = await h.get("/v1/models", headers={"authorization": "Bearer nope"})
            assert assert_openai_error(bad, 401, "revoked")["code"] == "invalid_api_key"
            ok = await h.get("/v1/models", headers={"authorization": "Bearer good-token"})
            assert ok.status_code == 200 and ok.json()["data"][0]["id"] == engine.model_id
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="good-token", max_retries=0) as ac:
            reply = await ac.completions.create(model="", prompt="Once", max_tokens=3)
            assert reply.usage.completion_tokens == 3
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0) as ac:
            with pytest.raises(openai.AuthenticationError):
                await ac.completions.create(model="", prompt="Once", max_tokens=3)


async def test_gate_denial_is_403(engine):
    async with bridge(engine, DenyGate()) as (url, _), httpx.AsyncClient(base_url=url) as h:
        denied = await h.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        error = assert_openai_error(denied, 403, "no grant to generate")
        assert error["type"] == "permission_error"
        assert_openai_error(await h.get("/v1/models"), 403, "no grant to list")
        ask = await h.post("/v1/shortcuts/ask", json={"question": "hi"}, headers={"accept": "text/plain"})
        assert ask.status_code == 403 and ask.text.startswith("Error: ")


async def test_loading_server_is_503_with_retry_after(engine):
    async with bridge(engine, ready=False) as (url, _), httpx.AsyncClient(base_url=url) as h:
        health = await h.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        busy = await h.post("/v1/chat/completions", json={"messages": QUESTION})
        assert assert_openai_error(busy, 503, "loading")["code"] == "model_loading"
        assert busy.headers["retry-after"]


class SilentEngine:
    """Accepts requests and never answers, like a prompt that takes forever to process."""

    model_id = "silent"
    healthy = True

    def __init__(self) -> None:
        self.loaded = SimpleNamespace(id="silent", aliases=(), context_length=4096)
        self.cancelled: list[str] = []

    def submit(self, request: Any, sink: Any) -> str:
        return request.request_id or "silent-1"

    def cancel(self, request_id: str, owner: str | None = None) -> bool:
        self.cancelled.append(request_id)
        return True


async def test_shortcut_time_limit_answers_504_and_cancels():
    silent = SilentEngine()
    async with bridge(silent, shortcut_time_limit=0.3) as (url, _), httpx.AsyncClient(base_url=url, timeout=30) as h:
        started = time.monotonic()
        slow = await h.post("/v1/shortcuts/ask", json={"question": "Once upon a time"})
        assert time.monotonic() - started < 5
        error = assert_openai_error(slow, 504, "within 0.3 seconds")
        assert error["code"] == "timeout" and slow.json()["partial_answer"] == ""
        plain = await h.post("/v1/shortcuts/ask", content="Once", headers={"accept": "text/plain"})
        assert plain.status_code == 504 and plain.text.startswith("Error: no complete answer")
    assert silent.cancelled == ["silent-1", "silent-1"]


async def test_shortcut_client_leaving_cancels_the_generation():
    silent = SilentEngine()
    async with bridge(silent) as (url, _):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        payload = b'{"question": "Once upon a time", "conversation": "gone"}'
        writer.write(b"POST /v1/shortcuts/ask HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        await writer.drain()
        await asyncio.sleep(0.2)
        assert silent.cancelled == []  # still waiting for the answer
        writer.close()
        for _ in range(100):
            if silent.cancelled:
                break
            await asyncio.sleep(0.01)
    assert silent.cancelled == ["silent-1"]


async def test_keepalive_comments_while_waiting_and_disconnect_cancels():
    silent = SilentEngine()
    async with bridge(silent, keepalive_seconds=0.05) as (url, b), httpx.AsyncClient(base_url=url, timeout=30) as h:
        b.core.streams.options = ResumeOptions(grace_seconds=0)  # leaving cancels at once
        async with h.stream("POST", "/v1/chat/completions", headers={"x-request-id": "wait-1"},
                            json={"messages": QUESTION, "stream": True}) as r:
            lines = r.aiter_lines()
            assert await anext(lines) == "id: wait-1:0"
            assert json.loads((await anext(lines))[len("data: "):])["choices"][0]["delta"]["role"] == "assistant"
            comments = [line async for line in _take(lines, 3)]
            assert set(comments) == {": keep-alive"}
        for _ in range(100):
            if silent.cancelled:
                break
            await asyncio.sleep(0.01)
    assert silent.cancelled == ["wait-1"]


async def _take(lines: AsyncIterator[str], n: int) -> AsyncIterator[str]:
    async for line in lines:
        if line:
            yield line
            n -= 1
            if n == 0:
                return


# ----- units ---------------------------------------------------------------------------------


def test_conversation_store_is_bounded_and_expires():
    now = [0.0]
    store = ConversationStore(max_conversations=2, max_turns=4, max_chars=100, ttl_seconds=60, clock=lambda: now[0])
    a, b, c = ("me", "a"), ("me", "b"), ("me", "c")
    for i in range(5):
        store.append(a, ChatTurn("user", f"q{i}"), ChatTurn("assistant", f"a{i}"))
    assert [t.content for t in store.history(a)] == ["q3", "a3", "q4", "a4"]
    store.append(a, ChatTurn("user", "x" * 80), ChatTurn("assistant", "y" * 30))
    assert [t.content for t in store.history(a)] == ["y" * 30]
    store.append(b, ChatTurn("user", "b"))
    store.append(c, ChatTurn("user", "c"))
    assert len(store) == 2 and store.history(a) == []  # least recently used went first
    assert store.history(("someone else", "b")) == []
    now[0] = 61
    assert len(store) == 0 and store.history(b) == []


def test_loopback_owner_is_what_local_callers_are():
    assert LoopbackGate().identify("ipv4:127.0.0.1:5000") == loopback_owner()


async def test_follow_up_too_long_for_the_context_drops_the_oldest_turns(engine):
    async with bridge(engine) as (url, http_bridge), httpx.AsyncClient(base_url=url, timeout=60) as h:
        context = engine.loaded.context_length
        store = http_bridge.conversations = ConversationStore(max_chars=10**7, max_turns=64)
        key = ("loopback:local:", "long")
        for i in range(8):  # about twice the context in tokens
            store.append(key, ChatTurn("user", f"q{i}"), ChatTurn("assistant", "river " * (context // 4)))
        reply = await h.post("/v1/shortcuts/ask", json={"question": "And?", "conversation": "long", "max_tokens": 8})
        assert reply.status_code == 200, reply.text
        assert context // 4 < reply.json()["usage"]["prompt_tokens"] < context
