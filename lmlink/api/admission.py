"""Fair admission to an engine's batch slots, and `Refusal`, why a call may not proceed.

Each engine admits at most `capacity` running streams. A freed slot goes to the waiting caller
holding the fewest (ties: the one waiting longest), so one caller flooding the server cannot
starve another. The waiting queue is bounded, but a caller with nothing running or waiting
always gets a place, so one caller filling it cannot turn everyone else away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from typing import Callable

from .errors import CallError, ErrorKind


class Refusal(CallError):
    """Why a call may not (or no longer) proceed: a CallError with how the audit records it."""

    def __init__(self, kind: str, message: str, *, retry_after: float | None = None,
                 code: str | None = None, outcome: str = "denied") -> None:
        extra = ({"retry_after_seconds": round(retry_after, 3)}
                 if retry_after is not None else None)
        super().__init__(kind, message, retry_after=retry_after, code=code or kind, extra=extra)
        self.outcome = outcome  # how the audit trail records it


class Slots:
    """At most `capacity` running streams per engine; free slots go to the caller holding
    the fewest (ties: the one waiting longest)."""

    def __init__(self, capacity: int, max_waiting: int) -> None:
        self.capacity = max(1, capacity)
        self.max_waiting = max(0, max_waiting)
        self.in_use = 0
        self.running: dict[str, int] = {}
        self.waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def _take(self, principal: str) -> None:
        self.in_use += 1
        self.running[principal] = self.running.get(principal, 0) + 1

    async def acquire(self, principal: str, on_wait: Callable[[asyncio.Future[None]], None]) -> None:
        if self.in_use < self.capacity and not self.waiting:
            self._take(principal)
            return
        idle = principal not in self.running and principal not in self.waiting
        # A caller with nothing running or waiting always gets a place, so one caller filling
        # the queue cannot turn everyone else away (at most one extra place per caller).
        if self.queued >= self.max_waiting and not idle:
            raise Refusal(ErrorKind.OVERLOADED,
                          f"{self.queued} requests are already waiting for this model; retry shortly",
                          retry_after=1.0, code="overloaded", outcome="rate_limited")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(principal, deque()).append(fut)
        on_wait(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(principal)  # granted just as we were cancelled: give it back
            else:
                self._forget(principal, fut)
            raise

    def _forget(self, principal: str, fut: asyncio.Future[None]) -> None:
        q = self.waiting.get(principal)
        if q is not None:
            with contextlib.suppress(ValueError):
                q.remove(fut)
            if not q:
                del self.waiting[principal]

    def reject(self, principal: str, fut: asyncio.Future[None], refusal: Refusal) -> None:
        if not fut.done():
            self._forget(principal, fut)
            fut.set_exception(refusal)

    def release(self, principal: str) -> None:
        self.in_use -= 1
        left = self.running.get(principal, 0) - 1
        if left > 0:
            self.running[principal] = left
        else:
            self.running.pop(principal, None)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.in_use < self.capacity and self.waiting:
            # fewest running first; OrderedDict order (who has waited longest) breaks ties
            principal = min(self.waiting, key=lambda p: self.running.get(p, 0))
            q = self.waiting[principal]
            fut = q.popleft()
            if q:
                self.waiting.move_to_end(principal)
            else:
                del self.waiting[principal]
            if fut.done():
                continue
            self._take(principal)
            fut.set_result(None)
