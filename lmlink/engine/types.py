"""Engine vocabulary: requests in, events out, errors. No network, no wire types."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]
ChatRole = Literal["system", "user", "assistant", "tool"]
CHAT_ROLES: frozenset[str] = frozenset({"system", "user", "assistant", "tool"})
MAX_TOP_LOGPROBS = 20


class EngineError(Exception):
    """Base of errors the engine reports to callers as an expected failure (no traceback).

    `kind` names the failure in the API's one error vocabulary (lmlink.api.errors.ErrorKind);
    the engine knows no wire codes, only these names.
    """

    kind = "internal"


class InvalidRequest(EngineError):
    """The request can never succeed as written (bad parameters, too long for the context)."""

    kind = "invalid_argument"


class ModelNotFound(EngineError):
    """No served model has this name."""

    kind = "not_found"


class Overloaded(EngineError):
    """The waiting queue is full; the caller should retry later."""

    kind = "overloaded"


class EngineStopped(EngineError):
    """The engine is shutting down or its worker died."""

    kind = "unavailable"


class DuplicateRequestId(EngineError):
    """Another running request already uses this request id."""

    kind = "already_exists"


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: `arguments` is JSON object text."""

    id: str
    name: str
    arguments: str
    index: int = 0


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call; `parameters` is a JSON Schema text ("" = any object)."""

    name: str
    description: str = ""
    parameters: str = ""


@dataclass(frozen=True)
class ResponseFormat:
    """An output constraint: kind is json_object | json_schema | regex | lark."""

    kind: str
    spec: str = ""
    name: str = ""


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling knobs; validated by `validate()` so every entry point gets the same messages."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    # An llguidance grammar (JSON text) every token must follow; made by
    # `constrained.constrain` from the request's response format or tool choice.
    grammar: str | None = None
    # None = no logprobs; otherwise how many alternatives to report per token (0..20).
    logprobs: int | None = None
    # Speculative decoding for this request: None = the server's default (`--speculate`).
    speculate: bool | None = None

    def validate(self, vocab_size: int | None = None) -> None:
        """Refuse values that could fail later inside the shared batch step.

        `vocab_size` (the model's logits width) bounds `top_k`: the sampler cannot take the
        top k of fewer than k tokens, and that error would otherwise surface mid-step.
        """

        def integer(name: str, value: object) -> None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest(f"{name} must be an integer, got {value!r}")

        def finite(name: str, value: float) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequest(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a finite number, got {value}")

        finite("temperature", self.temperature)
        finite("top_p", self.top_p)
        finite("min_p", self.min_p)
        if self.temperature < 0 or self.temperature > 100:
            raise InvalidRequest(f"temperature must be between 0 and 100, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise InvalidRequest(f"min_p must be in [0, 1), got {self.min_p}")
        integer("top_k", self.top_k)
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        if vocab_size is not None and self.top_k >= vocab_size:
            raise InvalidRequest(
                f"top_k must be less than the model's vocabulary size ({vocab_size}), "
                f"got {self.top_k}; use 0 for no top-k filtering"
            )
        if self.max_tokens is not None:
            integer("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None:
            integer("seed", self.seed)
            if not 0 <= self.seed < 1 << 64:
                raise InvalidRequest(f"seed must be in [0, 2**64), got {self.seed}")
        if self.repetition_penalty is not None:
            finite("repetition_penalty", self.repetition_penalty)
            if not 0 < self.repetition_penalty <= 100:
                raise InvalidRequest(
                    f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}"
                )
        if len(self.stop) > 16:
            raise InvalidRequest(f"at most 16 stop strings are allowed, got {len(self.stop)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}"
            )
        for s in self.stop:
            if not s:
                raise InvalidRequest("stop strings must not be empty")
            if len(s) > 256:
                raise InvalidRequest("stop strings must be at most 256 characters")


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: exactly one of `messages` (chat) or `prompt` (raw text) is set."""

    request_id: str
    messages: tuple[ChatTurn, ...] | None = None
    prompt: str | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    # Free-form owner of the request (e.g. an identity label); lets Cancel check ownership.
    owner: str = ""
    tools: tuple[ToolSpec, ...] = ()
    # "auto", "none", "required", or "function:<name>" (that function must be called).
    tool_choice: str = "auto"
    response_format: ResponseFormat | None = None
    # The caller's limit on prompt tokens (a grant's max_prompt_tokens); None: only the context.
    max_prompt_tokens: int | None = None


@dataclass(frozen=True)
class Started:
    model: str
    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class PromptProgress:
    processed_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float
    bytes: bytes = b""


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    bytes: bytes = b""
    top: tuple[TopLogprob, ...] = ()


@dataclass
class TokenDelta:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class ToolCallEvent:
    """A complete tool call parsed from the output; its text is not sent as a delta."""

    call: ToolCall


@dataclass(frozen=True)
class Completed:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    time_to_first_token_ms: float
    total_ms: float
    tokens_per_second: float
    prompt_tokens_per_second: float
    queued_ms: float
    # Speculative decoding (zero when the request did not speculate): draft tokens verified,
    # how many were kept, and completion tokens per decode step (the speed-up's upper bound).
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    draft_acceptance_rate: float = 0.0
    tokens_per_step: float = 0.0


@dataclass(frozen=True)
class Failed:
    """The engine could not finish this request (e.g. its worker died)."""

    error: EngineError


Event = Started | PromptProgress | TokenDelta | ToolCallEvent | Completed | Failed


class EventSink(Protocol):
    """Receives a request's events from the engine thread.

    `deliver` is called at most once per engine step per request, with every event that step
    produced, so a consumer can wake its reader once per step rather than once per token.
    It must not block.
    """

    def deliver(self, events: Sequence[Event]) -> None: ...
