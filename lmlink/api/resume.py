"""Resumable streams: a streamed answer outlives the connection that asked for it.

Why: a phone walking from Wi-Fi onto cellular, or a laptop whose tunnel blips, drops every
TCP connection while the tailnet itself survives. Without this, the answer is lost and the
model's work (and the caller's quota) wasted. With it, the same caller reconnects within a
grace period and continues after the last event it saw, and nothing is recomputed.

How: every streamed `Generation` is handed to a `ResumeStore`, which runs one pump task per
stream copying its events into a numbered buffer (`Tap`). Doors read the buffer, not the
Generation. Event numbers start at 1 and count every event (Started, PromptProgress, each
step's merged TokenDelta, Completed) -- the same numbers on every door. When the last reader
leaves, the stream is *detached*: it keeps generating into the buffer; after `grace_seconds`
without a reader it expires (the engine request is cancelled, the lease and
its audit row closed). A detached stream keeps its batch slot and counts against the
caller's `max_streams` until it finishes or expires. A stream is kept for the grace period
even after its last event was handed out: the server cannot know whether a dying connection
carried it (on a real tunnel it often had not); finished streams are dropped first when a
limit is reached.

Bounds (memory):
- per stream, `max_buffer_bytes` of event text; events every attached reader has been handed
  are dropped first. A *detached* stream that would exceed it is stopped (engine cancelled,
  slot freed) and a resumer gets what was buffered, then RESOURCE_EXHAUSTED -- stopping is
  the only choice that bounds memory without silently losing text the caller never saw;
- per caller at most `max_detached_per_caller` detached streams, and at most `max_detached`
  in total: detaching one more expires the caller's (or the server's) oldest detached one.

A stream dropped before any text was handed out is cancelled at once, as before: nothing was
generated that resuming would save (the prompt cache keeps the prompt's work), and a client
that hangs up at once holds no slot. (The Python clients send the request again then.)

Who may resume: only the caller who started it (`owner_key`: the whole identity); anyone
else gets the same NOT_FOUND as for an unknown id, so no request id leaks. A stream cancelled
explicitly (Cancel) is forgotten at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator

from lmlink.engine.types import Completed, Event, TokenDelta

from .errors import CallError, ErrorKind

log = logging.getLogger("lmlink.api.resume")


@dataclass(frozen=True)
class ResumeOptions:
    """How long and how much of a dropped stream the server keeps (`lmlink serve --resume-*`)."""

    grace_seconds: float = 60.0  # 0 disables resuming: a dropped stream is cancelled at once
    max_buffer_bytes: int = 1024 * 1024
    max_detached_per_caller: int = 4
    max_detached: int = 64


def _size(event: Event) -> int:
    if isinstance(event, TokenDelta):
        return len(event.text.encode()) + 4 * len(event.token_ids) + 64
    return 64


def unknown(request_id: str) -> CallError:
    return CallError(ErrorKind.NOT_FOUND,
                     f"no resumable stream {request_id!r}: it expired (nobody reconnected "
                     "within the grace period), was cancelled, or was started by another "
                     "caller", param="request_id")


class Tap:
    """One stream's numbered events, fed by its pump task, read by any number of readers."""

    def __init__(self, store: "ResumeStore", gen: Any, owner: str, meta: dict[str, Any]) -> None:
        self.store = store
        self.gen = gen
        self.request_id: str = gen.request_id
        self.owner = owner
        self.meta = meta  # door details a resumer needs (e.g. the HTTP chunk kind)
        self.model: str = gen.model
        self.created: int = gen.created
        self._events: deque[tuple[int, Event]] = deque()
        self._bytes = 0
        self.last = 0  # number of the newest event
        self.error: CallError | None = None  # how it ended, if not with Completed
        self.done = False
        self._stopping = False
        self.delivered = False  # a reader handed out the final event
        self.cancelled = False  # Cancel was asked: never kept for resuming
        self.handed_text = False  # a reader was handed generated text
        self._changed = asyncio.Event()
        self._readers: dict[int, int] = {}  # reader id -> last number handed to it
        self._reader_ids = itertools.count(1)
        self.detached_at: float | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._started = False
        self._pump = asyncio.ensure_future(self._run())
        self._pump.add_done_callback(self._never_ran)

    # ----- the pump ----------------------------------------------------------------------------

    def _never_ran(self, task: asyncio.Future[None]) -> None:
        """Cancelled before its first step (e.g. the client left at once): the Generation
        was never iterated, so close it here (engine request cancelled, lease released)."""
        if not self._started:
            self.gen.close()
            self.done = True
            self.store._ended(self)

    async def _run(self) -> None:
        self._started = True
        try:
            # aclosing: the Generation is closed (engine cancelled, lease released) however
            # this ends, also when it stops early below.
            async with contextlib.aclosing(self.gen.__aiter__()) as events:
                async for event in events:
                    if self._stopping:
                        break  # (a cancellation would land only at the next real wait)
                    self._append(event)
        except CallError as error:
            self.error = error
        except asyncio.CancelledError:
            if self.error is None:
                self.error = CallError(ErrorKind.CANCELLED, "the stream was stopped")
        except Exception as exc:  # never let a pump die silently
            self.error = CallError.of(exc)
        finally:
            self.done = True
            self._changed.set()
            self.store._ended(self)

    def _append(self, event: Event) -> None:
        self.last += 1
        self._events.append((self.last, event))
        self._bytes += _size(event)
        self._changed.set()
        limit = self.store.options.max_buffer_bytes
        if self._bytes > limit:
            handed = min(self._readers.values()) if self._readers else 0
            while self._events and self._bytes > limit and self._events[0][0] <= handed:
                _, old = self._events.popleft()
                self._bytes -= _size(old)
            if self._bytes > limit and not self._readers:
                self.stop(CallError(ErrorKind.RESOURCE_EXHAUSTED,
                                    f"the answer was stopped after {limit} bytes were buffered "
                                    "while no client was attached"))

    def release(self) -> None:
        """The door's response ended. A stream no reader ever attached to (the client left
        before the first chunk) is detached now, so it expires instead of running forever."""
        if not self._readers and self.detached_at is None \
                and self.store._taps.get(self.request_id) is self:
            self.store._on_detach(self)

    def stop(self, error: CallError) -> None:
        """End generation now (engine request cancelled, lease closed); keep the buffer."""
        if not self.done and not self._stopping:
            self.error = error
            self._stopping = True
            self._pump.cancel()

    # ----- readers -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def reader(self, after: int) -> Any:
        """Attach a reader positioned after event `after`; leaving detaches it."""
        self.check(after)
        rid = next(self._reader_ids)
        self._readers[rid] = after
        self.store._on_attach(self)
        try:
            yield _Reader(self, rid)
        finally:
            del self._readers[rid]
            if not self._readers:
                self.store._on_detach(self)

    def check(self, after: int) -> None:
        """INVALID_ARGUMENT unless the events after `after` are all still held."""
        first = self._events[0][0] if self._events else self.last + 1
        if after < first - 1 or after > self.last:
            raise CallError(ErrorKind.INVALID_ARGUMENT,
                            f"cannot resume {self.request_id!r} after event {after}: the server "
                            f"holds events {first}..{self.last}", param="after")

    def _after(self, n: int) -> list[tuple[int, Event]]:
        if not self._events or self._events[-1][0] <= n:
            return []
        start = max(0, n + 1 - self._events[0][0])
        return list(itertools.islice(self._events, start, None))


