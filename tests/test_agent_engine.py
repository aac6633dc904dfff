"""Engine-level agent features: enforced output constraints, forced tool calls, logprobs."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest

from lmlink.engine.tools import HERMES, ToolCallSink
from lmlink.engine.types import (
    ChatTurn,
    Completed,
    GenerationRequest,
    InvalidRequest,
    ResponseFormat,
    SamplingOptions,
    TokenDelta,
    ToolCall,
    ToolCallEvent,
    ToolSpec,
)
from support.collect import CollectingSink, completed, text

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "unit": {"enum": ["C", "F"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
WEATHER = ToolSpec("get_weather", "Weather for a city", json.dumps(SCHEMA))
CLOCK = ToolSpec("get_time", "The time", json.dumps({"type": "object", "properties": {}}))


def run(engine, request: GenerationRequest):
    sink = CollectingSink()
    engine.submit(request, sink)
    return sink.wait()


def ask(content: str = "Plan a trip.", **kw) -> GenerationRequest:
    sampling = kw.pop("sampling", SamplingOptions(max_tokens=200))
    return GenerationRequest("", messages=(ChatTurn("user", content),), sampling=sampling, **kw)


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_is_enforced_at_temperature_one(engine, seed):
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMA))
    sampling = SamplingOptions(temperature=1.0, seed=seed, max_tokens=300)
    events = run(engine, ask(response_format=fmt, sampling=sampling))
    assert completed(events).finish_reason == "stop"
    jsonschema.validate(json.loads(text(events)), SCHEMA)


def test_json_object_is_an_object(engine):
    events = run(engine, ask(response_format=ResponseFormat("json_object"),
                             sampling=SamplingOptions(temperature=1.0, seed=3, max_tokens=300)))
    out = text(events)
    if completed(events).finish_reason == "stop":
        assert isinstance(json.loads(out), dict)
    else:
        assert out.startswith("{")


@pytest.mark.parametrize("choice,names", [("function:get_weather", {"get_weather"}),
                                          ("required", {"get_weather", "get_time"})])
def test_forced_tool_call_is_valid(engine, choice, names):
    for seed in range(3):
        sampling = SamplingOptions(temperature=1.0, seed=seed, max_tokens=300)
        events = run(engine, ask("Weather?", tools=(WEATHER, CLOCK), tool_choice=choice, sampling=sampling))
        calls = [e.call for e in events if isinstance(e, ToolCallEvent)]
        assert len(calls) == 1, events
        assert calls[0].name in names
        if calls[0].name == "get_weather":
            jsonschema.validate(json.loads(calls[0].arguments), SCHEMA)
        assert completed(events).finish_reason == "tool_calls"
        assert "<tool_call>" not in text(events)


def test_tool_results_render_in_the_next_turn(engine):
    call = ToolCall("call_1", "get_weather", '{"city": "Oslo", "days": 1, "unit": "C"}')
    turns = (
        ChatTurn("user", "Weather in Oslo?"),
        ChatTurn("assistant", "", tool_calls=(call,)),
        ChatTurn("tool", '{"temp": 3}', tool_call_id="call_1", name="get_weather"),
    )
    req = GenerationRequest("", messages=turns, tools=(WEATHER,), sampling=SamplingOptions(max_tokens=8))
    from lmlink.engine.prompts import encode_prompt

    prompt = engine.loaded.tokenizer.decode(encode_prompt(engine.loaded.tokenizer, req))
    assert "<tool_response>\n{\"temp\": 3}\n</tool_response>" in prompt
    assert '"name": "get_weather"' in prompt and "<tools>" in prompt
    assert completed(run(engine, req)).finish_reason in ("stop", "length")


def test_logprobs_are_sane(engine):
    sampling = SamplingOptions(temperature=1.0, seed=7, max_tokens=20, logprobs=5, ignore_eos=True)
    events = run(engine, ask(sampling=sampling))
    deltas = [e for e in events if isinstance(e, TokenDelta) and e.token_ids]
    lps = [lp for d in deltas for lp in d.logprobs]
    assert len(lps) == sum(len(d.token_ids) for d in deltas) == 20
    for lp, tid in zip(lps, [t for d in deltas for t in d.token_ids]):
        assert lp.token_id == tid and lp.logprob <= 0 and math.isfinite(lp.logprob)
        tops = [t.logprob for t in lp.top]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert sum(math.exp(t) for t in tops) <= 1.0001
        # the chosen token is in the top list exactly when it is likely enough
        match = [t for t in lp.top if t.token_id == tid]
        if match:
            assert match[0].logprob == pytest.approx(lp.logprob)
        else:
            assert lp.logprob <= tops[-1] + 1e-6


def test_greedy_choice_is_the_top_logprob(engine):
    events = run(engine, ask(sampling=SamplingOptions(max_tokens=10, logprobs=3, ignore_eos=True)))
    for d in events:
        if isinstance(d, TokenDelta):
            for lp in d.logprobs or []:
                assert lp.top[0].token_id == lp.token_id


@pytest.mark.parametrize("fmt,needle", [
    (ResponseFormat("json_schema", '{"type": "array", "uniqueItems": true}'), "uniqueItems"),
    (ResponseFormat("json_schema", '{"type": "object", "not": {}}'), "not"),
    (ResponseFormat("json_schema", "{nope"), "not valid JSON"),
    (ResponseFormat("json_schema", '{"$ref": "#/missing"}'), "missing"),
    (ResponseFormat("regex", "[a-"), "regex"),
    (ResponseFormat("xml"), "xml"),
])
def test_unenforceable_constraints_are_refused_by_name(engine, fmt, needle):
    with pytest.raises(InvalidRequest, match=needle):
        engine.submit(ask(response_format=fmt), CollectingSink())


@pytest.mark.parametrize("kw,needle", [
    (dict(tools=(WEATHER,), tool_choice="function:nope"), "nope"),
    (dict(tools=(WEATHER, WEATHER)), "unique"),
    (dict(tool_choice="required"), "no tools"),
    (dict(tools=(ToolSpec("bad name"),)), "bad name"),
    (dict(tools=(ToolSpec("f", parameters="{x"),), tool_choice="required"), "not valid JSON"),
])
def test_bad_tool_requests_are_refused(engine, kw, needle):
    with pytest.raises(InvalidRequest, match=needle):
        engine.submit(ask(**kw), CollectingSink())


def test_engine_keeps_serving_after_refusals(engine):
    assert completed(run(engine, ask(sampling=SamplingOptions(max_tokens=4)))).completion_tokens >= 1


class _Keep:
    def __init__(self):
        self.events = []

    def deliver(self, events):
        self.events += events


def _done():
    return Completed("stop", 1, 1, 0, 0, 0, 0, 0, 0)


def test_tool_call_parser_streams_split_tags():
    out = _Keep()
    sink = ToolCallSink(out, HERMES, (WEATHER,))
    pieces = ["Sure. <to", "ol_call>\n{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": \"Oslo\"}}\n</tool", "_call> ok"]
    for p in pieces:
        sink.deliver([TokenDelta(p, [1])])
    sink.deliver([_done()])
    texts = "".join(e.text for e in out.events if isinstance(e, TokenDelta))
    calls = [e.call for e in out.events if isinstance(e, ToolCallEvent)]
    assert texts == "Sure.  ok"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert out.events[-1].finish_reason == "tool_calls"


def test_unparseable_call_block_stays_text():
    out = _Keep()
    sink = ToolCallSink(out, HERMES, (WEATHER,))
    sink.deliver([TokenDelta("<tool_call>not json</tool_call>", [1]), _done()])
    assert "".join(e.text for e in out.events if isinstance(e, TokenDelta)) == "<tool_call>not json</tool_call>"
    assert out.events[-1].finish_reason == "stop"


def test_constrained_and_free_requests_share_a_batch(engine):
    """Masks are per request: free greedy streams in the same batch give their solo tokens."""
    from support.collect import token_ids

    free = [ask(f"Tell me about thing {i}.", sampling=SamplingOptions(max_tokens=24)) for i in range(3)]
    solo = [token_ids(run(engine, r)) for r in free]
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMA))
    sinks = []
    for i in range(6):
        sink = CollectingSink()
        if i % 2:
            engine.submit(free[i // 2], sink)
        else:
            engine.submit(ask(response_format=fmt, sampling=SamplingOptions(temperature=1.0, seed=i, max_tokens=300)), sink)
        sinks.append(sink)
    results = [s.wait() for s in sinks]
    for i, events in enumerate(results):
        if i % 2:
            assert token_ids(events) == solo[i // 2]
        else:
            jsonschema.validate(json.loads(text(events)), SCHEMA)


def test_grpc_refuses_an_unenforceable_schema_with_invalid_argument(server):
    import grpc

    from lmlink.client import Client
    from lmlink.v1 import inference_pb2 as pb

    req = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")]))
    req.response_format.json_schema.schema_json = '{"type": "array", "uniqueItems": true}'
    with Client(server.address) as client:
        stub = client._stub
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(req, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "uniqueItems" in err.value.details()
        ok = client.chat([{"role": "user", "content": "hi"}], max_tokens=2)
        assert ok.completed is not None


def test_python_client_over_grpc_tools_schema_logprobs(server):
    """The lmlink client sends every agent field over gRPC and reads tool-call events back."""
    from lmlink.client import Client

    ask_ = [{"role": "user", "content": "Weather in Oslo?"}]
    tools = [{"name": "get_weather", "description": "Weather", "parameters": SCHEMA}]
    with Client(server.address, timeout=120) as client:
        gen = client.chat(ask_, tools=tools, tool_choice="get_weather", max_tokens=300, temperature=1.0, seed=4)
        assert gen.finish_reason == "tool_calls" and len(gen.tool_calls) == 1
        jsonschema.validate(json.loads(gen.tool_calls[0].arguments), SCHEMA)
        follow = ask_ + [
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": gen.tool_calls[0].id, "name": "get_weather", "arguments": gen.tool_calls[0].arguments}]},
            {"role": "tool", "content": "3 C", "tool_call_id": gen.tool_calls[0].id},
        ]
        assert client.chat(follow, tools=tools, max_tokens=4).completed is not None
        doc = client.chat(ask_, json_schema=SCHEMA, max_tokens=300, temperature=1.0, seed=9)
        jsonschema.validate(json.loads(doc.text), SCHEMA)
        from lmlink.client import TokenDelta as ClientDelta

        lps = [lp for e in client.stream(messages=ask_, max_tokens=5, top_logprobs=2)
               if isinstance(e, ClientDelta) for lp in e.logprobs]
        assert len(lps) >= 1 and all(lp.logprob <= 0 and len(lp.top) == 2 for lp in lps)


def test_a_tokenizer_llguidance_cannot_wrap_is_a_clear_refusal():
    from lmlink.engine.constrained import llg_tokenizer

    class SlowTokenizer:  # not a transformers fast tokenizer
        eos_token_ids = [0]
        eos_token_id = 0

    tok = SlowTokenizer()
    for _ in range(2):  # remembered, and still a clear refusal
        with pytest.raises(InvalidRequest, match="not available for this model's tokenizer"):
            llg_tokenizer(tok)


async def test_a_prebuilt_request_carries_the_clients_token(server):
    """The link forwards whole requests with `stream_request`; it must send the same credentials
    as `stream` (a bogus lmlink token is refused even from loopback, so it must be seen)."""
    from lmlink.client import AsyncClient, Unauthenticated
    from lmlink.v1 import inference_pb2 as pb

    req = pb.GenerateRequest(prompt="Once", sampling=pb.SamplingParams(max_tokens=2))
    async with AsyncClient(server.address, timeout=60, token="lmk_not_a_real_token") as client:
        with pytest.raises(Unauthenticated):
            async for _ in client.stream_request(req):
                pass
    async with AsyncClient(server.address, timeout=60) as client:
        events = [e async for e in client.stream_request(req)]
        assert events[-1].usage.completion_tokens == 2


def test_constrained_requests_do_not_speculate(engine):
    """The grammar processor has state, so it must never see draft tokens that may be rejected:
    a constrained request asking for speculation decodes without drafts and stays valid, while
    the same prompt unconstrained does draft (prompt lookup finds the repeated text)."""
    prompt = 'Copy this: {"city": "Oslo", "days": 3, "unit": "C", "tags": []} ' * 4
    free = run(engine, ask(prompt, sampling=SamplingOptions(max_tokens=60, speculate=True, ignore_eos=True)))
    assert completed(free).draft_tokens > 0
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMA))
    events = run(engine, ask(prompt, response_format=fmt, sampling=SamplingOptions(max_tokens=300, speculate=True)))
    assert completed(events).draft_tokens == 0
    jsonschema.validate(json.loads(text(events)), SCHEMA)
