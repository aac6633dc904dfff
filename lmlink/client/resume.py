"""When and how a client picks a dropped stream up again (the server side: lmlink.api.resume).

A stream whose connection fails with UNAVAILABLE from the transport (connection reset,
keepalive timeout, the tunnel gone; not an UNAVAILABLE the server decided, which carries an
error kind) is continued with `Resume(request_id, after=last index received)` on the same
channel, retried with a short backoff while the channel reconnects, for `resume_within`
seconds. Before the first event the same `Resume(after=0)` tells whether the server ever got
the request; NOT_FOUND then means it did not, and the request is sent again (safe: nothing was
generated). Any other error, or a server without Resume (UNIMPLEMENTED), is raised as is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from lmlink import ERROR_KIND_KEY
from lmlink.v1 import inference_pb2 as pb

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


@dataclass
class ResumeState:
    """What a stream needs to continue: its id, the last event number, the retry budget."""

    request: pb.GenerateRequest
    within: float
    last: int = 0
    got_event: bool = False
    finished: bool = False
    _deadline: float | None = None
    _attempt: int = 0
    resumed: int = field(default=0)  # how many times this stream was resumed (for tests/logs)
    resuming: bool = False  # the current call is a Resume that has not delivered yet
    # False where the caller fails over to another server itself (the link) before any event.
    retry_before_first_event: bool = True

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def seen(self, message: pb.GenerateEvent) -> None:
        self.got_event = True
        if message.index:
            self.last = message.index
        if message.WhichOneof("event") == "completed":
            self.finished = True
        self._deadline = None
        self._attempt = 0
        self.resuming = False

    def retry_delay(self, exc: grpc.RpcError) -> float | None:
        """Seconds to wait before resuming; None: give up and raise `exc`."""
        if self.within <= 0 or exc.code() not in RETRYABLE or not self.request_id:
            return None
        if not self.got_event and not self.retry_before_first_event:
            return None
        if _server_said(exc):  # e.g. UNAVAILABLE "shutting down": the server's answer, not a drop
            return None
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.within
        if now >= self._deadline:
            return None
        delay = min(2.0, 0.1 * 2 ** self._attempt)
        self._attempt += 1
        return min(delay, max(0.0, self._deadline - now))

    def resume_request(self) -> pb.ResumeRequest:
        self.resumed += 1
        self.resuming = True
        return pb.ResumeRequest(request_id=self.request_id, after=self.last)

    def regenerate(self, exc: grpc.RpcError) -> bool:
        """After a failed Resume: send the original request again? (nothing arrived, and the
        server says it never had the stream)."""
        if self.resuming and not self.got_event and exc.code() == grpc.StatusCode.NOT_FOUND:
            self.resuming = False
            return True
        return False


def _server_said(exc: grpc.RpcError) -> bool:
    """The error came from lmlink's servicer (it carries an error kind), not the transport."""
    try:
        metadata = exc.trailing_metadata() or ()
    except Exception:
        return False
    return any(key == ERROR_KIND_KEY for key, _ in metadata)
