"""uvicorn settings for lmlink's HTTP listeners: limits against connection abuse, mTLS, unix peers.

httptools (uvicorn's parser) buffers a request head without any size limit and uvicorn has no
header-read timeout, so one client could send 64 MB of headers or trickle a head forever.
`GuardedHttpTools` caps the head at `MAX_HEAD_BYTES` (431) and closes a connection whose head
is not complete within `HEAD_TIMEOUT` seconds (408). `limit_concurrency` bounds connections
plus running requests (503 beyond), `timeout_keep_alive` closes idle keep-alive connections.

On the inner unix socket (`lmlink.net.inner`) uvicorn reports no client address; the guarded
protocol reports the relay's per-connection socket name instead, so the Gate can map it back
to the caller.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from lmlink.net.inner import unix_peer_path

MAX_HEAD_BYTES = 64 * 1024  # request line + headers
HEAD_TIMEOUT = 10.0  # seconds to deliver a complete request head
LIMIT_CONCURRENCY = 512  # open connections + in-flight requests before 503
KEEP_ALIVE_SECONDS = 5


class GuardedHttpTools(HttpToolsProtocol):
    """HttpToolsProtocol with a head-size cap, a head-read timeout and unix peer names."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout = HEAD_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_open = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.client is None:  # unix socket: name the peer by its bound path
            path = unix_peer_path(transport.get_extra_info("socket"))
            if path:
                self.client = (path, 0)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.parser is None:  # refused already: ignore whatever is still in flight
            return
        if self._head_open:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._head_open and self._head_bytes > self.max_head_bytes and self.parser is not None:
            self._refuse(431, b"Request Header Fields Too Large")

    # parser callbacks (httptools calls these on the protocol object)
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._head_open:  # a pipelined request starts its head here
            self._head_open, self._head_bytes = True, 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._head_open, self._head_bytes = False, 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_open, self._head_bytes = True, 0
        # the next head's timer starts with its first byte (idle time is keep-alive's business)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_open and not self.transport.is_closing():
            self._refuse(408, b"Request Timeout")

    def _refuse(self, status: int, reason: bytes) -> None:
        self._cancel_head_timer()
        body = reason + b"\n"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self.transport.close()
        self.parser = None  # type: ignore[assignment]  # drop what httptools buffered


def uvicorn_options(client_ca: Path | None = None) -> dict[str, Any]:
    """Extra uvicorn.Config kwargs for every lmlink HTTP listener.

    `client_ca`: require a client certificate signed by this CA (`--require-client-cert`),
    exactly like the gRPC port, so an unenrolled device is refused during the TLS handshake.
    """
    opts: dict[str, Any] = {
        "http": GuardedHttpTools,
        "limit_concurrency": LIMIT_CONCURRENCY,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,  # if h11 is ever used instead
    }
    if client_ca is not None:
        opts["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        opts["ssl_ca_certs"] = str(client_ca)
    return opts