class _Reader:
    def __init__(self, tap: Tap, rid: int) -> None:
        self.tap = tap
        self.rid = rid

    async def next(self, timeout: float | None = None) -> list[tuple[int, Event]] | None:
        """Numbered events not yet handed to this reader; None after `timeout` with none new;
        [] once the stream has ended and all was handed out (then see `tap.error`)."""
        tap = self.tap
        while True:
            out = tap._after(tap._readers[self.rid])
            if out:
                tap._readers[self.rid] = out[-1][0]
                if not tap.handed_text:
                    tap.handed_text = any(isinstance(e, TokenDelta) for _, e in out)
                if tap.done and out[-1][0] == tap.last and isinstance(out[-1][1], Completed):
                    tap.delivered = True
                return out
            if tap.done:
                tap.delivered = True  # the end (or its error) was handed out
                return []
            tap._changed.clear()
            if timeout is None:
                await tap._changed.wait()
            else:
                try:
                    async with asyncio.timeout(timeout):
                        await tap._changed.wait()
                except TimeoutError:
                    return None

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Every remaining numbered event; raises the stream's CallError if it ended in one."""
        while True:
            batch = await self.next()
            if not batch:
                break
            for item in batch:
                yield item
        if self.tap.error is not None:
            raise self.tap.error


