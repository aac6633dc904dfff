"""Short conversations for callers that cannot keep history themselves (the iOS Shortcut).

An OpenAI client sends the whole conversation every time; a Shortcut sends one question. To
make "ask a follow-up" work, the bridge keeps the last few turns per (caller, conversation id),
in memory only, bounded three ways: turns per conversation, characters per conversation, and
number of conversations (least recently used goes first), and forgotten after an idle period.
Keys include the caller's identity, so one caller can never continue another's conversation
by guessing its id.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from lmlink.engine.types import ChatTurn

Key = tuple[str, str]  # (caller key, conversation id)


@dataclass
class _Conversation:
    turns: list[ChatTurn] = field(default_factory=list)
    touched: float = 0.0


class ConversationStore:
    """Bounded, expiring chat histories; safe to call from any thread."""

    def __init__(
        self,
        *,
        max_conversations: int = 1024,
        max_turns: int = 16,
        max_chars: int = 16_000,
        ttl_seconds: float = 15 * 60,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_conversations = max_conversations
        self.max_turns = max_turns
        self.max_chars = max_chars
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._items: OrderedDict[Key, _Conversation] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(9)

    def history(self, key: Key) -> list[ChatTurn]:
        """The remembered turns (oldest first); empty for an unknown or expired conversation."""
        with self._lock:
            self._expire()
            conv = self._items.get(key)
            return list(conv.turns) if conv else []

    def forget(self, key: Key) -> None:
        with self._lock:
            self._items.pop(key, None)

    def append(self, key: Key, *turns: ChatTurn) -> None:
        """Add turns, then trim oldest turns (in user/assistant pairs) to the bounds."""
        with self._lock:
            self._expire()
            conv = self._items.pop(key, None) or _Conversation()
            conv.turns.extend(turns)
            conv.touched = self._clock()
            while len(conv.turns) > 1 and (
                len(conv.turns) > self.max_turns
                or sum(len(t.content) for t in conv.turns) > self.max_chars
            ):
                del conv.turns[: 2 if len(conv.turns) > 2 else 1]
            self._items[key] = conv  # most recently used last
            while len(self._items) > self.max_conversations:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl_seconds
        while self._items:
            key, oldest = next(iter(self._items.items()))
            if oldest.touched > cutoff:
                break
            del self._items[key]
