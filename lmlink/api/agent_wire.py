"""Agent fields (tools, tool calls, output constraints, logprobs) between lmlink.v1 and engine
types, both ways: the server reads requests and writes events; `lmlink link` writes requests
from the same neutral `GenerationRequest` its doors build, and reads events back, so every
field crosses the link unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from lmlink.engine.types import (
    ChatTurn,
    Completed,
    Event,
    GenerationRequest,
    InvalidRequest,
    PromptProgress,
    ResponseFormat,
    SamplingOptions,
    Started,
    TokenDelta,
    TokenLogprob,
    ToolCall,
    ToolCallEvent,
    ToolSpec,
    TopLogprob,
)
from lmlink.v1 import inference_pb2 as pb

_MODES = {
    pb.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.TOOL_CHOICE_MODE_NONE: "none",
    pb.TOOL_CHOICE_MODE_REQUIRED: "required",
}
_MODE_OF = {v: k for k, v in _MODES.items()}
_FINISH_OF = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


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
    for name in ("max_tokens", "seed", "repetition_penalty"):
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


def event_from_wire(m: pb.GenerateEvent) -> Event | None:
    """A server's event as the engine event the doors render (None: nothing for them)."""
    kind = m.WhichOneof("event")
    if kind == "delta":
        d = m.delta
        lps = [
            TokenLogprob(lp.token_id, lp.token, lp.logprob, lp.bytes,
                         tuple(TopLogprob(t.token_id, t.token, t.logprob, t.bytes) for t in lp.top))
            for lp in d.logprobs
        ] or None
        return TokenDelta(d.text, list(d.token_ids), lps)
    if kind == "tool_call":
        c = m.tool_call
        return ToolCallEvent(ToolCall(c.id, c.name, c.arguments_json, c.index))
    if kind == "started":
        return Started(m.started.model, m.started.prompt_tokens, m.started.cached_tokens)
    if kind == "prompt_progress":
        p = m.prompt_progress
        return PromptProgress(p.processed_tokens, p.total_tokens)
    if kind == "completed":
        c, u, t = m.completed, m.completed.usage, m.completed.timings
        return Completed(
            _FINISH_OF.get(c.finish_reason, "stop"),  # type: ignore[arg-type]
            u.prompt_tokens, u.completion_tokens, u.cached_tokens, t.time_to_first_token_ms,
            t.total_ms, t.tokens_per_second, t.prompt_tokens_per_second, t.queued_ms,
        )
    return None


def from_client_event(event: Any) -> Event | None:
    """The client's TokenDelta / ToolCall as the engine events the OpenAI renderers take."""
    from lmlink.client import events as ev

    if isinstance(event, ev.TokenDelta):
        lps = [
            TokenLogprob(lp.token_id, lp.token, lp.logprob, lp.token.encode(),
                         tuple(TopLogprob(t.token_id, t.token, t.logprob, t.token.encode())
                               for t in lp.top))
            for lp in event.logprobs
        ] or None
        return TokenDelta(event.text, list(event.token_ids), lps)
    if isinstance(event, ev.ToolCall):
        return ToolCallEvent(ToolCall(event.id, event.name, event.arguments, event.index))
    return None
