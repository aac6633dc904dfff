"""The Responses API (official `openai` package) and the Anthropic Messages API (official
`anthropic` package), straight to a real server and through a real `lmlink link`."""

from __future__ import annotations

import json
from typing import Iterator

import anthropic
import httpx
import jsonschema
import openai
import pytest

from support.agent import SCHEMA, serve_with_link

TOOL = {"name": "get_weather", "description": "Weather for a city", "input_schema": SCHEMA}


@pytest.fixture(scope="module")
def endpoints() -> Iterator[dict[str, str]]:
    with serve_with_link() as urls:
        yield urls


@pytest.fixture(params=["server", "link"])
def base(request, endpoints) -> str:
    return endpoints[request.param]


@pytest.fixture
def oai(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def claude(base) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=120)


# ----- Responses ----------------------------------------------------------------------------


def test_streamed_response_then_follow_up_with_previous_response_id(oai):
    types = []
    final = None
    text = ""
    with oai.responses.stream(model="", input="Tell me about rivers.", max_output_tokens=16,
                              instructions="Be brief.") as stream:
        for event in stream:
            types.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
        final = stream.get_final_response()
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert "response.output_item.added" in types and "response.output_text.done" in types
    assert final.output_text == text and final.usage.output_tokens >= 1
    follow = oai.responses.create(model="", input="And lakes?", previous_response_id=final.id, max_output_tokens=4)
    assert follow.previous_response_id == final.id
    # the follow-up's prompt holds the first exchange
    assert follow.usage.input_tokens > final.usage.input_tokens + final.usage.output_tokens - 2
    with pytest.raises(openai.NotFoundError, match="not found"):
        oai.responses.create(model="", input="x", previous_response_id="resp_nope", max_output_tokens=2)


def test_responses_forced_function_call_and_its_output(oai):
    tools = [{"type": "function", "name": "get_weather", "description": "Weather", "parameters": SCHEMA}]
    first = oai.responses.create(model="", input="Weather in Oslo?", tools=tools, max_output_tokens=300,
                                 tool_choice={"type": "function", "name": "get_weather"}, temperature=1.0)
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), SCHEMA)
    second = oai.responses.create(
        model="", previous_response_id=first.id, tools=tools, tool_choice="none", max_output_tokens=6,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp": 3}'}],
    )
    assert second.status in ("completed", "incomplete")
    assert not [o for o in second.output if o.type == "function_call"]


def test_responses_structured_output(oai):
    for seed in range(3):
        r = oai.responses.create(model="", input="A trip as JSON.", max_output_tokens=400, temperature=1.0,
                                 text={"format": {"type": "json_schema", "name": "trip", "schema": SCHEMA, "strict": True}},
                                 extra_body={"seed": seed})
        assert r.status == "completed"
        jsonschema.validate(json.loads(r.output_text), SCHEMA)


@pytest.mark.parametrize("kw,needle", [
    (dict(tools=[{"type": "web_search"}]), "only function tools"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), "input_image"),
    (dict(text={"format": {"type": "json_schema", "name": "x", "schema": {"not": {}}}}), "not"),
    (dict(tool_choice={"type": "function", "name": "nope"}, tools=[{"type": "function", "name": "f", "parameters": {}}]), "nope"),
    (dict(background=True), "background"),
])
def test_responses_bad_input_is_a_400(oai, kw, needle):
    kw.setdefault("input", "hi")
    with pytest.raises(openai.BadRequestError, match=needle):
        oai.responses.create(model="", max_output_tokens=4, **kw)


# ----- Anthropic Messages -------------------------------------------------------------------


