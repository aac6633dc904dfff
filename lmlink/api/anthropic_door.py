"""POST /v1/messages (+ /v1/messages/count_tokens): Anthropic's Messages API over the neutral
request, so Claude Code and the `anthropic` SDK can use a remote model
(`ANTHROPIC_BASE_URL=http://127.0.0.1:47472` through `lmlink link`).

Supported: `model`, `max_tokens` (required), `system` (string or text blocks), `messages`
with string content or `text` / `tool_use` / `tool_result` blocks, `tools` (custom tools with
`input_schema`), `tool_choice` (auto / any / tool / none), `stop_sequences`, `temperature`,
`top_p`, `top_k`, `stream` (message_start, content_block_start/delta/stop, ping,
message_delta, message_stop), `x-api-key` accepted as a bearer token.
Ignored (the answer's shape does not change): `metadata`, `cache_control` on any block,
`thinking` (no thinking blocks are produced), `service_tier`, `disable_parallel_tool_use`.
Refused with a 400 naming the field: image / document / other non-text blocks, server tools
(web search, code execution, ...), `mcp_servers`, `container`.
`stop_reason` is end_turn, max_tokens or tool_use (a matched stop sequence reports end_turn).
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

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
    ToolSpec,
)

from .door_common import DoorBackend, bad_request, new_id, sampling, sse, with_api_key
from .errors import CallError
from .http_shell import EventStream, read_body
from .openai_schema import ApiError, parse_json

MAX_BODY = 4 * 1024 * 1024
_REFUSED = ("mcp_servers", "container")
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "cancelled": "end_turn"}


def error_response(error: CallError) -> JSONResponse:
    """Anthropic's error body: {"type": "error", "error": {"type", "message"}}."""
    retry = error.retry_seconds()
    headers = {"retry-after": str(retry)} if retry is not None else {}
    return JSONResponse({"type": "error", "error": {"type": error.kind.anthropic_type,
                                                    "message": error.message}},
                        error.http_status, headers=headers)


