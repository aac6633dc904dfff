"""POST /v1/responses: OpenAI's Responses API over the neutral request (Codex and agent SDKs).

Supported: `input` (a string, or message / function_call / function_call_output items with
text parts), `instructions`, `previous_response_id` (per-caller, bounded server-side state),
`tools` (function tools), `tool_choice`, `text.format` (text / json_object / json_schema,
enforced), `temperature`, `top_p`, `max_output_tokens`, `stream` (OpenAI's event types),
`store`, `metadata` (echoed). Ignored (do not change the answer's shape): `parallel_tool_calls`,
`reasoning`, `include`, `user`, `truncation`, `service_tier`, `prompt_cache_key`, `safety_identifier`.
Refused with a 400 naming the field: non-text input parts, built-in tools (web search, file
search, computer use, ...), `background`, `conversation`, `prompt`, `top_logprobs`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, AsyncIterator, Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmlink.engine.types import (
    ChatTurn,
    Completed,
    GenerationRequest,
    Started,
    TokenDelta,
    ToolCall,
    ToolCallEvent,
)

from .door_common import DoorBackend, ResponseStore, bad_request, dumps, new_id, sampling
from .openai_agent import parse_response_format, parse_tool_choice, parse_tools
from .errors import CallError
from .http_shell import EventStream, read_body
from .openai_schema import ApiError, parse_json

MAX_BODY = 4 * 1024 * 1024
_REFUSED = ("background", "conversation", "prompt", "top_logprobs")


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts", where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise ApiError(400, f"{where}[{j}] is a {kind!r} part; only text parts are supported",
                           code="unsupported_parameter", param=where)
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}[{j}].text must be a string", where)
        out.append(part["text"])
    return "".join(out)


def parse_input(raw: Any) -> list[ChatTurn]:
    if isinstance(raw, str):
        return [ChatTurn("user", raw)]
    if not isinstance(raw, list):
        raise bad_request("input must be a string or a list of items", "input")
    turns: list[ChatTurn] = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role == "developer":
                role = "system"
            if role not in ("user", "system", "assistant"):
                raise bad_request(f"{where}.role must be user, system, developer or assistant", where)
            turns.append(ChatTurn(role, _text_of(item.get("content"), f"{where}.content")))
        elif kind == "function_call":
            name, args = item.get("name"), item.get("arguments", "{}")
            if not isinstance(name, str) or not isinstance(args, str):
                raise bad_request(f"{where} needs name and arguments (a JSON string)", where)
            call_id = str(item.get("call_id") or item.get("id") or new_id("call"))
            last = turns[-1] if turns else None
            if last is not None and last.role == "assistant" and not last.tool_call_id:
                call = ToolCall(call_id, name, args, len(last.tool_calls))
                turns[-1] = replace(last, tool_calls=last.tool_calls + (call,))
            else:
                turns.append(ChatTurn("assistant", "", (ToolCall(call_id, name, args, 0),)))
        elif kind == "function_call_output":
            out = item.get("output")
            text = out if isinstance(out, str) else _text_of(out, f"{where}.output")
            turns.append(ChatTurn("tool", text, tool_call_id=str(item.get("call_id") or "")))
        elif kind == "reasoning":
            continue  # another server's reasoning summary: nothing this model can use
        else:
            raise ApiError(400, f"{where} has type {kind!r}; supported: message, function_call, "
                           "function_call_output", code="unsupported_parameter", param=where)
    return turns


class ResponsesDoor:
    def __init__(self, backend: DoorBackend, store: ResponseStore | None = None) -> None:
        self.backend = backend
        self.store = store or ResponseStore()

    async def create(self, request: Request) -> Response:
        raw = await read_body(request, MAX_BODY)
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        for key in _REFUSED:
            if body.get(key) not in (None, False, 0):
                raise ApiError(400, f"{key} is not supported", code="unsupported_parameter", param=key)
        caller = await self.backend.caller_key(request)
        history: tuple[ChatTurn, ...] = ()
        previous = body.get("previous_response_id")
        if previous is not None:
            if not isinstance(previous, str):
                raise bad_request("previous_response_id must be a string", "previous_response_id")
            found = self.store.get(caller, previous)
            if found is None:
                raise ApiError(404, f"previous response {previous!r} was not found (it expired, "
                               "was not stored, or belongs to someone else)",
                               code="previous_response_not_found", param="previous_response_id")
            history = found
        turns = [*history, *parse_input(body.get("input", []))]
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise bad_request("instructions must be a string", "instructions")
        messages = ([ChatTurn("system", instructions)] if instructions else []) + turns
        if not messages:
            raise bad_request("input is empty", "input")
        text_opts = body.get("text") or {}
        fmt = parse_response_format(text_opts.get("format") if isinstance(text_opts, dict) else None,
                                    "text.format")
        gen = GenerationRequest(
            "", messages=tuple(messages),
            sampling=sampling(body, max_key="max_output_tokens"),
            tools=parse_tools(body.get("tools"), flat=True),
            tool_choice=parse_tool_choice(body.get("tool_choice"), flat=True),
            response_format=fmt,
        )
        model = body.get("model") or ""
        if not isinstance(model, str):
            raise bad_request("model must be a string", "model")
        call = await self.backend.open(request, model, gen)
        shape = _Shape(new_id("resp"), int(time.time()), call.model, body, previous)
        store = body.get("store", True) is not False

        def remember(output_turn: ChatTurn) -> None:
            if store:
                self.store.put(caller, shape.id, (*turns, output_turn))

        if body.get("stream"):
            return EventStream(_stream(call, shape, remember), on_close=call.close)
        try:
            async for event in call.events():
                shape.add(event)
        finally:
            call.close()
        remember(shape.turn())
        return JSONResponse(shape.response())


class _Shape:
    """The response object as it grows: output items from text deltas and tool calls."""

    def __init__(self, rid: str, created: int, model: str, body: Mapping[str, Any], previous: Any) -> None:
        self.id, self.created, self.model, self.body, self.previous = rid, created, model, body, previous
        self.items: list[dict[str, Any]] = []
        self.open_msg: dict[str, Any] | None = None
        self.done: Completed | None = None
        self.text_parts: list[str] = []
        self.calls: list[ToolCall] = []

    def add(self, event: Any) -> list[tuple[str, dict[str, Any]]]:
        """Apply one engine event; returns the stream events it makes."""
        out: list[tuple[str, dict[str, Any]]] = []
        if isinstance(event, TokenDelta) and event.text:
            self.text_parts.append(event.text)
            if self.open_msg is None:
                self.open_msg = {"type": "message", "id": new_id("msg"), "status": "in_progress",
                                 "role": "assistant", "content": []}
                self.items.append(self.open_msg)
                out.append(("response.output_item.added", {"output_index": len(self.items) - 1, "item": dict(self.open_msg)}))
                out.append(("response.content_part.added", {**self._where(), "part": _part("")}))
                self.open_msg["content"] = [_part("")]
            self.open_msg["content"][0]["text"] += event.text
            out.append(("response.output_text.delta", {**self._where(), "delta": event.text, "logprobs": []}))
        elif isinstance(event, ToolCallEvent):
            out += self._close_message()
            c = event.call
            self.calls.append(c)
            item = {"type": "function_call", "id": new_id("fc"), "call_id": c.id, "name": c.name,
                    "arguments": "", "status": "in_progress"}
            self.items.append(item)
            index = len(self.items) - 1
            out.append(("response.output_item.added", {"output_index": index, "item": dict(item)}))
            out.append(("response.function_call_arguments.delta", {"item_id": item["id"], "output_index": index, "delta": c.arguments}))
            item.update(arguments=c.arguments, status="completed")
            out.append(("response.function_call_arguments.done", {"item_id": item["id"], "output_index": index, "name": c.name, "arguments": c.arguments}))
            out.append(("response.output_item.done", {"output_index": index, "item": item}))
        elif isinstance(event, Completed):
            out += self._close_message()
            self.done = event
        return out

    def _where(self) -> dict[str, Any]:
        assert self.open_msg is not None
        return {"item_id": self.open_msg["id"], "output_index": self.items.index(self.open_msg), "content_index": 0}

    def _close_message(self) -> list[tuple[str, dict[str, Any]]]:
        msg = self.open_msg
        if msg is None:
            return []
        where = self._where()
        self.open_msg = None
        part = msg["content"][0]
        msg["status"] = "completed"
        return [
            ("response.output_text.done", {**where, "text": part["text"], "logprobs": []}),
            ("response.content_part.done", {**where, "part": part}),
            ("response.output_item.done", {"output_index": where["output_index"], "item": msg}),
        ]

    def turn(self) -> ChatTurn:
        return ChatTurn("assistant", "".join(self.text_parts), tuple(self.calls))

    def response(self, status: str | None = None) -> dict[str, Any]:
        b, done = self.body, self.done
        incomplete = done is not None and done.finish_reason == "length"
        if status is None:
            status = "incomplete" if incomplete else "completed"
        fmt = (b.get("text") or {}).get("format") if isinstance(b.get("text"), dict) else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": self.items,
            "usage": None if done is None else {
                "input_tokens": done.prompt_tokens,
                "input_tokens_details": {"cached_tokens": done.cached_tokens},
                "output_tokens": done.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": done.prompt_tokens + done.completion_tokens,
            },
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": b.get("instructions"), "previous_response_id": self.previous,
            "max_output_tokens": b.get("max_output_tokens"), "metadata": b.get("metadata") or {},
            "parallel_tool_calls": b.get("parallel_tool_calls", True),
            "temperature": b.get("temperature"), "top_p": b.get("top_p"),
            "tool_choice": b.get("tool_choice", "auto"), "tools": b.get("tools") or [],
            "text": {"format": fmt or {"type": "text"}}, "store": b.get("store", True) is not False,
            "truncation": "disabled", "reasoning": None, "user": None,
        }


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


async def _stream(call: Any, shape: _Shape, remember: Any) -> AsyncIterator[bytes]:
    seq = 0

    def emit(kind: str, payload: Mapping[str, Any]) -> bytes:
        nonlocal seq
        data = {"type": kind, "sequence_number": seq, **payload}
        seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + dumps(data) + b"\n\n"

    try:
        yield emit("response.created", {"response": shape.response("in_progress")})
        yield emit("response.in_progress", {"response": shape.response("in_progress")})
        try:
            async for event in call.events():
                if event is None:  # nothing for a while (a long prompt, a wait for a slot)
                    yield b": keep-alive\n\n"
                    continue
                if isinstance(event, Started):
                    continue
                chunks = [emit(k, p) for k, p in shape.add(event)]
                if isinstance(event, Completed):
                    remember(shape.turn())
                    final = shape.response()
                    chunks.append(emit(f"response.{final['status']}", {"response": final}))
                if chunks:
                    yield b"".join(chunks)
        except CallError as error:  # after the 200: OpenAI's in-band error event, then failed
            yield emit("error", {"code": error.code, "message": error.message, "param": error.param})
            failed = shape.response("failed")
            failed["error"] = {"code": error.code or "server_error", "message": error.message}
            yield emit("response.failed", {"response": failed})
    finally:
        call.close()