def test_streamed_message_with_tool_use_then_tool_result(claude):
    types = []
    with claude.messages.stream(model="", max_tokens=300, tools=[TOOL],
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=[{"role": "user", "content": "Weather in Oslo?"}]) as stream:
        for event in stream:
            types.append(event.type)
        final = stream.get_final_message()
    assert types[0] == "message_start" and "content_block_start" in types and "message_stop" in types
    assert final.stop_reason == "tool_use"
    uses = [b for b in final.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    jsonschema.validate(uses[0].input, SCHEMA)
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0
    reply = claude.messages.create(model="", max_tokens=8, tools=[TOOL], system="Be brief.", messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": [b.model_dump() for b in final.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "3 C, rain"}]},
    ], tool_choice={"type": "none"})
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.content[0].type == "text"
    bare = claude.messages.create(model="", max_tokens=1, tools=[TOOL], system="Be brief.", tool_choice={"type": "none"},
                                  messages=[{"role": "user", "content": "Weather in Oslo?"}])
    assert reply.usage.input_tokens > bare.usage.input_tokens + 10  # the call and its result


def test_message_text_and_count_tokens(claude):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Tell me about rivers.", "cache_control": {"type": "ephemeral"}}]}]
    reply = claude.messages.create(model="", max_tokens=5, messages=msgs)
    assert reply.type == "message" and reply.role == "assistant"
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.usage.output_tokens <= 5
    counted = claude.messages.count_tokens(model="", messages=msgs)
    assert counted.input_tokens == reply.usage.input_tokens


