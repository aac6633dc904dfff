"""Tool calling: tools into the prompt, tool calls out of the streamed text.

The model family decides the format. mlx-lm infers it from the chat template (its
`TokenizerWrapper.tool_call_start` / `tool_call_end` / `tool_parser`); models it knows nothing
about (ChatML, SmolLM, the built-in model) get the Hermes/Qwen form, `<tool_call>{"name": ...,
"arguments": {...}}</tool_call>`. Templates that ignore `tools` get a system-prompt section
describing the tools in that form, and tool turns rendered as `<tool_response>` user turns.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from .types import (
    ChatTurn,
    Completed,
    Event,
    EventSink,
    GenerationRequest,
    InvalidRequest,
    TokenDelta,
    ToolCall,
    ToolCallEvent,
    ToolSpec,
)

MAX_TOOLS = 128


@dataclass(frozen=True)
class ToolFormat:
    start: str
    end: str
    parse: Callable[[str, Any], Any]
    # True when a call is one JSON object {"name", "arguments"} (constrained decoding can force it).
    json_calls: bool


def _json_parse(text: str, tools: Any = None) -> Any:
    return json.loads(text.strip())


HERMES = ToolFormat("<tool_call>", "</tool_call>", _json_parse, True)


def tool_format(tokenizer: Any) -> ToolFormat:
    """The model family's tool-call format (mlx-lm's inference, else Hermes)."""
    if getattr(tokenizer, "has_tool_calling", False):
        parser = tokenizer.tool_parser
        module = getattr(parser, "__module__", "") or ""
        is_json = tokenizer.tool_call_start == "<tool_call>" and module.endswith("json_tools")
        return ToolFormat(tokenizer.tool_call_start, tokenizer.tool_call_end, parser, is_json)
    return HERMES


def tool_dicts(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    out = []
    for t in tools:
        try:
            params = json.loads(t.parameters) if t.parameters else {"type": "object"}
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"parameters of tool {t.name!r} is not valid JSON: {exc.msg}") from None
        fn: dict[str, Any] = {"name": t.name, "parameters": params}
        if t.description:
            fn["description"] = t.description
        out.append({"type": "function", "function": fn})
    return out


def check_tools(request: GenerationRequest) -> None:
    names = [t.name for t in request.tools]
    if len(names) > MAX_TOOLS:
        raise InvalidRequest(f"at most {MAX_TOOLS} tools are allowed, got {len(names)}")
    if len(set(names)) != len(names):
        raise InvalidRequest("tool names must be unique")
    for n in names:
        if not n or len(n) > 64 or not all(c.isalnum() or c in "_-." for c in n):
            raise InvalidRequest(f"tool name {n!r} must be 1-64 letters, digits, _ - or .")
    choice = request.tool_choice
    if choice.startswith("function:"):
        name = choice.split(":", 1)[1]
        if name not in names:
            raise InvalidRequest(f"tool_choice names function {name!r}, which is not in tools")
    elif choice not in ("auto", "none", "required"):
        raise InvalidRequest(f"tool_choice {choice!r} is not auto, none, required or a function")
    if choice == "required" and not names:
        raise InvalidRequest("tool_choice is required but no tools were given")


def _call_dict(c: ToolCall) -> dict[str, Any]:
    try:
        args: Any = json.loads(c.arguments) if c.arguments else {}
    except json.JSONDecodeError:
        args = c.arguments
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": args}}


def _native_message(t: ChatTurn) -> dict[str, Any]:
    m: dict[str, Any] = {"role": t.role, "content": t.content}
    if t.tool_calls:
        m["tool_calls"] = [_call_dict(c) for c in t.tool_calls]
    if t.role == "tool":
        if t.tool_call_id:
            m["tool_call_id"] = t.tool_call_id
        if t.name:
            m["name"] = t.name
    return m


def _fallback_messages(
    turns: Sequence[ChatTurn], tools: list[dict[str, Any]], fmt: ToolFormat
) -> list[dict[str, Any]]:
    """Hermes-style rendering for templates without tools support."""
    out: list[dict[str, Any]] = []
    for t in turns:
        if t.role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{t.content}\n</tool_response>"})
        elif t.tool_calls:
            calls = "".join(
                f"{fmt.start}\n"
                + json.dumps({"name": c.name, "arguments": _call_dict(c)["function"]["arguments"]})
                + f"\n{fmt.end}"
                for c in t.tool_calls
            )
            out.append({"role": t.role, "content": (t.content + "\n" if t.content else "") + calls})
        else:
            out.append({"role": t.role, "content": t.content})
    if tools:
        section = (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            + "\n".join(json.dumps(t) for t in tools)
            + "\n</tools>\n\nFor each function call, return a json object with function name and "
            f"arguments within {fmt.start}{fmt.end} XML tags:\n{fmt.start}\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n' + fmt.end
        )
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def render_chat(tokenizer: Any, request: GenerationRequest) -> str:
    """The prompt text for a chat request, tools included in the way the template allows."""
    turns = request.messages or ()
    tools = tool_dicts(request.tools) if request.tool_choice != "none" else []
    uses_tools = bool(tools) or any(t.role == "tool" or t.tool_calls for t in turns)

    def apply(messages: list[dict[str, Any]], tool_list: list[dict[str, Any]] | None) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages, tools=tool_list, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja2 errors, raise_exception() in the template, bad types
            first = (str(exc).splitlines() or [""])[0][:160]  # one short line, never the prompt
            raise InvalidRequest(
                f"the model's chat template rejected the messages: {type(exc).__name__}: {first}"
            ) from None

    if not uses_tools:
        return apply([{"role": t.role, "content": t.content} for t in turns], None)
    native = [_native_message(t) for t in turns]
    probe = [{"role": "user", "content": "x"}]
    template_has_tools = apply(probe, tool_dicts([ToolSpec("probe_tool")])) != apply(probe, None)
    if template_has_tools:
        return apply(native, tools or None)
    return apply(_fallback_messages(turns, tools, tool_format(tokenizer)), None)


def _normalize(parsed: Any) -> list[tuple[str, str]]:
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError("not a tool call")
        args = item.get("arguments", item.get("parameters", {}))
        calls.append((item["name"], args if isinstance(args, str) else json.dumps(args)))
    return calls


class ToolCallSink:
    """Wraps a request's sink: text between the family's call tags becomes ToolCallEvents.

    Text that may be the start of a call tag is held back until the next piece decides it,
    so a client never sees half a tag. A block that does not parse is sent as text.
    """

    def __init__(self, inner: EventSink, fmt: ToolFormat, tools: tuple[ToolSpec, ...]) -> None:
        self._inner = inner
        self._fmt = fmt
        self._tools = tool_dicts(tools)
        self._held = ""
        self._call: str | None = None  # text inside an open call block
        self._calls = 0

    @classmethod
    def wrap(cls, tokenizer: Any, request: GenerationRequest, sink: EventSink) -> EventSink:
        if not request.tools or request.tool_choice == "none" or request.messages is None:
            return sink
        return cls(sink, tool_format(tokenizer), request.tools)

    def deliver(self, events: Sequence[Event]) -> None:
        out: list[Event] = []
        for ev in events:
            if isinstance(ev, TokenDelta):
                text, calls = self._feed(ev.text)
                out.append(replace(ev, text=text))
                out.extend(calls)
            elif isinstance(ev, Completed):
                text, calls = self._flush()
                if text:
                    out.append(TokenDelta(text, []))
                out.extend(calls)
                if self._calls and ev.finish_reason == "stop":
                    ev = replace(ev, finish_reason="tool_calls")
                out.append(ev)
            else:
                out.append(ev)
        self._inner.deliver(out)

    def _feed(self, piece: str) -> tuple[str, list[Event]]:
        start, end = self._fmt.start, self._fmt.end
        buf = self._held + piece
        self._held = ""
        text, events = "", []
        while buf:
            if self._call is None:
                i = buf.find(start)
                if i < 0:
                    keep = _partial_suffix(buf, start)
                    text += buf[: len(buf) - keep]
                    self._held = buf[len(buf) - keep :]
                    break
                text += buf[:i]
                self._call, buf = "", buf[i + len(start) :]
            else:
                self._call += buf
                buf = ""
                j = self._call.find(end)
                if j < 0:
                    break
                body, buf = self._call[:j], self._call[j + len(end) :]
                self._call = None
                made = self._parse(body)
                if made is None:
                    text += start + body + end
                else:
                    events.extend(made)
        return text, events

    def _flush(self) -> tuple[str, list[Event]]:
        text, self._held = self._held, ""
        if self._call is not None:  # no end tag before the end: parse what there is
            body, self._call = self._call, None
            made = self._parse(body)
            if made is None:
                return text + self._fmt.start + body, []
            return text, list(made)
        return text, []

    def _parse(self, body: str) -> list[Event] | None:
        try:
            calls = _normalize(self._fmt.parse(body, self._tools))
        except Exception:  # any parser failure means "this was not a call": keep it as text
            return None
        events: list[Event] = []
        for name, args in calls:
            events.append(ToolCallEvent(ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, args, self._calls)))
            self._calls += 1
        return events


def _partial_suffix(buf: str, tag: str) -> int:
    for n in range(min(len(buf), len(tag) - 1), 0, -1):
        if tag.startswith(buf[-n:]):
            return n
    return 0


def prepare_request(tokenizer: Any, request: GenerationRequest) -> GenerationRequest:
    """Check tools and tool choice, and compile the request's output constraint (if any)."""
    from .constrained import with_constraint

    if request.tools or request.tool_choice != "auto":
        check_tools(request)
    return with_constraint(request, tokenizer, tool_format(tokenizer))
