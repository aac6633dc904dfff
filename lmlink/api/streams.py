"""Carry engine events (made on the engine thread) to asyncio handlers, one wake-up per step.

Waking the event loop once per token per stream would cost a self-pipe write each; instead
every stream touched in an engine step is woken by a single `call_soon_threadsafe`.

Pacing: after a stream has sent text, its next text waits until `pace` seconds have passed,
so tokens that arrive meanwhile leave as one message. A fast model on a tiny batch makes
hundreds of tokens per second, and one gRPC message or SSE event per token costs more CPU than
the model itself; a few milliseconds of pacing removes most of that cost where nobody can see
it. The first token and the final event are never held back.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Sequence

from lmlink.engine.types import Completed, Event, Failed, TokenDelta

DEFAULT_PACE_S = 0.01


class EventQueue:
    """One request's events; filled by the engine thread, drained by one asyncio task."""

    def __init__(self, hub: "StreamHub") -> None:
        self._hub = hub
        self._items: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._last_text_at = 0.0
        # While the reader holds text back, the engine thread skips waking it (read there).
        self._hold_until = 0.0

    def deliver(self, events: Sequence[Event]) -> None:
        self._items.extend(events)
        final = bool(events) and isinstance(events[-1], (Completed, Failed))
        self._hub._mark(self, urgent=final)

    def _wake(self) -> None:
        self._ready.set()

    async def drain(self) -> list[Event]:
        """Everything that arrived since the last call; waits if nothing has."""
        while not self._items:
            self._ready.clear()
            if self._items:
                break
            await self._ready.wait()
        pace = self._hub.pace
        if pace and self._last_text_at and not isinstance(self._items[-1], (Completed, Failed)):
            loop = self._hub.loop
            hold_until = self._last_text_at + pace
            if hold_until > loop.time():
                # Sleep until the pace allows, unless the final event arrives first.
                self._hold_until = hold_until
                self._ready.clear()
                timer = loop.call_at(hold_until, self._ready.set)
                try:
                    await self._ready.wait()
                finally:
                    timer.cancel()
                    self._hold_until = 0.0
        items = list(self._items)
        for _ in range(len(items)):
            self._items.popleft()
        if any(isinstance(e, TokenDelta) for e in items):
            self._last_text_at = self._hub.loop.time()
        return items


class StreamHub:
    """Creates `EventQueue`s for one event loop; register `on_step` as an engine step listener."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, pace: float = DEFAULT_PACE_S) -> None:
        self.loop = loop
        self.pace = pace
        self._lock = threading.Lock()
        self._dirty: list[EventQueue] = []
        self._urgent: set[EventQueue] = set()

    def open(self) -> EventQueue:
        return EventQueue(self)

    def _mark(self, queue: EventQueue, *, urgent: bool = False) -> None:
        with self._lock:
            self._dirty.append(queue)
            if urgent:
                self._urgent.add(queue)

    def on_step(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, []
            urgent, self._urgent = self._urgent, set()
        if self.pace and dirty:
            # A reader holding text back wakes on its own timer; waking it per step would
            # cost the event loop a wake-up per token, which is what pacing saves.
            now = time.monotonic()
            dirty = [q for q in dirty if q in urgent or q._hold_until <= now]
        if dirty:
            try:
                self.loop.call_soon_threadsafe(_wake_all, dirty)
            except RuntimeError:  # loop closed during shutdown: nobody is listening any more
                pass


def _wake_all(queues: list[EventQueue]) -> None:
    for q in queues:
        q._wake()
