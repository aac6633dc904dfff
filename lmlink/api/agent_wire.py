"""Agent fields (tools, tool calls, output constraints, logprobs) between lmlink.v1 and engine
types: the server reads requests and writes events; `lmlink link` writes whole requests from
the same neutral `GenerationRequest` its doors build, so every field crosses the link unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from lmlink.engine.types import (
    ChatTurn,
    GenerationRequest,
    InvalidRequest,
    ResponseFormat,
    SamplingOptions,
    TokenLogprob,
    ToolCall,
    ToolSpec,
)
from lmlink.v1 import inference_pb2 as pb

_MODES = {
    pb.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.TOOL_CHOICE_MODE_NONE: "none",
    pb.TOOL_CHOICE_MODE_REQUIRED: "required",
}
_MODE_OF = {v: k for k, v in _MODES.items()}


# ----- wire -> engine (the server) ------------------------------------------------------------


def turn_from_wire(m: pb.ChatMessage) -> ChatTurn:
    calls = tuple(
        ToolCall(c.id, c.name, c.arguments_json, c.index or i) for i, c in enumerate(m.tool_calls)
    )
    return ChatTurn(m.role, m.content, calls, m.tool_call_id, m.name)


def agent_fields_from_wire(
    req: pb.GenerateRequest, sampling: SamplingOptions
) -> tuple[SamplingOptions, dict[str, Any]]:
    """The sampling options with logprobs set, and GenerationRequest's agent keyword args."""
    out: dict[str, Any] = {}
    if req.tools:
        out["tools"] = tuple(ToolSpec(t.name, t.description, t.parameters_json) for t in req.tools)
    if req.HasField("tool_choice"):
        which = req.tool_choice.WhichOneof("choice")
        if which == "function":
            out["tool_choice"] = "function:" + req.tool_choice.function
        elif which == "mode":
            mode = _MODES.get(req.tool_choice.mode)
            if mode is None:
                raise InvalidRequest(f"unknown tool_choice mode {req.tool_choice.mode}")
            out["tool_choice"] = mode
    if req.HasField("response_format"):
        f = req.response_format
        which = f.WhichOneof("format")
        if which == "json_object":
            out["response_format"] = ResponseFormat("json_object")
        elif which == "json_schema":
            out["response_format"] = ResponseFormat(
                "json_schema", f.json_schema.schema_json, f.json_schema.name
            )
        elif which in ("regex", "lark"):
            out["response_format"] = ResponseFormat(which, getattr(f, which))
    if req.HasField("logprobs") and req.logprobs.enabled:
        sampling = replace(sampling, logprobs=req.logprobs.top_logprobs)
    return sampling, out


def tool_call_to_wire(c: ToolCall) -> pb.ToolCall:
    return pb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments, index=c.index)


def logprobs_to_wire(lps: Sequence[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id, token=lp.token, logprob=lp.logprob, bytes=lp.bytes,
            top=[pb.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob, bytes=t.bytes)
                 for t in lp.top],
        )
        for lp in lps
    ]


# ----- engine -> wire (the link's requests) ---------------------------------------------------


def request_to_wire(r: GenerationRequest, model: str = "", request_id: str = "") -> pb.GenerateRequest:
    """The whole neutral request as lmlink.v1, for forwarding to a server."""
    s = r.sampling
    sampling = pb.SamplingParams(stop=list(s.stop), ignore_eos=s.ignore_eos)
    if s.temperature:
        sampling.temperature = s.temperature
    if s.top_p != 1.0:
        sampling.top_p = s.top_p
    if s.top_k:
        sampling.top_k = s.top_k
    if s.min_p:
        sampling.min_p = s.min_p
    for name in ("max_tokens", "seed", "repetition_penalty", "speculate"):
        value = getattr(s, name)
        if value is not None:
            setattr(sampling, name, value)
    req = pb.GenerateRequest(model=model, request_id=request_id or r.request_id, sampling=sampling)
    if r.prompt is not None:
        req.prompt = r.prompt
    else:
        req.chat.SetInParent()
        for t in r.messages or ():
            req.chat.messages.add(
                role=t.role, content=t.content, tool_call_id=t.tool_call_id, name=t.name,
                tool_calls=[tool_call_to_wire(c) for c in t.tool_calls],
            )
    for t in r.tools:
        req.tools.add(name=t.name, description=t.description, parameters_json=t.parameters)
    if r.tool_choice.startswith("function:"):
        req.tool_choice.function = r.tool_choice.split(":", 1)[1]
    elif r.tool_choice != "auto":
        req.tool_choice.mode = _MODE_OF.get(r.tool_choice, pb.TOOL_CHOICE_MODE_AUTO)
    f = r.response_format
    if f is not None:
        if f.kind == "json_object":
            req.response_format.json_object.SetInParent()
        elif f.kind == "json_schema":
            req.response_format.json_schema.schema_json = f.spec
            req.response_format.json_schema.name = f.name
        elif f.kind in ("regex", "lark"):
            setattr(req.response_format, f.kind, f.spec)
    if s.logprobs is not None:
        req.logprobs.enabled = True
        req.logprobs.top_logprobs = s.logprobs
    return req