class ResumeStore:
    """Every streamed Generation of one server, by request id, until it expires."""

    def __init__(self, options: ResumeOptions | None = None) -> None:
        self.options = options or ResumeOptions()
        self._taps: dict[str, Tap] = {}
        self._detached: dict[str, Tap] = {}  # insertion order = detach order
        # Why recently dropped streams ended, told only to their owner (bounded).
        self._gone: dict[str, tuple[str, str]] = {}

    def __len__(self) -> int:
        return len(self._taps)

    @property
    def detached(self) -> int:
        return len(self._detached)

    def start(self, gen: Any, owner: str, **meta: Any) -> Tap:
        """Take over `gen` (the store closes it); read it through the returned Tap."""
        old = self._taps.pop(gen.request_id, None)
        if old is not None:  # an ended, undelivered stream under a reused id
            self._forget(old)
        tap = Tap(self, gen, owner, meta)
        self._taps[tap.request_id] = tap
        return tap

    def find(self, request_id: str, owner: str) -> Tap:
        """The caller's stream; NOT_FOUND (the same answer) if unknown or someone else's."""
        tap = self._taps.get(request_id)
        if tap is None or tap.owner != owner:
            gone = self._gone.get(request_id)
            if tap is None and gone is not None and gone[0] == owner:
                raise CallError(ErrorKind.NOT_FOUND, f"stream {request_id!r} {gone[1]}",
                                param="request_id")
            raise unknown(request_id)
        return tap

    def forget(self, request_id: str, owner: str | None = None) -> bool:
        """Cancel: a stream with a reader ends as the engine ends it (finish_reason
        "cancelled") and is not kept when the reader leaves; a detached one is dropped now.
        True if there was one."""
        tap = self._taps.get(request_id)
        if tap is None or (owner is not None and tap.owner != owner):
            return False
        tap.cancelled = True
        if not tap._readers:
            self._forget(tap)
        return True

    def close(self) -> None:
        """Server shutdown: stop every stream."""
        for tap in list(self._taps.values()):
            self._forget(tap)

    # ----- bookkeeping -------------------------------------------------------------------------

    def _forget(self, tap: Tap, why: str = "was cancelled") -> None:
        if why:
            self._gone[tap.request_id] = (tap.owner, why)
            while len(self._gone) > 1024:
                del self._gone[next(iter(self._gone))]
        if self._taps.get(tap.request_id) is tap:
            del self._taps[tap.request_id]
        self._detached.pop(tap.request_id, None)
        if tap._expiry is not None:
            tap._expiry.cancel()
        tap.stop(CallError(ErrorKind.CANCELLED, f"the stream {why}"))

    def _on_attach(self, tap: Tap) -> None:
        if tap.detached_at is not None:
            tap.detached_at = None
            self._detached.pop(tap.request_id, None)
            if tap._expiry is not None:
                tap._expiry.cancel()
                tap._expiry = None

    def _on_detach(self, tap: Tap) -> None:
        # Kept even when the last event was handed out: a reader hands events to a socket,
        # and a connection that died meanwhile never delivered them (seen on a real tunnel).
        if tap.cancelled or self.options.grace_seconds <= 0 or not tap.handed_text:
            self._forget(tap, "was cancelled" if tap.cancelled else
                         "was dropped: resuming is off" if self.options.grace_seconds <= 0 else
                         "was dropped before its first token (send the request again)")
            return
        if self._taps.get(tap.request_id) is not tap:
            return
        tap.detached_at = time.monotonic()
        self._detached[tap.request_id] = tap
        tap._expiry = asyncio.get_running_loop().call_later(
            self.options.grace_seconds, self._expire, tap)
        mine = [t for t in self._detached.values() if t.owner == tap.owner]
        for old in _oldest_first(mine, len(mine) - self.options.max_detached_per_caller):
            log.info("stream %s dropped: the caller left too many streams", old.request_id)
            self._forget(old, "expired: the same caller left more than "
                              f"{self.options.max_detached_per_caller} streams unattended")
        every = list(self._detached.values())
        for old in _oldest_first(every, len(every) - self.options.max_detached):
            log.info("stream %s dropped: too many detached streams", old.request_id)
            self._forget(old, "expired: the server holds too many unattended streams")

    def _expire(self, tap: Tap) -> None:
        if tap.detached_at is not None:
            log.info("stream %s expired after %.0f s without a reader", tap.request_id,
                     self.options.grace_seconds)
            self._forget(tap, f"expired: nobody reconnected within "
                              f"{self.options.grace_seconds:g} s")

    def _ended(self, tap: Tap) -> None:
        if not tap._readers and tap.detached_at is None and tap.delivered:
            self._forget(tap)


def _oldest_first(taps: list[Tap], n: int) -> list[Tap]:
    """The `n` taps to drop: finished ones first (nothing more to lose), oldest first."""
    if n <= 0:
        return []
    return sorted(taps, key=lambda t: (not t.done, t.detached_at or 0.0))[:n]