def test_x_api_key_is_checked_as_a_bearer_token(endpoints):
    # A malformed lmlink token is refused even from loopback: the key is really read. (Server
    # only: the link serves loopback callers and authenticates upstream itself.)
    r = httpx.post(endpoints["server"] + "/v1/messages", headers={"x-api-key": "lmk_bogus_token"},
                   json={"model": "", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "authentication_error"


def test_messages_needs_max_tokens(base):
    r = httpx.post(base + "/v1/messages", json={"model": "", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


@pytest.mark.parametrize("body,needle", [
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "tools": [TOOL], "tool_choice": {"type": "tool", "name": "nope"}}, "nope"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "t", "input_schema": {"type": "array", "uniqueItems": True}}], "tool_choice": {"type": "any"}}, "uniqueItems"),
])
def test_messages_bad_input_is_an_anthropic_400(claude, body, needle):
    with pytest.raises(anthropic.BadRequestError, match=needle) as err:
        claude.messages.create(model="", **body)
    assert err.value.body["error"]["type"] == "invalid_request_error"
    ok = claude.messages.create(model="", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert ok.stop_reason in ("end_turn", "max_tokens")


# ----- the same access rules, quotas and audit as the other doors (in-process bridge) --------

import asyncio  # noqa: E402
import contextlib  # noqa: E402

from support.gates import DenyGate, PolicyOnlyGate  # noqa: E402
from support.inprocess import http_bridge  # noqa: E402


@contextlib.asynccontextmanager
async def guarded_bridge(engine, guard):
    """The bridge over the call core with a real Guard (grants, tokens, quotas, audit)."""
    from lmlink.api.core import Core, ServerFacts
    from lmlink.api.http_bridge import HttpBridge
    from lmlink.api.http_shell import HttpListener, bind_socket
    from lmlink.api.models import ModelManager
    from lmlink.api.streams import StreamHub

    models = ModelManager(StreamHub(asyncio.get_running_loop()))
    models.add(engine)
    app = HttpBridge(Core(models, guard, ServerFacts("t", "local"))).app()
    listener = HttpListener(app, bind_socket("127.0.0.1", 0))
    await listener.start()
    try:
        yield f"http://{listener.address}"
    finally:
        await listener.stop()


MSG = {"model": "", "max_tokens": 40, "messages": [{"role": "user", "content": "Tell me about rivers."}]}


async def test_gate_denial_is_403_in_each_doors_shape(engine):
    async with http_bridge(engine, DenyGate()) as (url, _), httpx.AsyncClient(base_url=url) as h:
        denied = await h.post("/v1/messages", json=MSG)
        assert denied.status_code == 403
        assert denied.json()["error"]["type"] == "permission_error" and "no grant" in denied.json()["error"]["message"]
        r = await h.post("/v1/responses", json={"input": "hi"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


async def test_tokens_quotas_audit_and_private_response_state(engine, tmp_path):
    from lmlink.access.state import AccessState
    from lmlink.api.limits import Guard

    state = AccessState.open(tmp_path)
    state.shares.add("alice@example.com", [engine.model_id], tokens_per_day=6)
    state.shares.add("bob@example.com", [engine.model_id])
    alice, _ = state.tokens.create("alice-cli", "alice@example.com")
    bob, _ = state.tokens.create("bob-cli", "bob@example.com")
    guard = Guard(PolicyOnlyGate(state), state)
    try:
        async with guarded_bridge(engine, guard) as url, httpx.AsyncClient(base_url=url, timeout=60) as h:
            assert (await h.post("/v1/messages", json=MSG)).status_code == 401
            bad = await h.post("/v1/messages", json=MSG, headers={"x-api-key": "lmk_not_a_real_token"})
            assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
            ok = await h.post("/v1/messages", json=MSG, headers={"x-api-key": alice})
            assert ok.status_code == 200, ok.text
            assert ok.json()["usage"]["output_tokens"] <= 6  # clamped to the day's quota
            r = await h.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2},
                             headers={"authorization": f"Bearer {bob}"})
            assert r.status_code == 200, r.text
            # bob's response is not alice's to continue
            other = await h.post("/v1/responses", headers={"authorization": f"Bearer {alice}"},
                                 json={"input": "more", "previous_response_id": r.json()["id"]})
            assert other.status_code == 404
            mine = await h.post("/v1/responses", headers={"authorization": f"Bearer {bob}"},
                                json={"input": "more", "previous_response_id": r.json()["id"], "max_output_tokens": 2})
            assert mine.status_code == 200
        rows = state.store.query("SELECT login, via, outcome FROM requests ORDER BY seq")
        logins = [(r[0], r[1]) for r in rows]
        assert ("alice@example.com", "anthropic") in logins and ("bob@example.com", "responses") in logins
    finally:
        state.close()


def test_response_store_is_bounded_per_caller_and_in_total():
    from lmlink.api.door_common import ResponseStore
    from lmlink.engine.types import ChatTurn

    store = ResponseStore(per_caller=3, total=5, max_chars=1000)
    for i in range(5):
        store.put("a", f"r{i}", (ChatTurn("user", "x"),))
    assert [store.get("a", f"r{i}") is not None for i in range(5)] == [False, False, True, True, True]
    for i in range(4):
        store.put("b", f"s{i}", (ChatTurn("user", "y"),))
    assert len(store) == 5 and store.get("b", "s0") is None and store.get("a", "r2") is None
    assert store.get("b", "s1") is not None and store.get("a", "s1") is None  # per caller
    store.put("c", "big", (ChatTurn("user", "z" * 2000),))
    assert len(store) == 1  # over the character budget: older ones go first


def test_claude_code_shaped_request_streams(base):
    """The shape Claude Code sends (beta query, cache_control everywhere, metadata, thinking off,
    system blocks, tool schemas with $schema) is accepted and streams Anthropic's events."""
    body = {
        "model": "", "max_tokens": 12, "stream": True, "temperature": 1,
        "metadata": {"user_id": "user_abc"}, "thinking": {"type": "disabled"},
        "system": [{"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "Bash", "description": "Run a command", "cache_control": {"type": "ephemeral"},
                   "input_schema": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                                    "properties": {"command": {"type": "string"}}, "required": ["command"],
                                    "additionalProperties": False}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "List files.",
                                                     "cache_control": {"type": "ephemeral"}}]}],
    }
    headers = {"x-api-key": "unused", "anthropic-version": "2023-06-01", "anthropic-beta": "prompt-caching-2024-07-31"}
    with httpx.stream("POST", base + "/v1/messages?beta=true", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        events = [line.split(": ", 1)[1] for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop" and "message_delta" in events


def test_the_link_and_its_new_doors_import_no_engine():
    """`lmlink link` runs on laptops: its doors must not pull in MLX, mlx-lm or the call core
    (that also made the link slow to start)."""
    import subprocess
    import sys

    code = ("import sys, lmlink.link.app, lmlink.link.doors, lmlink.api.agent_doors; "
            "print(sorted(m for m in ('mlx', 'mlx_lm', 'transformers', 'llguidance', "
            "'lmlink.api.core', 'lmlink.engine.engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