def _text_blocks(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of text blocks", where)
    out = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text" or not isinstance(block.get("text"), str):
            raise ApiError(400, f"{where}[{j}] is a {kind!r} block; only text blocks are supported "
                           "here", code="unsupported_parameter", param=where)
        out.append(block["text"])
    return "".join(out)


def parse_messages(raw: Any) -> list[ChatTurn]:
    if not isinstance(raw, list) or not raw:
        raise bad_request("messages must be a non-empty list", "messages")
    turns: list[ChatTurn] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad_request(f"{where} must have role user or assistant", where)
        role, content = m["role"], m.get("content")
        if isinstance(content, str):
            turns.append(ChatTurn(role, content))
            continue
        if not isinstance(content, list):
            raise bad_request(f"{where}.content must be a string or a list of blocks", where)
        texts: list[str] = []
        calls: list[ToolCall] = []
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            at = f"{where}.content[{j}]"
            if kind == "text":
                if not isinstance(block.get("text"), str):
                    raise bad_request(f"{at}.text must be a string", at)
                texts.append(block["text"])
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                    raise bad_request(f"{at} needs a name and an input object", at)
                calls.append(ToolCall(str(block.get("id") or new_id("toolu")), block["name"],
                                      json.dumps(block.get("input", {})), len(calls)))
            elif kind == "tool_result" and role == "user":
                result = block.get("content", "")
                text = _text_blocks(result, f"{at}.content") if result is not None else ""
                if block.get("is_error"):
                    text = f"Error: {text}"
                turns.append(ChatTurn("tool", text, tool_call_id=str(block.get("tool_use_id") or "")))
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue  # earlier reasoning from another model: nothing this one can use
            else:
                raise ApiError(400, f"{at} is a {kind!r} block; supported: text, tool_use "
                               "(assistant), tool_result (user)", code="unsupported_parameter", param=at)
        if texts or calls or role == "assistant":
            turns.append(ChatTurn(role, "".join(texts), tuple(calls)))
    return turns


def parse_tools(raw: Any) -> tuple[ToolSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise bad_request("tools must be a list", "tools")
    out = []
    for i, t in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise bad_request(f"{where} needs a name", where)
        if t.get("type") not in (None, "custom") or "input_schema" not in t:
            raise ApiError(400, f"{where} ({t.get('type') or t['name']}) is a server tool; only "
                           "custom tools with an input_schema are supported",
                           code="unsupported_parameter", param=where)
        schema = t["input_schema"]
        if not isinstance(schema, dict):
            raise bad_request(f"{where}.input_schema must be a JSON Schema object", where)
        schema = {k: v for k, v in schema.items() if k != "cache_control"}
        out.append(ToolSpec(t["name"], str(t.get("description") or ""), json.dumps(schema)))
    return tuple(out)


def parse_tool_choice(raw: Any) -> str:
    if raw is None:
        return "auto"
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "tool" and isinstance(raw.get("name"), str):
        return "function:" + raw["name"]
    mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind or "")
    if mapped is None:
        raise bad_request("tool_choice must be {type: auto | any | none} or {type: tool, name}", "tool_choice")
    return mapped


def parse_request(body: Any, *, need_max_tokens: bool = True) -> tuple[str, GenerationRequest]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for key in _REFUSED:
        if body.get(key):
            raise ApiError(400, f"{key} is not supported", code="unsupported_parameter", param=key)
    if need_max_tokens and body.get("max_tokens") is None:
        raise bad_request("max_tokens is required", "max_tokens")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise bad_request("model must be a string", "model")
    turns = parse_messages(body.get("messages"))
    system = body.get("system")
    if system:
        turns.insert(0, ChatTurn("system", _text_blocks(system, "system")))
    gen = GenerationRequest(
        "", messages=tuple(turns),
        sampling=sampling(body, max_key="max_tokens", stop_key="stop_sequences"),
        tools=parse_tools(body.get("tools")),
        tool_choice=parse_tool_choice(body.get("tool_choice")),
    )
    return model, gen


class AnthropicDoor:
    def __init__(self, backend: DoorBackend) -> None:
        self.backend = backend

    async def _body(self, request: Request) -> Any:
        raw = await read_body(request, MAX_BODY)
        return parse_json(raw)

    async def messages(self, request: Request) -> Response:
        try:
            request = with_api_key(request)
            body = await self._body(request)
            model, gen = parse_request(body)
            call = await self.backend.open(request, model, gen)
        except CallError as error:
            return error_response(error)
        msg = _Message(new_id("msg"), call.model)
        if body.get("stream"):
            return EventStream(_stream(call, msg), on_close=call.close)
        try:
            async for event in call.events():
                msg.add(event)
        except CallError as error:
            return error_response(error)
        finally:
            call.close()
        return JSONResponse(msg.body())

    async def count_tokens(self, request: Request) -> Response:
        """Input tokens of a Messages request: the prompt goes through the normal path with
        max_tokens=1 (same access rules and limits; the prompt cache keeps the work)."""
        try:
            request = with_api_key(request)
            model, gen = parse_request(await self._body(request), need_max_tokens=False)
            from dataclasses import replace

            gen = replace(gen, sampling=replace(gen.sampling, max_tokens=1, temperature=0.0))
            call = await self.backend.open(request, model, gen)
            tokens = None
            try:
                async for event in call.events():
                    if isinstance(event, (Started, Completed)):
                        tokens = event.prompt_tokens
                        break
            finally:
                call.close()
        except CallError as error:
            return error_response(error)
        if tokens is None:
            return error_response(ApiError(502, "the server did not report the prompt size"))
        return JSONResponse({"input_tokens": tokens})


class _Message:
    """The message as it grows: text and tool_use blocks, in order."""

    def __init__(self, mid: str, model: str) -> None:
        self.id, self.model = mid, model
        self.blocks: list[dict[str, Any]] = []
        self.open_text = False
        self.input_tokens = 0
        self.cached = 0
        self.done: Completed | None = None

    def start(self) -> dict[str, Any]:
        return {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0,
                      "cache_read_input_tokens": self.cached, "cache_creation_input_tokens": 0},
        }}

    def add(self, event: Any) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        if isinstance(event, Started):
            self.input_tokens, self.cached = event.prompt_tokens, event.cached_tokens
        elif isinstance(event, TokenDelta) and event.text:
            if not self.open_text:
                self.blocks.append({"type": "text", "text": ""})
                self.open_text = True
                out.append(("content_block_start", {"index": len(self.blocks) - 1,
                                                    "content_block": {"type": "text", "text": ""}}))
            self.blocks[-1]["text"] += event.text
            out.append(("content_block_delta", {"index": len(self.blocks) - 1,
                                                "delta": {"type": "text_delta", "text": event.text}}))
        elif isinstance(event, ToolCallEvent):
            out += self._close_text()
            c = event.call
            try:
                args = json.loads(c.arguments) if c.arguments else {}
            except json.JSONDecodeError:
                args = {}
            block = {"type": "tool_use", "id": "toolu_" + c.id.removeprefix("call_"), "name": c.name, "input": args}
            self.blocks.append(block)
            index = len(self.blocks) - 1
            out.append(("content_block_start", {"index": index, "content_block": {**block, "input": {}}}))
            out.append(("content_block_delta", {"index": index, "delta": {"type": "input_json_delta",
                                                                           "partial_json": c.arguments}}))
            out.append(("content_block_stop", {"index": index}))
        elif isinstance(event, Completed):
            out += self._close_text()
            self.done = event
            self.input_tokens, self.cached = event.prompt_tokens, event.cached_tokens
            out.append(("message_delta", {"delta": {"stop_reason": self.stop_reason(), "stop_sequence": None},
                                          "usage": {"output_tokens": event.completion_tokens}}))
            out.append(("message_stop", {}))
        return out

    def _close_text(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.open_text:
            return []
        self.open_text = False
        return [("content_block_stop", {"index": len(self.blocks) - 1})]

    def stop_reason(self) -> str:
        return _STOP.get(self.done.finish_reason, "end_turn") if self.done else "end_turn"

    def body(self) -> dict[str, Any]:
        done = self.done
        return {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": self.blocks, "stop_reason": self.stop_reason(), "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens,
                      "output_tokens": done.completion_tokens if done else 0,
                      "cache_read_input_tokens": self.cached, "cache_creation_input_tokens": 0},
        }


async def _stream(call: Any, msg: _Message) -> AsyncIterator[bytes]:
    started = False
    try:
        try:
            async for event in call.events():
                if event is None:
                    yield sse("ping", {"type": "ping"})
                    continue
                chunks = []
                parts = msg.add(event)
                if not started and (isinstance(event, Started) or parts):
                    started = True
                    chunks.append(sse("message_start", msg.start()))
                    chunks.append(sse("ping", {"type": "ping"}))
                chunks += [sse(kind, {"type": kind, **payload}) for kind, payload in parts]
                if chunks:
                    yield b"".join(chunks)
        except CallError as error:  # after the 200: Anthropic's in-band error event
            yield sse("error", {"type": "error", "error": {"type": error.kind.anthropic_type,
                                                           "message": error.message}})
    finally:
        call.close()

