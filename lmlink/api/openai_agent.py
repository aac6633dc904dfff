"""OpenAI's agent fields <-> engine types: tools, tool_choice, response_format, logprobs.

Parsing fills the neutral `GenerationRequest` (the engine enforces and refuses); rendering
turns tool-call events and token logprobs into chat / completions JSON, whole or streamed.
Shared by the server's bridge and `lmlink link`, and by the Responses door.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from lmlink.engine.types import MAX_TOP_LOGPROBS, ResponseFormat, TokenLogprob, ToolCall, ToolSpec

from .openai_schema import ApiError


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, code="invalid_value", param=param)


def _unsupported(message: str, param: str) -> ApiError:
    return ApiError(400, message, code="unsupported_parameter", param=param)


def parse_tools(raw: Any, param: str = "tools", *, flat: bool = False) -> tuple[ToolSpec, ...]:
    """OpenAI `tools` (chat: {type, function: {...}}; Responses, `flat`: {type, name, ...})."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _bad(f"{param} must be a list of tools", param)
    out = []
    for i, t in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(t, dict):
            raise _bad(f"{where} must be an object", where)
        if t.get("type") != "function":
            raise _unsupported(
                f"{where} has type {t.get('type')!r}; only function tools are supported", where
            )
        fn = t if flat else t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"{where} needs a function name", where)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _bad(f"{where}.parameters must be a JSON Schema object", where)
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise _bad(f"{where}.description must be a string", where)
        out.append(ToolSpec(fn["name"], desc, json.dumps(params) if params is not None else ""))
    return tuple(out)


def parse_tool_choice(raw: Any, param: str = "tool_choice", *, flat: bool = False) -> str:
    if raw is None:
        return "auto"
    if isinstance(raw, str):
        if raw in ("auto", "none", "required"):
            return raw
        raise _bad(f"{param} must be auto, none, required or a function", param)
    if isinstance(raw, dict) and raw.get("type") == "function":
        fn = raw if flat else raw.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return "function:" + fn["name"]
    raise _bad(f"{param} must be auto, none, required or {{type: function, function: {{name}}}}", param)


def parse_response_format(raw: Any, param: str = "response_format") -> ResponseFormat | None:
    """Chat's `response_format` (Responses' `text.format` has the schema one level up)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad(f"{param} must be an object with a type", param)
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        spec = raw.get("json_schema", raw)  # chat nests it; Responses' text.format does not
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise _bad(f"{param}.json_schema.schema must be a JSON Schema object", param)
        return ResponseFormat("json_schema", json.dumps(spec.get("schema", {})), str(spec.get("name", "")))
    raise _unsupported(
        f"{param} type {kind!r} is not supported; use text, json_object or json_schema", param
    )


def parse_chat_logprobs(body: Mapping[str, Any]) -> int | None:
    want = body.get("logprobs")
    top = body.get("top_logprobs")
    if want not in (None, True, False):
        raise _bad("logprobs must be a boolean", "logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool)
                            or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise _bad(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", "top_logprobs")
    if not want:
        if top:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        return None
    return top or 0


def parse_completion_logprobs(body: Mapping[str, Any]) -> int | None:
    n = body.get("logprobs")
    if n is None or n is False:
        return None
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_TOP_LOGPROBS:
        raise _bad(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", "logprobs")
    return n


# ----- rendering --------------------------------------------------------------------------------


def tool_call_json(c: ToolCall) -> dict[str, Any]:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def tool_call_delta(c: ToolCall) -> dict[str, Any]:
    return {"index": c.index, **tool_call_json(c)}


def _bytes(b: bytes) -> list[int]:
    return list(b)


def chat_logprobs(lps: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token, "logprob": lp.logprob, "bytes": _bytes(lp.bytes),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.bytes)} for t in lp.top
                ],
            }
            for lp in lps
        ],
        "refusal": None,
    }


def completion_logprobs(lps: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    offsets, pos = [], offset
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return {
        "tokens": [lp.token for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def parse_turn_tools(raw: Mapping[str, Any], role: str, content: str, where: str) -> Any:
    """An assistant turn's `tool_calls`, or a tool turn's `tool_call_id`, into a ChatTurn."""
    from lmlink.engine.types import ChatTurn

    if role == "tool":
        call_id = raw.get("tool_call_id") or ""
        if not isinstance(call_id, str):
            raise _bad(f"{where}.tool_call_id must be a string", where)
        name = raw.get("name") or ""
        return ChatTurn("tool", content, tool_call_id=call_id, name=name if isinstance(name, str) else "")
    calls = raw.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _bad(f"{where}.tool_calls must be a list", where)
    out = []
    for i, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"{where}.tool_calls[{i}] needs function.name", where)
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args)
        out.append(ToolCall(str(c.get("id") or f"call_{i}"), fn["name"], args, i))
    return ChatTurn("assistant", content, tool_calls=tuple(out))


class Extras:
    """Tool calls and logprobs gathered from a whole generation's events."""

    def __init__(self) -> None:
        self.tool_calls: list[ToolCall] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.text_parts: list[str] = []

    def add(self, event: Any) -> None:
        from lmlink.engine.types import TokenDelta, ToolCallEvent

        if isinstance(event, TokenDelta):
            self.text_parts.append(event.text)
            if event.logprobs is not None:
                self.logprobs = (self.logprobs or []) + list(event.logprobs)
        elif isinstance(event, ToolCallEvent):
            self.tool_calls.append(event.call)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    async def collect(self, events: Any) -> Any:
        """Add every event of an async iterable (a call-core Generation); return its Completed."""
        from lmlink.engine.types import Completed

        async for event in events:
            self.add(event)
            if isinstance(event, Completed):
                return event
        from .errors import CallError, ErrorKind

        raise CallError(ErrorKind.INTERNAL, "the generation ended without completing")

    def tool_calls_json(self) -> list[dict[str, Any]]:
        return [tool_call_json(c) for c in self.tool_calls]

    def logprobs_json(self, kind: str) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        return chat_logprobs(self.logprobs) if kind == "chat" else completion_logprobs(self.logprobs)


def agent_chunk(encoder: Any, event: Any) -> bytes:
    """A stream chunk for one engine event: content (+ logprobs) or a tool call delta."""
    from lmlink.engine.types import TokenDelta, ToolCallEvent

    from .openai_schema import _dumps

    if isinstance(event, ToolCallEvent):
        if encoder.kind != "chat":
            return b""
        payload = {"tool_calls": [tool_call_delta(event.call)]}
        return encoder._chunk(b'"delta":' + _dumps(payload), None)
    if not isinstance(event, TokenDelta):
        return b""
    if event.logprobs is None:
        return encoder.delta(event.text) if event.text else b""
    lp = chat_logprobs(event.logprobs) if encoder.kind == "chat" else completion_logprobs(event.logprobs)
    # Swap the template's `"logprobs":null` (after the escaped text) for this delta's logprobs.
    head, sep, tail = encoder.delta(event.text).rpartition(b'"logprobs":null')
    return head + b'"logprobs":' + _dumps(lp) + tail
