"""A policy-backed gate for tailnet listeners: identity from the relay, decisions from Policy.

It fits the API layer's `Gate` protocol (`identify(peer)`, `check(identity, action, model)`)
without importing it: `identify` is any callable mapping a grpc peer string to an Identity
(in tailnet modes, `lmlink.net.relay.PeerIdentities`), and `check` returns a
`policy.Decision`, which has the `allowed` and `reason` the servicer reads (plus `limits`).
A connection that did not come through the relay (a local process dialing the private
loopback gRPC port directly) has no identity and is refused, never treated as the owner.
"""

from __future__ import annotations

from typing import Callable, Iterable

from lmlink.access.identity import Identity
from lmlink.access.policy import Decision, Policy


class PolicyGate:
    """identify = who the relay says it is; check = owner or grant, deny by default."""

    def __init__(self, identify: Callable[[str], Identity | None], policy: Policy | None = None):
        self._identify = identify
        self.policy = policy or Policy()

    def identify(self, peer: str) -> Identity | None:
        return self._identify(peer)

    def check(self, identity: Identity, action: str, model: str = "") -> Decision:
        return self.policy.check(identity, action, model or None)

    def visible_models(self, identity: Identity, model_ids: Iterable[str]) -> list[str]:
        return self.policy.visible_models(identity, model_ids)
