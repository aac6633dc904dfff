"""Stop strings on streamed text: never emit text that a stop string may still swallow."""

from __future__ import annotations


class StopStringMatcher:
    """Feeds text pieces; returns what is safe to emit now, and whether a stop string matched.

    Text that could be the beginning of a stop string is held back until the next piece shows
    whether it is, so a client never sees part of a stop string.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self._longest = max((len(s) for s in self._stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        keep = self._held_suffix_length(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Text held back when generation ends for another reason."""
        held, self._held = self._held, ""
        return held

    def _held_suffix_length(self, buf: str) -> int:
        for n in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
