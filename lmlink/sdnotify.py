"""Tell a service manager how `lmlink serve` is doing (systemd's sd_notify protocol).

systemd starts a `Type=notify` unit and waits for READY=1 before ordering dependents after it,
and shows STATUS= lines in `systemctl status`. Outside systemd (no NOTIFY_SOCKET) every call is
a no-op; launchd has no readiness protocol and relies on KeepAlive instead.
"""

from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=serving") to $NOTIFY_SOCKET; False if none."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path or not fields:
        return False
    if path.startswith("@"):  # abstract namespace socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall("\n".join(fields).encode())
        return True
    except OSError:
        return False  # the manager went away; serving goes on regardless


def ready(status: str = "") -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def stopping(status: str = "") -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))
