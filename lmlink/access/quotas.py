"""Token quotas over sliding windows: how many completion tokens a caller used on a model.

Each window (a minute, a day) is split into 60 buckets; usage "in the last minute" is the
sum of the buckets that started less than a minute ago, so the budget comes back
gradually (a bucket at a time) instead of all at once at a clock boundary, and the time
until a refused caller may retry is exact to one bucket.

The meter lives in memory (checked on every request and every streamed step) and mirrors
the `usage` table, which `lmlink.access.audit` updates in the same transactions as the
per-request audit rows; on start the server loads the buckets still inside a window.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from lmlink.access.policy import Limits


@dataclass(frozen=True)
class Window:
    name: str  # "minute" | "day"
    seconds: float
    buckets: int = 60

    @property
    def bucket_seconds(self) -> float:
        return self.seconds / self.buckets

    def bucket(self, t: float) -> int:
        return math.floor(t / self.bucket_seconds)


# The windows every server enforces. A test harness may scale them (a "minute" of 3 s) to
# show recovery without waiting a real minute; nothing in the product changes them.
WINDOWS: dict[str, Window] = {"minute": Window("minute", 60.0), "day": Window("day", 86400.0)}


def limit_for(limits: Limits, window: str) -> int | None:
    return {"minute": limits.tokens_per_minute, "day": limits.tokens_per_day}[window]


@dataclass(frozen=True)
class OverQuota:
    window: str
    limit: int
    used: int
    retry_after: float  # seconds until a request may succeed again


class UsageMeter:
    """principal x model x window -> {bucket: tokens}, thread-safe."""

    def __init__(self, windows: dict[str, Window] | None = None) -> None:
        self.windows = dict(windows or WINDOWS)
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str, str], dict[int, int]] = defaultdict(dict)

    def load(self, rows: Iterable[tuple[str, str, str, int, int]]) -> None:
        """(principal, model, window, bucket, tokens) rows from the usage table."""
        with self._lock:
            for principal, model, window, bucket, tokens in rows:
                if window in self.windows:
                    b = self._buckets[(principal, model, window)]
                    b[bucket] = b.get(bucket, 0) + tokens

    def add(self, principal: str, model: str, tokens: int, now: float) -> list[tuple[str, int]]:
        """Count `tokens` at time `now`; returns the (window, bucket) keys touched."""
        touched: list[tuple[str, int]] = []
        if tokens <= 0:
            return touched
        with self._lock:
            for w in self.windows.values():
                bucket = w.bucket(now)
                b = self._buckets[(principal, model, w.name)]
                b[bucket] = b.get(bucket, 0) + tokens
                touched.append((w.name, bucket))
        return touched

    def _live(self, principal: str, model: str, w: Window, now: float) -> list[tuple[int, int]]:
        first = w.bucket(now) - w.buckets + 1
        b = self._buckets.get((principal, model, w.name), {})
        return sorted((k, v) for k, v in b.items() if k >= first)

    def used(self, principal: str, model: str, window: str, now: float) -> int:
        w = self.windows[window]
        with self._lock:
            return sum(v for _, v in self._live(principal, model, w, now))

    def over(self, principal: str, model: str, limits: Limits, now: float,
             *, strict: bool = False) -> OverQuota | None:
        """The first window whose budget is used up (used >= limit; > with strict), else None."""
        for w in self.windows.values():
            limit = limit_for(limits, w.name)
            if limit is None:
                continue
            with self._lock:
                live = self._live(principal, model, w, now)
            used = sum(v for _, v in live)
            if used > limit or (used == limit and not strict):
                return OverQuota(w.name, limit, used, self._retry_after(live, limit, w, now))
        return None

    def remaining(self, principal: str, model: str, limits: Limits, now: float) -> int | None:
        """Tokens left before the tightest window's limit (None: no token limit applies)."""
        left: int | None = None
        for w in self.windows.values():
            limit = limit_for(limits, w.name)
            if limit is not None:
                room = max(0, limit - self.used(principal, model, w.name, now))
                left = room if left is None else min(left, room)
        return left

    @staticmethod
    def _retry_after(live: list[tuple[int, int]], limit: int, w: Window, now: float) -> float:
        """Seconds until the buckets that have aged out leave usage below the limit."""
        remaining = sum(v for _, v in live)
        for bucket, tokens in live:  # oldest first
            remaining -= tokens
            if remaining < limit:
                free_at = (bucket + w.buckets) * w.bucket_seconds  # this bucket leaves
                return max(0.0, free_at - now)
        return 0.0

    def prune(self, now: float) -> None:
        with self._lock:
            for (principal, model, window), b in list(self._buckets.items()):
                w = self.windows.get(window)
                if w is None:
                    continue
                first = w.bucket(now) - w.buckets + 1
                for k in [k for k in b if k < first]:
                    del b[k]
                if not b:
                    del self._buckets[(principal, model, window)]
