"""OpenAI chat/completions agent fields with the official `openai` package, straight to a real
server's bridge and through a real `lmlink link` (which forwards them over gRPC)."""

from __future__ import annotations

import json
import math
from typing import Iterator

import jsonschema
import openai
import pytest

from support.agent import SCHEMA, serve_with_link

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": SCHEMA}},
    # closed object: with extra keys allowed (JSON Schema's default) the grammar lets a toy model
    # add '"": 1.1, ...' keys until max_tokens (the rebuilt built-in model does, greedily)
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 8}}, "required": ["tz"], "additionalProperties": False}}},
]
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def endpoints() -> Iterator[dict[str, str]]:
    with serve_with_link() as urls:
        yield urls


@pytest.fixture(params=["server", "link"])
def oai(request, endpoints) -> openai.OpenAI:
    return openai.OpenAI(base_url=endpoints[request.param] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("choice,names", [
    ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
    ("required", {"get_weather", "get_time"}),
])
def test_streamed_forced_tool_call_validates(oai, choice, names):
    stream = oai.chat.completions.create(model="", messages=ASK, tools=TOOLS, tool_choice=choice,
                                         stream=True, temperature=1.0, seed=11, max_tokens=300)
    calls: dict[int, dict] = {}
    finish = None
    content = ""
    for chunk in stream:
        choice0 = chunk.choices[0]
        content += choice0.delta.content or ""
        for tc in choice0.delta.tool_calls or ():
            c = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
            c["id"] = tc.id or c["id"]
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
        finish = choice0.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1 and "<tool_call>" not in content
    call = calls[0]
    assert call["name"] in names and call["id"].startswith("call_")
    args = json.loads(call["arguments"])
    schema = SCHEMA if call["name"] == "get_weather" else TOOLS[1]["function"]["parameters"]
    jsonschema.validate(args, schema)


def test_tool_result_turn_and_non_streamed_tool_call(oai):
    first = oai.chat.completions.create(model="", messages=ASK, tools=TOOLS, max_tokens=300,
                                        tool_choice={"type": "function", "function": {"name": "get_time"}})
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and msg.tool_calls[0].function.name == "get_time"
    follow = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [tc.model_dump() for tc in msg.tool_calls]},
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": '{"time": "12:00"}'},
    ]
    second = oai.chat.completions.create(model="", messages=follow, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length")
    assert not second.choices[0].message.tool_calls
    bare = oai.chat.completions.create(model="", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1)
    # the call and its result are in the prompt (tools themselves are not shown with "none")
    assert second.usage.prompt_tokens > bare.usage.prompt_tokens + 10


@pytest.mark.parametrize("seed", range(5))
def test_json_schema_answers_validate_at_temperature_one(oai, seed):
    reply = oai.chat.completions.create(
        model="", messages=[{"role": "user", "content": "Describe a trip as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}},
        temperature=1.0, seed=seed, max_tokens=400,
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)


def test_streamed_json_object(oai):
    stream = oai.chat.completions.create(model="", messages=ASK, response_format={"type": "json_object"},
                                         temperature=1.0, seed=5, max_tokens=400, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("{")


def _check_logprobs(entries, top_n):
    assert entries
    for e in entries:
        assert e.logprob <= 0 and math.isfinite(e.logprob)
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == top_n and tops == sorted(tops, reverse=True)
        assert sum(math.exp(t) for t in tops) <= 1.0001
        same = [t for t in e.top_logprobs if t.token == e.token]
        if same:
            assert same[0].logprob == pytest.approx(e.logprob, abs=1e-5)
        else:
            assert e.logprob <= tops[-1] + 1e-5


def test_chat_logprobs_whole_and_streamed(oai):
    kw = dict(model="", messages=ASK, logprobs=True, top_logprobs=4, max_tokens=12, temperature=1.0, seed=2)
    whole = oai.chat.completions.create(**kw)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens
    _check_logprobs(entries, 4)
    assert "".join(e.token for e in entries).startswith(whole.choices[0].message.content[:3])
    streamed = [e for c in oai.chat.completions.create(stream=True, **kw) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]  # same seed, same tokens
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-5)


def test_completions_logprobs(oai):
    reply = oai.completions.create(model="", prompt="Once upon a time", logprobs=3, max_tokens=6,
                                   extra_body={"ignore_eos": True})
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    # (the streaming detokenizer drops the first token's leading space from the text)
    assert "".join(lp.tokens).strip() == reply.choices[0].text.strip()
    # greedy: the chosen token is the most likely one
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        assert max(top, key=top.get) == tok or len(top) == 3


@pytest.mark.parametrize("kw,needle", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}), "uniqueItems"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}), "nowhere"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "launch_rockets"}}), "launch_rockets"),
    (dict(tools=[{"type": "web_search"}]), "only function tools"),
    (dict(functions=[{"name": "f"}]), "legacy functions"),
    (dict(response_format={"type": "xml"}), "xml"),
    (dict(logprobs=True, top_logprobs=50), "top_logprobs"),
])
def test_bad_agent_input_is_a_400_with_the_reason(oai, kw, needle):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="", messages=ASK, max_tokens=4, **kw)
    assert needle in str(err.value)
    ok = oai.chat.completions.create(model="", messages=ASK, max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")
