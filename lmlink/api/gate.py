"""The access seam the API enforces: who is calling, and may they do this?

The API layer never decides policy itself; a `Gate` built by the server from the listen mode
(loopback in local mode, tailnet WhoIs plus grants otherwise) answers both questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from lmlink.access.identity import Identity, loopback_owner

Action = str  # "generate", "list", "info", "cancel", "admin"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""


class Gate(Protocol):
    def identify(self, peer: str) -> Identity | None:
        """Identity for a transport peer (grpc `context.peer()` form), or None to refuse."""
        ...

    def check(self, identity: Identity, action: Action, model: str = "") -> Verdict: ...


def is_loopback_peer(peer: str) -> bool:
    """True for grpc peer strings of loopback TCP or unix-socket connections."""
    return peer.startswith(("ipv4:127.", "ipv6:[::1]", "ipv6:%5B::1%5D", "unix:"))


class LoopbackGate:
    """Local mode: only this machine can reach the listener, and its user owns the server."""

    def identify(self, peer: str) -> Identity | None:
        return loopback_owner() if is_loopback_peer(peer) else None

    def check(self, identity: Identity, action: Action, model: str = "") -> Verdict:
        if identity.is_owner:
            return Verdict(True)
        return Verdict(False, f"{identity.label} is not allowed to {action}")
