"""What the server is doing right now and did lately, for the status page, `lmlink top` and metrics.

The call core reports three things: a call started, a call ended (with its usage), a call was
refused. Everything else (streams per user, tokens/s over the last minutes, recent refusals)
is derived here, in memory and bounded, so the doors and the engine stay unaware of it.
Prompt text never reaches this module.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque

WINDOW_S = 300  # tokens/s history shown on the status page: the last five minutes
BUCKET_S = 10
RECENT_REFUSALS = 50


@dataclass(frozen=True)
class CallUsage:
    """The figures of one finished call that the views need (engine or client neutral)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    queued_s: float = 0.0


@dataclass
class _Active:
    principal: str
    model: str
    door: str
    started: float


@dataclass
class Telemetry:
    """Bounded in-memory record of calls; thread-safe, cheap enough for every call."""

    clock: Callable[[], float] = time.time
    listeners: list[Any] = field(default_factory=list)  # objects with on_end/on_refusal (metrics)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, _Active] = {}
        self._buckets: Deque[list[float]] = deque()  # [bucket start, completion tokens]
        self._refusals: Deque[dict[str, Any]] = deque(maxlen=RECENT_REFUSALS)
        self._outcomes: Counter[str] = Counter()
        self._started_at = self.clock()
        self._last_sample: tuple[float, int] | None = None

    # -- reports from the call core -------------------------------------------------------
    def call_started(self, call_id: str, principal: str, model: str, door: str) -> None:
        with self._lock:
            self._active[call_id] = _Active(principal, model, door, self.clock())

    def call_ended(self, call_id: str, outcome: str, usage: CallUsage | None = None) -> None:
        with self._lock:
            active = self._active.pop(call_id, None)
            self._outcomes[outcome] += 1
        if active is not None:
            for listener in self.listeners:
                listener.on_end(active.principal, active.model, active.door, outcome, usage)

    def call_refused(self, reason: str, principal: str, model: str, door: str) -> None:
        with self._lock:
            self._outcomes["refused"] += 1
            self._refusals.append({"at": self.clock(), "reason": reason, "principal": principal,
                                   "model": model, "door": door})
        for listener in self.listeners:
            listener.on_refusal(reason, principal, model, door)

    def sample_generated(self, total_tokens: int) -> None:
        """Feed the engines' running total of generated tokens (read when a view is built);
        the tokens since the last sample are spread over the seconds in between."""
        now = self.clock()
        with self._lock:
            last, self._last_sample = self._last_sample, (now, total_tokens)
            if last is None or total_tokens <= last[1] or now <= last[0]:
                return
            start, tokens = max(last[0], now - WINDOW_S), total_tokens - last[1]
            rate = tokens / (now - last[0])
            t = start
            while t < now:
                step = min(BUCKET_S - t % BUCKET_S, now - t)
                self._add_tokens(t, rate * step)
                t += step
            self._expire(now)

    # -- views ----------------------------------------------------------------------------
    def active_by_principal(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(a.principal for a in self._active.values()))

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready view: active streams, tokens/s history, outcomes, recent refusals."""
        now = self.clock()
        with self._lock:
            self._expire(now)
            active = [{"principal": a.principal, "model": a.model, "door": a.door,
                       "seconds": round(now - a.started, 1)} for a in self._active.values()]
            history = [{"at": start, "tokens_per_second": round(tokens / BUCKET_S, 2)}
                       for start, tokens in self._buckets]
            return {
                "uptime_s": round(now - self._started_at, 1),
                "active": sorted(active, key=lambda a: -a["seconds"]),
                "active_by_principal": dict(Counter(a["principal"] for a in active)),
                "tokens_per_second": history,
                "outcomes": dict(self._outcomes),
                "recent_refusals": list(reversed(self._refusals)),
            }

    # -- internals ------------------------------------------------------------------------
    def _add_tokens(self, at: float, n: float) -> None:
        start = at - at % BUCKET_S
        if not self._buckets or self._buckets[-1][0] != start:
            self._buckets.append([start, 0.0])
        self._buckets[-1][1] += n

    def _expire(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] < now - WINDOW_S:
            self._buckets.popleft()
