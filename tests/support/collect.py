"""A blocking EventSink for driving the engine in-process from tests and benchmarks."""

from __future__ import annotations

import queue
from typing import Sequence

from lmlink.engine.types import Completed, Event, Failed, TokenDelta


class CollectingSink:
    """Queues events; `wait()` blocks until the request's final event and returns them all."""

    def __init__(self) -> None:
        self.events: "queue.Queue[Event]" = queue.Queue()

    def deliver(self, events: Sequence[Event]) -> None:
        for e in events:
            self.events.put(e)

    def wait(self, timeout: float = 60.0) -> list[Event]:
        out: list[Event] = []
        while True:
            event = self.events.get(timeout=timeout)
            out.append(event)
            if isinstance(event, (Completed, Failed)):
                return out


def token_ids(events: list[Event]) -> list[int]:
    return [t for e in events if isinstance(e, TokenDelta) for t in e.token_ids]


def text(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenDelta))


def completed(events: list[Event]) -> Completed:
    last = events[-1]
    assert isinstance(last, Completed), f"expected Completed, got {last!r}"
    return last
