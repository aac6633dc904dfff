"""Who is calling: the one identity type every listener produces and every check reads.

Listeners establish identity (loopback in local mode, LocalAPI WhoIs on a tailnet,
a bearer token on the HTTP bridge); the API layer only ever sees an `Identity`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

IdentitySource = Literal["loopback", "tailnet", "token"]


@dataclass(frozen=True)
class Identity:
    """A caller as the listener established it; immutable so it can be shared across tasks."""

    login_name: str
    source: IdentitySource
    display_name: str = ""
    node_name: str = ""
    tags: tuple[str, ...] = ()
    # App capabilities granted by the tailnet policy: capability name -> list of JSON values.
    capabilities: dict[str, list[Any]] = field(default_factory=dict, hash=False, compare=False)
    addresses: tuple[str, ...] = ()
    is_owner: bool = False

    @property
    def label(self) -> str:
        """Short human-readable form for logs and status lines (never contains secrets)."""
        who = self.login_name or self.node_name or "unknown"
        return f"{who} ({self.source})"


def loopback_owner() -> Identity:
    """The identity of any local-mode caller: only this machine can reach a loopback listener."""
    return Identity(login_name="local", display_name="Local user", source="loopback", is_owner=True)
