"""Carry engine events (made on the engine thread) to asyncio handlers, one wake-up per step.

Waking the event loop once per token per stream would cost a self-pipe write each; instead
every stream touched in an engine step is woken by a single `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Sequence

from lmlink.engine.types import Event


class EventQueue:
    """One request's events; filled by the engine thread, drained by one asyncio task."""

    def __init__(self, hub: "StreamHub") -> None:
        self._hub = hub
        self._items: deque[Event] = deque()
        self._ready = asyncio.Event()

    def deliver(self, events: Sequence[Event]) -> None:
        self._items.extend(events)
        self._hub._mark(self)

    def _wake(self) -> None:
        self._ready.set()

    async def drain(self) -> list[Event]:
        """Everything that arrived since the last call; waits if nothing has."""
        while not self._items:
            self._ready.clear()
            if self._items:
                break
            await self._ready.wait()
        items = list(self._items)
        for _ in range(len(items)):
            self._items.popleft()
        return items


class StreamHub:
    """Creates `EventQueue`s for one event loop; register `on_step` as an engine step listener."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._dirty: list[EventQueue] = []

    def open(self) -> EventQueue:
        return EventQueue(self)

    def _mark(self, queue: EventQueue) -> None:
        with self._lock:
            self._dirty.append(queue)

    def on_step(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, []
        if dirty:
            try:
                self._loop.call_soon_threadsafe(_wake_all, dirty)
            except RuntimeError:  # loop closed during shutdown: nobody is listening any more
                pass


def _wake_all(queues: list[EventQueue]) -> None:
    for q in queues:
        q._wake()
