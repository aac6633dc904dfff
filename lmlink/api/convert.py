"""Translate between wire messages (lmlink.v1) and engine types; nothing else."""

from __future__ import annotations

from lmlink.engine.types import (
    Completed,
    Event,
    GenerationRequest,
    PromptProgress,
    SamplingOptions,
    Started,
    TokenDelta,
    ToolCallEvent,
)

from .agent_wire import (
    agent_fields_from_wire,
    logprobs_to_wire,
    tool_call_to_wire,
    turn_from_wire,
)
from lmlink.v1 import inference_pb2 as pb

from .errors import CallError, ErrorKind

MAX_REQUEST_ID_LENGTH = 128
_FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
}


def sampling_from_wire(s: pb.SamplingParams) -> SamplingOptions:
    return SamplingOptions(
        temperature=s.temperature if s.HasField("temperature") else 0.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k if s.HasField("top_k") else 0,
        min_p=s.min_p if s.HasField("min_p") else 0.0,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        stop=tuple(s.stop),
        seed=s.seed if s.HasField("seed") else None,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else None,
        ignore_eos=s.ignore_eos,
        speculate=s.speculate if s.HasField("speculate") else None,
    )


def request_from_wire(req: pb.GenerateRequest, owner: str = "") -> GenerationRequest:
    """The engine request for a wire request (CallError INVALID_ARGUMENT if it has none)."""
    if len(req.request_id) > MAX_REQUEST_ID_LENGTH:
        raise CallError(ErrorKind.INVALID_ARGUMENT,
                        f"request_id is longer than {MAX_REQUEST_ID_LENGTH} characters")
    which = req.WhichOneof("input")
    if which is None:
        raise CallError(ErrorKind.INVALID_ARGUMENT,
                        "request has no input: set chat messages or a prompt")
    sampling = sampling_from_wire(req.sampling)
    sampling, agent = agent_fields_from_wire(req, sampling)
    if which == "chat":
        messages = tuple(turn_from_wire(m) for m in req.chat.messages)
        return GenerationRequest(
            req.request_id, messages=messages, sampling=sampling, owner=owner, **agent
        )
    return GenerationRequest(req.request_id, prompt=req.prompt, sampling=sampling, owner=owner, **agent)


def merge_deltas(events: list[Event]) -> list[Event]:
    """Coalesce runs of token deltas into one, so a slow reader gets fewer, larger messages."""
    merged: list[Event] = []
    for ev in events:
        last = merged[-1] if merged else None
        if isinstance(ev, TokenDelta) and isinstance(last, TokenDelta):
            lps = None if last.logprobs is None and ev.logprobs is None else \
                (last.logprobs or []) + (ev.logprobs or [])
            merged[-1] = TokenDelta(last.text + ev.text, last.token_ids + ev.token_ids, lps)
        else:
            merged.append(ev)
    return merged


def event_to_wire(event: Event, request_id: str, index: int = 0) -> pb.GenerateEvent:
    message = _event_to_wire(event, request_id)
    message.index = index
    return message


def _event_to_wire(event: Event, request_id: str) -> pb.GenerateEvent:
    if isinstance(event, TokenDelta):
        delta = pb.TokenDelta(text=event.text, token_ids=event.token_ids)
        if event.logprobs:
            delta.logprobs.extend(logprobs_to_wire(event.logprobs))
        return pb.GenerateEvent(request_id=request_id, delta=delta)
    if isinstance(event, ToolCallEvent):
        return pb.GenerateEvent(request_id=request_id, tool_call=tool_call_to_wire(event.call))
    if isinstance(event, Started):
        return pb.GenerateEvent(
            request_id=request_id,
            started=pb.Started(
                model=event.model,
                prompt_tokens=event.prompt_tokens,
                cached_tokens=event.cached_tokens,
            ),
        )
    if isinstance(event, PromptProgress):
        return pb.GenerateEvent(
            request_id=request_id,
            prompt_progress=pb.PromptProgress(
                processed_tokens=event.processed_tokens, total_tokens=event.total_tokens
            ),
        )
    if isinstance(event, Completed):
        return pb.GenerateEvent(
            request_id=request_id,
            completed=pb.Completed(
                finish_reason=_FINISH[event.finish_reason],
                usage=pb.Usage(
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    cached_tokens=event.cached_tokens,
                ),
                timings=pb.Timings(
                    time_to_first_token_ms=event.time_to_first_token_ms,
                    total_ms=event.total_ms,
                    tokens_per_second=event.tokens_per_second,
                    prompt_tokens_per_second=event.prompt_tokens_per_second,
                    queued_ms=event.queued_ms,
                    draft_tokens=event.draft_tokens,
                    accepted_draft_tokens=event.accepted_draft_tokens,
                    draft_acceptance_rate=event.draft_acceptance_rate,
                    tokens_per_step=event.tokens_per_step,
                ),
            ),
        )
    raise TypeError(f"no wire form for {type(event).__name__}")
