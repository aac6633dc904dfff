"""A policy-backed gate for tailnet listeners: identity from the relay, decisions from Policy.

It fits the API layer's `Gate` protocol (`identify(peer)`, `check(identity, action, model)`)
without importing it: `identify` is any callable mapping a grpc peer string to an Identity
(in tailnet modes, `lmlink.net.relay.PeerIdentities`), and `check` returns a
`policy.Decision`, which has the `allowed` and `reason` the servicer reads (plus `limits`).
A connection that did not come through the relay (a local process dialing the private
loopback gRPC port directly) has no identity and is refused, never treated as the owner.

The relay asks WhoIs once per connection, but grants in the tailnet policy can change while a
connection stays open. `refresh(identity)` asks again (through the `refresh` callable the
front door supplies, e.g. LocalAPI WhoIs by the node's address), cached for `refresh_ttl`
seconds per node; the API layer calls it on every new call and periodically for running
streams, so a grant removed from the tailnet policy stops working without a reconnect.
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable, Iterable

from lmlink.access.identity import Identity
from lmlink.access.policy import Decision, Policy

Refresher = Callable[[Identity], Awaitable[Identity | None]]


class PolicyGate:
    """identify = who the relay says it is; check = owner or grant, deny by default."""

    def __init__(
        self,
        identify: Callable[[str], Identity | None],
        policy: Policy | None = None,
        *,
        refresh: Refresher | None = None,
        refresh_ttl: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._identify = identify
        self.policy = policy or Policy()
        self._refresh = refresh
        self.refresh_ttl = refresh_ttl
        self._clock = clock
        self._fresh: dict[tuple[str, ...], tuple[float, Identity | None]] = {}

    def identify(self, peer: str) -> Identity | None:
        return self._identify(peer)

    def check(self, identity: Identity, action: str, model: str = "") -> Decision:
        return self.policy.check(identity, action, model or None)

    def visible_models(self, identity: Identity, model_ids: Iterable[str]) -> list[str]:
        return self.policy.visible_models(identity, model_ids)

    async def refresh(self, identity: Identity) -> Identity | None:
        """The caller as the tailnet sees it now (None: no longer a peer); tailnet callers only."""
        if self._refresh is None or identity.source != "tailnet" or not identity.addresses:
            return identity
        key = identity.addresses
        now = self._clock()
        hit = self._fresh.get(key)
        if hit is not None and now - hit[0] < self.refresh_ttl:
            return hit[1]
        try:
            fresh = await self._refresh(identity)
        except Exception:  # fail closed would cut everyone on a LocalAPI hiccup: keep the last
            return hit[1] if hit is not None else identity
        self._fresh[key] = (now, fresh)
        if len(self._fresh) > 4096:
            self._fresh = {k: v for k, v in self._fresh.items() if now - v[0] < self.refresh_ttl}
        return fresh
