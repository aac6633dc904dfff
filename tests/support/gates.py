"""Gates for in-process tests: who the caller is and what they may do, without a tailnet."""

from __future__ import annotations

from typing import Any

from lmlink.access.identity import Identity
from lmlink.api.gate import LoopbackGate, Verdict


class DenyGate(LoopbackGate):
    """Loopback callers are identified, then refused everything."""

    def check(self, identity: Identity, action: str, model: str = "") -> Verdict:
        return Verdict(False, f"{identity.label} has no grant to {action}")


class PolicyOnlyGate:
    """Nobody is identified by the transport (bearer tokens name callers); the access state's
    policy decides."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def identify(self, peer: str) -> None:
        return None

    def check(self, identity: Identity, action: str, model: str = "") -> Any:
        return self.state.policy.check(identity, action, model or None)
