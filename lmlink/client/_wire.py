"""Request building and event decoding shared by the sync and async clients."""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

from lmlink.v1 import inference_pb2 as pb

from .events import (
    Completed,
    Event,
    Logprob,
    PromptProgress,
    Started,
    Timings,
    TokenDelta,
    ToolCall,
    Usage,
)

_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}

Message = Mapping[str, str] | tuple[str, str]


def build_request(
    *,
    messages: Sequence[Message] | None = None,
    prompt: str | None = None,
    model: str = "",
    request_id: str = "",
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    stop: Iterable[str] = (),
    seed: int | None = None,
    repetition_penalty: float | None = None,
    ignore_eos: bool = False,
    tools: Sequence[Mapping[str, Any]] = (),
    tool_choice: str | None = None,
    json_schema: Mapping[str, Any] | bool | None = None,
    top_logprobs: int | None = None,
    speculate: bool | None = None,
) -> pb.GenerateRequest:
    """`tools`: {"name", "description", "parameters"} dicts; `tool_choice`: auto, none, required
    or a function name; `json_schema`: a schema the answer must follow (True: any JSON object);
    `top_logprobs`: report logprobs with that many alternatives (0-20)."""
    if (messages is None) == (prompt is None):
        raise ValueError("pass exactly one of messages= or prompt=")
    sampling = pb.SamplingParams(stop=list(stop), ignore_eos=ignore_eos)
    for name, value in (
        ("max_tokens", max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("min_p", min_p),
        ("seed", seed),
        ("repetition_penalty", repetition_penalty),
        ("speculate", speculate),
    ):
        if value is not None:
            setattr(sampling, name, value)
    request = pb.GenerateRequest(model=model, request_id=request_id, sampling=sampling)
    if prompt is not None:
        request.prompt = prompt
    else:
        for m in messages or ():
            role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
            msg = request.chat.messages.add(role=role, content=content or "")
            if isinstance(m, Mapping):
                msg.tool_call_id = m.get("tool_call_id") or ""
                msg.name = m.get("name") or ""
                for i, c in enumerate(m.get("tool_calls") or ()):
                    msg.tool_calls.add(id=c.get("id", ""), name=c["name"], index=i,
                                       arguments_json=c.get("arguments") or "{}")
        if not request.HasField("chat"):
            request.chat.SetInParent()
    for t in tools:
        params = t.get("parameters")
        request.tools.add(name=t["name"], description=t.get("description") or "",
                          parameters_json=json.dumps(params) if params is not None else "")
    modes = {"auto": pb.TOOL_CHOICE_MODE_AUTO, "none": pb.TOOL_CHOICE_MODE_NONE,
             "required": pb.TOOL_CHOICE_MODE_REQUIRED}
    if tool_choice in modes:
        request.tool_choice.mode = modes[tool_choice]
    elif tool_choice:
        request.tool_choice.function = tool_choice
    if json_schema is True:
        request.response_format.json_object.SetInParent()
    elif json_schema:
        request.response_format.json_schema.schema_json = json.dumps(json_schema)
    if top_logprobs is not None:
        request.logprobs.enabled = True
        request.logprobs.top_logprobs = top_logprobs
    return request


def decode_event(message: pb.GenerateEvent) -> Event:
    rid = message.request_id
    kind = message.WhichOneof("event")
    if kind == "delta":
        lps = tuple(
            Logprob(lp.token_id, lp.token, lp.logprob,
                    tuple(Logprob(t.token_id, t.token, t.logprob, (), t.bytes) for t in lp.top),
                    lp.bytes)
            for lp in message.delta.logprobs
        )
        return TokenDelta(rid, message.delta.text, tuple(message.delta.token_ids), lps)
    if kind == "tool_call":
        c = message.tool_call
        return ToolCall(rid, c.id, c.name, c.arguments_json, c.index)
    if kind == "started":
        s = message.started
        return Started(rid, s.model, s.prompt_tokens, s.cached_tokens)
    if kind == "prompt_progress":
        p = message.prompt_progress
        return PromptProgress(rid, p.processed_tokens, p.total_tokens)
    if kind == "completed":
        c = message.completed
        u, t = c.usage, c.timings
        return Completed(
            rid,
            _FINISH.get(c.finish_reason, "unspecified"),  # type: ignore[arg-type]
            Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens),
            Timings(
                t.time_to_first_token_ms,
                t.total_ms,
                t.tokens_per_second,
                t.prompt_tokens_per_second,
                t.queued_ms,
                t.draft_tokens,
                t.accepted_draft_tokens,
                t.draft_acceptance_rate,
                t.tokens_per_step,
            ),
        )
    raise ValueError(f"unknown event kind {kind!r}")


def event_to_dict(event: Event) -> dict[str, Any]:
    """JSON-ready form used by `lmlink chat --json`."""
    from dataclasses import asdict

    data = asdict(event)
    data["type"] = {
        Started: "started",
        PromptProgress: "prompt_progress",
        TokenDelta: "delta",
        ToolCall: "tool_call",
        Completed: "completed",
    }[type(event)]
    if isinstance(event, TokenDelta):
        data["token_ids"] = list(event.token_ids)
    return data
