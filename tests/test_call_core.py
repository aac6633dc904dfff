"""The call core through real clients: hostile input leaves nothing held, one error vocabulary
on every door, unloading ends every door's streams the same way, fair waiting per caller,
browser pages kept out, Cancel by full identity, and the client's bearer token.

Servers are real `lmlink serve` processes on loopback (own state dirs, small batches), driven
by the openai package, httpx/raw sockets, the lmlink gRPC client and `lmlink link`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import httpx
import openai
import pytest

from lmlink.access.identity import Identity
from lmlink.api.gate import Verdict
from lmlink.client import AsyncClient, Client, Completed, InvalidArgument, Unauthenticated
from lmlink.v1 import inference_pb2_grpc as pb_grpc

from conftest import ServerProcess, lmlink_cmd, start_server, stop_server
from support.link import start_link

ASK = [{"role": "user", "content": "Tell me about the river."}]
MAX_BATCH = 2
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Iterator[ServerProcess]:
    """A server with room for 2 streams, so anything leaked shows at once."""
    state = tmp_path_factory.mktemp("small")
    srv = start_server("--no-mdns", "--max-batch", str(MAX_BATCH), "--state-dir", str(state),
                       "--log-level", "info")
    yield srv
    stop_server(srv.process)


def _post(srv: ServerProcess, path: str, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{srv.http_url}{path}", content=content, timeout=30,
                      headers=headers if headers is not None else JSON)


NESTED = b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
HOSTILE: dict[str, Any] = {
    # a lone UTF-16 surrogate: the tokenizer raised TypeError after admission (slot leaked)
    "surrogate-chat": ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400),
    "surrogate-prompt": ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', 400),
    # nesting deeper than the JSON parser's recursion limit: was a 500 with a traceback
    "nested-json": ("/v1/chat/completions", NESTED, 400),
    # far longer than the context can hold: refused before tokenizing
    "huge-prompt": ("/v1/completions", json.dumps({"prompt": "x " * 200_000}).encode(), 400),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_requests_leave_nothing_held(small, kind):
    path, body, status = HOSTILE[kind]
    for _ in range(3 * MAX_BATCH):
        response = _post(small, path, body)
        assert response.status_code == status, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
    with Client(small.address, timeout=30) as c:
        done = c.chat(ASK, max_tokens=4)  # would wait forever for a leaked slot
        assert done.finish_reason in ("stop", "length") and c.server_info().active_streams == 0
    health = httpx.get(f"{small.http_url}/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_huge_prompts_do_not_stall_anyone(small):
    """3.9 MB over HTTP and 15 MB over gRPC: refused from their length, not after tokenizing
    on the event loop (which held /health for seconds)."""
    worst: list[float] = []
    stop = threading.Event()

    def watch_health() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            httpx.get(f"{small.http_url}/health", timeout=30)
            worst.append(time.perf_counter() - t)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    try:
        body = json.dumps({"prompt": "word " * 780_000}).encode()  # 3.9 MB
        response = _post(small, "/v1/completions", body)
        assert response.status_code == 400 and "context" in response.json()["error"]["message"]
        with Client(small.address, timeout=60) as c:
            with pytest.raises(InvalidArgument, match="context"):
                c.complete("word " * 3_000_000, max_tokens=2)  # 15 MB
    finally:
        stop.set()
        watcher.join()
    assert worst and max(worst) < 1.0, f"/health took up to {max(worst):.2f} s"


def test_clients_that_leave_at_once_leave_nothing_held(small):
    """Send a streamed request and hang up before the answer starts, 3 x max-batch times."""
    host, port = small.http.rsplit(":", 1)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 1900, "ignore_eos": True,
                       "stream": True}).encode()
    for i in range(3 * MAX_BATCH):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(body), body))
            if i % 2:
                s.recv(1)  # half of them wait for the response to begin
    with Client(small.address, timeout=30) as c:
        deadline = time.monotonic() + 10
        while c.server_info().active_streams and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.server_info().active_streams == 0
        assert c.chat(ASK, max_tokens=4).finish_reason in ("stop", "length")


def test_lone_surrogate_through_the_grpc_client_and_the_wire(small):
    with Client(small.address, timeout=30) as c:
        with pytest.raises(InvalidArgument, match="not valid Unicode"):
            c.chat([{"role": "user", "content": "a\ud800b"}], max_tokens=2)
        # the same bytes sent raw (a client that does not check): refused, not UNKNOWN
        channel = grpc.insecure_channel(small.address)
        generate = channel.unary_stream("/lmlink.v1.Inference/Generate",
                                        request_serializer=lambda b: b,
                                        response_deserializer=lambda b: b)
        for _ in range(3 * MAX_BATCH):
            with pytest.raises(grpc.RpcError) as err:
                list(generate(b"\x22\x05a\xed\xa0\x80b", timeout=10))  # field 4 (prompt), bad UTF-8
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        channel.close()
        assert c.chat(ASK, max_tokens=2).finish_reason in ("stop", "length")


def test_unexpected_errors_are_logged_without_tracebacks_or_prompts(tmp_path):
    srv = start_server("--no-mdns", "--state-dir", str(tmp_path), "--log-level", "info")
    try:
        for _ in range(2):
            _post(srv, "/v1/chat/completions", NESTED)
            _post(srv, "/v1/chat/completions",
                  b'{"messages": [{"role": "user", "content": "secret plans \\ud800"}]}')
    finally:
        stop_server(srv.process)
    err = srv.process.stderr.read() if srv.process.stderr else ""
    assert "Traceback" not in err and "secret plans" not in err


# ----- one error vocabulary: overloaded is the same through the bridge and the link ------------


def test_overloaded_is_the_same_code_via_bridge_and_link_and_idle_callers_still_wait(tmp_path):
    state = tmp_path / "state"
    srv = start_server("--no-mdns", "--max-batch", "1", "--max-queue", "1", "--state-dir", str(state))
    link = None
    streams: list[Any] = []
    try:
        out = subprocess.run(lmlink_cmd("token", "create", "--name", "bob", "--as", "bob@example.com",
                                        "--state-dir", str(state)), capture_output=True, text=True,
                             timeout=30)
        bob_token = out.stdout.strip()
        subprocess.run(lmlink_cmd("share", "add", "bob@example.com", "--model", "*",
                                  "--state-dir", str(state)), check=True, timeout=30,
                       capture_output=True)
        owner = Client(srv.address, timeout=120)
        for _ in range(2):  # one runs, one waits: the queue (1) is full for the owner
            s = owner.stream(prompt="Once upon a time", max_tokens=1900, ignore_eos=True)
            streams.append(s)
            threading.Thread(target=lambda s=s: list(s), daemon=True).start()
        deadline = time.monotonic() + 10
        while owner.server_info().active_streams < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        body = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
        direct = _post(srv, "/v1/completions", body)
        assert direct.status_code == 429, direct.text
        link, url = start_link(srv.address)
        linked = httpx.post(f"{url}/completions", content=body, headers=JSON, timeout=30)
        assert linked.status_code == 429, linked.text
        assert direct.json()["error"]["code"] == linked.json()["error"]["code"] == "overloaded"
        assert linked.headers.get("retry-after") and direct.headers.get("retry-after")

        # bob has nothing running or waiting: he still gets a place in the full queue
        got: list[Any] = []
        bob = Client(srv.address, timeout=120, token=bob_token)
        t = threading.Thread(target=lambda: got.append(_try(lambda: bob.chat(ASK, max_tokens=3))))
        t.start()
        time.sleep(1.0)
        assert not got, f"bob was turned away: {got}"
        for s in streams:
            s.cancel()
        t.join(60)
        assert isinstance(got[0], object) and getattr(got[0], "finish_reason", None) in ("stop", "length"), got
        bob.close()
        owner.close()
    finally:
        for s in streams:
            s.cancel()
        if link is not None:
            stop_server(link)
        stop_server(srv.process)


def _try(fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc


# ----- unloading ends every door's streams the same way ----------------------------------------


def test_unload_ends_http_and_grpc_streams_alike(tmp_path):
    srv = start_server("--no-mdns", "--state-dir", str(tmp_path))
    try:
        c = Client(srv.address, timeout=60)
        grpc_events: list[Any] = []
        stream = c.stream(messages=ASK, max_tokens=1900, ignore_eos=True)
        tg = threading.Thread(target=lambda: grpc_events.extend(stream))
        tg.start()
        http_lines: list[str] = []

        def http_stream() -> None:
            with httpx.stream("POST", f"{srv.http_url}/v1/chat/completions", timeout=60,
                              json={"messages": ASK, "max_tokens": 1900, "ignore_eos": True,
                                    "stream": True}) as r:
                http_lines.extend(line for line in r.iter_lines() if line)

        th = threading.Thread(target=http_stream)
        th.start()
        deadline = time.monotonic() + 10
        while c.server_info().active_streams < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        result = c.unload_model(srv.model, cancel_streams=True)
        tg.join(20)
        th.join(20)
        assert result.cancelled_streams == 2
        assert isinstance(grpc_events[-1], Completed) and grpc_events[-1].finish_reason == "cancelled"
        assert http_lines[-1] == "data: [DONE]"
        last = json.loads(http_lines[-2].removeprefix("data: "))
        assert "error" not in last, last
        assert last["choices"][0]["finish_reason"] == "cancelled"
        c.close()
    finally:
        stop_server(srv.process)


# ----- the browser guard, on the bridge and the link -------------------------------------------


@pytest.mark.parametrize("door", ["bridge", "link"])
def test_web_pages_cannot_use_the_bridge_or_the_link(small, door):
    link = None
    try:
        if door == "bridge":
            base = small.http_url
        else:
            link, url = start_link(small.address)
            base = url.removesuffix("/v1")
        body = json.dumps({"prompt": "Once", "max_tokens": 2}).encode()
        simple = httpx.post(f"{base}/v1/completions", content=body,
                            headers={"content-type": "text/plain"}, timeout=30)
        assert simple.status_code == 415, simple.text  # a page's "simple" CSRF POST
        foreign = httpx.post(f"{base}/v1/completions", content=body, timeout=30,
                             headers={**JSON, "origin": "https://evil.example"})
        assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "origin_not_allowed"
        host, port = base.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:  # DNS rebinding
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: evil.example:%s\r\nConnection: close\r\n\r\n"
                      % port.encode())
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 403") and b"host_not_allowed" in reply, reply[:300]
        ok = httpx.post(f"{base}/v1/completions", content=body, headers=JSON, timeout=30)
        assert ok.status_code == 200, ok.text
    finally:
        if link is not None:
            stop_server(link)


def test_an_allowed_origin_may_call(tmp_path):
    env_before = os.environ.get("LMLINK_ALLOWED_ORIGINS")
    os.environ["LMLINK_ALLOWED_ORIGINS"] = "http://localhost:3000"
    try:
        srv = start_server("--no-mdns", "--state-dir", str(tmp_path))
    finally:
        if env_before is None:
            os.environ.pop("LMLINK_ALLOWED_ORIGINS")
        else:
            os.environ["LMLINK_ALLOWED_ORIGINS"] = env_before
    try:
        body = json.dumps({"prompt": "Once", "max_tokens": 2}).encode()
        ok = _post(srv, "/v1/completions", body, {**JSON, "origin": "http://localhost:3000"})
        assert ok.status_code == 200, ok.text
        other = _post(srv, "/v1/completions", body, {**JSON, "origin": "http://localhost:3001"})
        assert other.status_code == 403
    finally:
        stop_server(srv.process)


def test_the_link_refuses_a_declared_oversized_body_before_reading_it(small):
    link, url = start_link(small.address)
    try:
        host, port = url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n{")
            s.settimeout(5)  # the old link waited for all 5 MB before checking
            reply = s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    finally:
        stop_server(link)


# ----- Cancel by full identity; the client's bearer token ---------------------------------------


class TokenGate:
    """Nobody by connection; everyone allowed (identity comes from the bearer verifier)."""

    def identify(self, peer: str) -> Identity | None:
        return None

    def check(self, identity: Identity, action: str, model: str = "") -> Verdict:
        return Verdict(True)


class TaggedDevices:
    """Two tagged devices: the same login (`tagged-devices`), different nodes."""

    def verify(self, token: str) -> Identity | None:
        if token not in ("dev-a", "dev-b"):
            return None
        return Identity(login_name="tagged-devices", source="tailnet", node_name=token,
                        tags=("tag:ci",))


async def test_a_tagged_device_cannot_cancel_another_ones_request(engine):
    from lmlink.api.core import Core, ServerFacts
    from lmlink.api.grpc_service import InferenceService, add_servicer
    from lmlink.api.limits import Guard
    from lmlink.api.models import ModelManager
    from lmlink.api.streams import StreamHub

    models = ModelManager(StreamHub(asyncio.get_running_loop()))
    models.add(engine)
    core = Core(models, Guard(TokenGate(), None, bearer=TaggedDevices()), ServerFacts("t", "tailscaled"))
    server = grpc.aio.server()
    add_servicer(pb_grpc.add_InferenceServicer_to_server, InferenceService(core), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    try:
        async with AsyncClient(target, token="dev-a") as a, AsyncClient(target, token="dev-b") as b:
            stream = a.stream(prompt="Once upon a time", max_tokens=1900, ignore_eos=True,
                              request_id="dev-a-1")
            events = stream.__aiter__()
            await events.__anext__()  # running
            assert not await b.cancel("dev-a-1")  # same login, other device
            assert await a.cancel("dev-a-1")
            rest = [e async for e in events]
            assert isinstance(rest[-1], Completed) and rest[-1].finish_reason == "cancelled"
            with pytest.raises(Exception, match="unknown or revoked"):
                async with AsyncClient(target, token="dev-c") as c:
                    await c.server_info()
    finally:
        await server.stop(None)


def test_client_token_names_the_caller(tmp_path):
    srv = start_server("--no-mdns", "--state-dir", str(tmp_path))
    try:
        out = subprocess.run(lmlink_cmd("token", "create", "--name", "script", "--as",
                                        "bob@example.com", "--state-dir", str(tmp_path)),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        token = out.stdout.strip()
        subprocess.run(lmlink_cmd("share", "add", "bob@example.com", "--model", "*",
                                  "--state-dir", str(tmp_path)), check=True, timeout=30,
                       capture_output=True)
        with Client(srv.address, timeout=30) as plain:
            assert plain.server_info().caller.login_name == "local"
        with Client(srv.address, timeout=30, token=token) as bob:
            caller = bob.server_info().caller
            assert (caller.login_name, caller.source) == ("bob@example.com", "token")
        with Client(srv.address, timeout=30, token="lmk_forged") as forged:
            with pytest.raises(Unauthenticated):
                forged.list_models()
    finally:
        stop_server(srv.process)


# ----- a grant may bound the prompt (prompt processing is the expensive part) ------------------


async def test_a_grant_limits_prompt_tokens(engine):
    from lmlink.access.gate import PolicyGate
    from lmlink.access.policy import CAPABILITY
    from lmlink.api.core import Core, ServerFacts
    from lmlink.api.http_bridge import BridgeOptions, HttpBridge
    from lmlink.api.http_shell import HttpListener, bind_socket
    from lmlink.api.limits import Guard
    from lmlink.api.models import ModelManager
    from lmlink.api.streams import StreamHub

    mate = Identity(login_name="mate@example.com", source="tailnet", node_name="mates-laptop",
                    capabilities={CAPABILITY: [{"models": ["*"], "max_prompt_tokens": 40}]})
    models = ModelManager(StreamHub(asyncio.get_running_loop()))
    models.add(engine)
    core = Core(models, Guard(PolicyGate(lambda peer: mate), None), ServerFacts("t", "tailscaled"))
    listener = HttpListener(HttpBridge(core, BridgeOptions()).app(), bind_socket("127.0.0.1", 0))
    await listener.start()
    try:
        async with openai.AsyncOpenAI(base_url=f"http://{listener.address}/v1", api_key="x",
                                      max_retries=0) as oai:
            short = await oai.completions.create(model="", prompt="Once upon a time", max_tokens=2)
            assert short.usage.prompt_tokens <= 40
            with pytest.raises(openai.BadRequestError) as err:
                await oai.completions.create(model="", prompt="Once upon a time " * 30, max_tokens=2)
            assert "at most 40 tokens per prompt" in err.value.message
            again = await oai.completions.create(model="", prompt="Once", max_tokens=2)
            assert again.usage.completion_tokens >= 1  # nothing was held by the refusal
    finally:
        await listener.stop()


def test_template_and_tokenizer_failures_are_the_callers_bad_input():
    import jinja2

    from lmlink.engine.prompts import encode_prompt
    from lmlink.engine.types import ChatTurn, GenerationRequest, InvalidRequest

    class Tokenizer:
        chat_template = "{{ raise_exception('roles must alternate') }}"

        def apply_chat_template(self, messages: Any, **_: Any) -> str:
            return jinja2.Environment().from_string(self.chat_template).render(
                messages=messages, raise_exception=self._raise)

        @staticmethod
        def _raise(message: str) -> None:
            raise jinja2.TemplateError(message)

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")

    chat = GenerationRequest("c", messages=(ChatTurn("user", "hi"), ChatTurn("user", "again")))
    with pytest.raises(InvalidRequest, match="chat template rejected.*roles must alternate"):
        encode_prompt(Tokenizer(), chat)
    with pytest.raises(InvalidRequest, match="cannot be tokenized: TypeError"):
        encode_prompt(Tokenizer(), GenerationRequest("p", prompt="a\ud800b"))
