"""A loopback TCP forwarder whose connections a test can cut, as a network change would.

`cut()` resets every connection open through it (both sides see the connection die, as when
a phone leaves Wi-Fi); new connections keep working, so a client can reconnect through it.
"""

from __future__ import annotations

import socket
import struct
import threading


class CutProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.connections = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
                self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()

    def cut(self) -> int:
        """Reset every open connection (RST on both sides); returns how many were open."""
        with self._lock:
            sockets, self._open = self._open, []
        for s in sockets:
            try:  # shutdown wakes the pipe threads; linger 0 makes their close a reset
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(sockets) // 2

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()
