"""Constrained decoding: a per-request token mask from an llguidance grammar, inside the batch.

Why llguidance (measured with bench/constrained_bench.py on a 2-core EPYC VM, no GPU): it
compiles a JSON schema in ~1 ms and computes a mask in ~35 us (2k vocabulary) / ~260 us
(SmolLM2's 49k vocabulary) per token, and enforces numeric bounds. outlines-core took
~540 ms to compile the same schema on the 49k vocabulary, ~490 us per mask, and its regex
ignores `minimum`/`maximum`; xgrammar cannot be imported without torch and triton.

The grammar travels as JSON text in `SamplingOptions.grammar` (so cluster ranks build the same
mask); `make_grammar_processor` turns it into an mlx-lm logits processor.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import replace
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from .types import GenerationRequest, InvalidRequest, ResponseFormat, ToolSpec

# Compact JSON: flexible whitespace lets a small model pad forever instead of answering.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_CHARS = 256 * 1024
_lock = threading.Lock()


def _llg() -> Any:
    import llguidance

    return llguidance


def llg_tokenizer(tokenizer: Any) -> Any:
    """The llguidance view of a model's tokenizer (~0.6 s for 49k tokens: built once).

    A tokenizer llguidance cannot wrap (a slow, non-Rust one) makes every constrained request
    an InvalidRequest saying so; the failure is remembered like a success.
    """
    with _lock:
        cached = getattr(tokenizer, "_lmlink_llg", None)
        if cached is None:
            from llguidance.hf import from_tokenizer

            hf = getattr(tokenizer, "_tokenizer", tokenizer)
            try:
                eos = sorted(set(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id]))
                cached = from_tokenizer(hf, eos_token=eos if len(eos) > 1 else eos[0])
            except Exception as exc:  # what llguidance raises varies (ValueError, RuntimeError)
                cached = InvalidRequest(
                    f"constrained decoding (response formats, forced tool calls) is not available "
                    f"for this model's tokenizer: {exc}"
                )
            try:
                tokenizer._lmlink_llg = cached
            except AttributeError:  # pragma: no cover - a tokenizer that refuses attributes
                pass
    if isinstance(cached, InvalidRequest):
        raise cached
    return cached


def parse_schema(text: str, what: str) -> Any:
    try:
        schema = json.loads(text) if text else {"type": "object"}
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequest(f"{what} must be a JSON Schema object")
    return schema


def _schema_grammar(schema: Any) -> str:
    llg = _llg()
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    except ValueError as exc:
        raise InvalidRequest(f"invalid JSON schema: {exc}") from None


def _tool_call_schema(tool: ToolSpec) -> dict[str, Any]:
    params = parse_schema(tool.parameters, f"parameters of tool {tool.name!r}")
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_call_grammar(tools: tuple[ToolSpec, ...], start: str, end: str) -> str:
    """One `<tool_call>{"name": ..., "arguments": ...}</tool_call>` block for one of `tools`."""
    llg = _llg()
    schemas = [_tool_call_schema(t) for t in tools]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    schema = {**schema, "x-guidance": _JSON_OPTIONS}
    lark = (
        f"start: {json.dumps(start + chr(10))} call {json.dumps(chr(10) + end)}\n"
        f"call: %json {json.dumps(schema)}\n"
    )
    return llg.LLMatcher.grammar_from_lark(lark)


def format_grammar(fmt: ResponseFormat) -> str:
    llg = _llg()
    if fmt.kind == "json_object":
        return _schema_grammar({"type": "object"})
    if fmt.kind == "json_schema":
        return _schema_grammar(parse_schema(fmt.spec, "json_schema.schema"))
    if fmt.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(fmt.spec)
    if fmt.kind == "lark":
        return llg.LLMatcher.grammar_from_lark(fmt.spec)
    raise InvalidRequest(
        f"response_format type {fmt.kind!r} is not supported; use json_object, json_schema, "
        "regex or lark"
    )


def check_grammar(grammar: str, tokenizer: Any) -> None:
    """Refuse what the library cannot enforce, naming it (e.g. `Unimplemented keys: ["not"]`)."""
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"the output constraint is larger than {MAX_GRAMMAR_CHARS} characters")
    is_error, messages = _llg().LLMatcher.validate_grammar_with_warnings(
        grammar, llg_tokenizer(tokenizer)
    )
    if is_error:
        raise InvalidRequest(f"cannot enforce this output constraint: {messages[0].strip()}")


def request_grammar(request: GenerationRequest, tokenizer: Any, tool_format: Any) -> str | None:
    """The grammar this request's output must follow, or None.

    A forced tool choice (required / a named function) wins: the output is then exactly one
    tool call. Otherwise a response format constrains the text.
    """
    choice = request.tool_choice
    if request.tools and (choice == "required" or choice.startswith("function:")):
        tools = request.tools
        if choice.startswith("function:"):
            name = choice.split(":", 1)[1]
            tools = tuple(t for t in request.tools if t.name == name)
        if tool_format is None or not tool_format.json_calls:
            raise InvalidRequest(
                "a required or named tool_choice is enforced only for models that call tools "
                "with JSON in <tool_call> tags (Qwen, Hermes, SmolLM, ChatML); use auto"
            )
        return tool_call_grammar(tools, tool_format.start, tool_format.end)
    if request.response_format is not None:
        return format_grammar(request.response_format)
    return None


def with_constraint(request: GenerationRequest, tokenizer: Any, tool_format: Any) -> GenerationRequest:
    """The request with its grammar compiled into `sampling.grammar` (checked, or refused)."""
    grammar = request_grammar(request, tokenizer, tool_format)
    if grammar is None:
        return request
    check_grammar(grammar, tokenizer)
    return replace(request, sampling=replace(request.sampling, grammar=grammar))


class GrammarProcessor:
    """mlx-lm logits processor: masks every token the grammar does not allow next.

    The first call sees the last prompt token; each later call first feeds the token sampled
    in the previous step to the matcher. Once the grammar is complete, only end-of-sequence
    tokens remain allowed.
    """

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        llg = _llg()
        from llguidance.numpy import allocate_token_bitmask

        self._llt = llg_tokenizer(tokenizer)
        self._matcher = llg.LLMatcher(self._llt, grammar)
        self._mask = allocate_token_bitmask(1, self._llt.vocab_size)
        self._eos = sorted(set(getattr(tokenizer, "eos_token_ids", None) or ()))
        self._first = True

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        from llguidance.numpy import fill_next_token_bitmask

        m = self._matcher
        if self._first:
            self._first = False
        else:
            m.consume_token(int(tokens[-1].item()))
        vocab = logits.shape[-1]
        if m.is_error() or m.is_stopped():
            allowed = np.zeros(vocab, dtype=bool)
            allowed[[t for t in self._eos if t < vocab]] = True
        else:
            fill_next_token_bitmask(m, self._mask, 0)
            bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")
            allowed = np.zeros(vocab, dtype=bool)
            n = min(vocab, bits.size, self._llt.vocab_size)
            allowed[:n] = bits[:n].astype(bool)
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))


def make_grammar_processor(
    grammar: str | None, tokenizer: Any
) -> list[Callable[[mx.array, mx.array], mx.array]]:
    return [] if grammar is None else [GrammarProcessor(tokenizer, grammar)]


@functools.lru_cache(maxsize=1)
def library_version() -> str:
    return getattr(_llg(), "__version__", "?")


def warm_up(tokenizer: Any) -> None:
    """Build the llguidance tokenizer in the background (~0.6 s for 49k tokens, more for 150k),
    so the first constrained request does not stall its caller (an event loop, often)."""

    def build() -> None:
        try:
            llg_tokenizer(tokenizer)
        except InvalidRequest:  # constrained requests will say so
            pass

    threading.Thread(target=build, name="lmlink-llg-warmup", daemon=True).start()
