"""Events a client sees while a generation streams; plain dataclasses, no wire types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

FinishReason = Literal["stop", "length", "cancelled", "tool_calls", "unspecified"]


@dataclass(frozen=True)
class Started:
    request_id: str
    model: str
    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class PromptProgress:
    request_id: str
    processed_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class Logprob:
    token_id: int
    token: str
    logprob: float
    top: tuple["Logprob", ...] = ()
    bytes: bytes = b""  # the token's raw bytes (its text may be a partial UTF-8 sequence)


@dataclass(frozen=True)
class TokenDelta:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[Logprob, ...] = ()


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call the model made (`arguments` is JSON object text)."""

    request_id: str
    id: str
    name: str
    arguments: str
    index: int


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Timings:
    time_to_first_token_ms: float
    total_ms: float
    tokens_per_second: float
    prompt_tokens_per_second: float
    queued_ms: float
    draft_tokens: int = 0  # speculative decoding: drafts verified, kept, ratio, tokens/step
    accepted_draft_tokens: int = 0
    draft_acceptance_rate: float = 0.0
    tokens_per_step: float = 0.0


@dataclass(frozen=True)
class Completed:
    request_id: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


Event = Union[Started, PromptProgress, TokenDelta, ToolCall, Completed]


@dataclass
class Generation:
    """A whole finished generation, for callers that do not need the stream."""

    request_id: str = ""
    model: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    completed: Completed | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, event: Event) -> None:
        if isinstance(event, Started):
            self.request_id, self.model = event.request_id, event.model
        elif isinstance(event, TokenDelta):
            self.text += event.text
            self.token_ids.extend(event.token_ids)
        elif isinstance(event, ToolCall):
            self.tool_calls.append(event)
        elif isinstance(event, Completed):
            self.completed = event

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.completed.finish_reason if self.completed else None
