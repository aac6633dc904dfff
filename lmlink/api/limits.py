"""Live enforcement between the doors (gRPC, HTTP) and the engines: who, how much, in what order.

`Guard` is the one object both doors use for a Generate call:

1. `identify(peer, authorization)`: the transport identity (loopback owner, or the tailnet
   peer the relay recorded), re-checked with WhoIs on every call; or, when the call carries
   an lmlink bearer token (`lmk_...`), the identity the token is bound to.
2. `admit(caller, engine, request, via)`: the grant check (tailnet grants united with local
   shares), `max_streams` and the token quotas (RESOURCE_EXHAUSTED / HTTP 429 with the time
   to retry), then a *fair* wait for a batch slot: each engine admits at most
   `max_batch_size` streams, and when a slot frees it goes to the waiting caller holding the
   fewest slots (oldest first among equals), so one caller flooding the server cannot starve
   another: a newcomer gets the very next free slot.
3. The returned `Lease` counts streamed tokens against the quotas (a stream that uses up its
   budget ends with RESOURCE_EXHAUSTED), and is cut with PERMISSION_DENIED when a background
   check finds its access gone: a share revoked or expired, a token revoked, a tailnet grant
   removed (WhoIs re-asked every `tailnet_recheck` seconds). Every call ends as one audit row.

The engines stay network- and identity-agnostic: the guard only calls `submit`/`cancel` via
the doors and reads `config.max_batch_size`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Protocol, Sequence

from lmlink.access.audit import RequestRecord
from lmlink.observe.telemetry import CallUsage, Telemetry
from lmlink.access.identity import Identity
from lmlink.access.policy import UNLIMITED, Limits
from lmlink.access.quotas import OverQuota
from lmlink.access.state import AccessState, principal_of
from lmlink.access.tokens import looks_like_token
from lmlink.engine.types import Completed, Event, GenerationRequest, TokenDelta

from .admission import Refusal, Slots
from .gate import Gate

log = logging.getLogger("lmlink.access")

class BearerVerifier(Protocol):
    """Maps a bearer token to the identity it was issued to (None: unknown). For servers that
    keep no access state; lmlink's own `lmk_` tokens are verified by the access state."""

    def verify(self, token: str) -> Identity | None: ...


@dataclass(frozen=True)
class Caller:
    identity: Identity
    credential: str = ""  # the token id when a bearer token named the caller


def bearer_token(header: str | None) -> str | None:
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{math.ceil(s)} s"


# ----- one call ----------------------------------------------------------------------------


class Lease:
    """One admitted (or waiting) Generate call: counts its tokens, can be cut, ends audited."""

    def __init__(self, guard: Guard, caller: Caller, engine: Any, limits: Limits,
                 rec: RequestRecord) -> None:
        self.guard = guard
        self.caller = caller
        self.identity = caller.identity
        self.engine = engine
        self.model: str = engine.model_id
        self.principal = rec.principal
        self.limits = limits
        self.rec = rec
        self.refusal: Refusal | None = None
        self.state = "waiting"  # -> running -> done
        self._slots: Slots | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._request_id = ""
        self.request: GenerationRequest | None = None  # what to submit (max_tokens within budget)
        self.done: Completed | None = None

    # the doors call these ----------------------------------------------------------------

    def started(self, request_id: str) -> None:
        self._request_id = request_id
        self.rec.request_id = request_id
        if self.refusal is not None:  # cut between admission and submission
            self.engine.cancel(request_id)

    def observe(self, events: Sequence[Event]) -> Refusal | None:
        """Count this step's tokens; the refusal that ends the stream, if any."""
        if self.state == "done":
            return self.refusal
        n = sum(len(e.token_ids) for e in events if isinstance(e, TokenDelta))
        if n:
            self.guard.count(self, n)
        if self.refusal is None and not self.identity.is_owner and not any(
            isinstance(e, Completed) for e in events
        ):
            over = self.guard.access.meter.over(
                self.principal, self.model, self.limits, self.guard.clock()
            ) if self.guard.access else None
            if over is not None:
                self.cut(self.guard.quota_refusal(self.principal, self.model, over, mid=True))
        return self.refusal

    def complete(self, done: Completed) -> None:
        self.done = done
        rec = self.rec
        missing = done.completion_tokens - rec.completion_tokens
        if missing > 0:
            self.guard.count(self, missing)
        rec.prompt_tokens, rec.cached_tokens = done.prompt_tokens, done.cached_tokens
        if self.refusal is not None:
            self._end(self.refusal.outcome, self.refusal.message)
        elif done.finish_reason == "cancelled":
            self._end("cancelled", "cancelled by the caller")
        else:
            self._end("completed", done.finish_reason)

    def fail(self, reason: str) -> None:
        self._end("failed", reason)

    def close(self) -> None:
        """End of the call however it went (idempotent): a stream not completed was cancelled."""
        if self.state != "done":
            if self.refusal is not None:
                self._end(self.refusal.outcome, self.refusal.message)
            else:
                self._end("cancelled", "the caller went away")

    # the guard calls these ---------------------------------------------------------------

    async def take_slot(self, slots: Slots) -> None:
        """Wait (fairly) for a batch slot; the lease is `running` once it holds one."""
        self._slots = slots

        def waiting(fut: asyncio.Future[None]) -> None:
            self._waiter = fut

        await slots.acquire(self.principal, waiting)
        self.state = "running"

    def release_slot(self) -> None:
        if self._slots is not None:
            self._slots.release(self.principal)
            self._slots = None

    def cut(self, refusal: Refusal) -> None:
        """End this call now with `refusal` (waiting: rejected; running: engine cancel)."""
        if self.refusal is not None or self.state == "done":
            return
        self.refusal = refusal
        if self.state == "waiting" and self._slots is not None and self._waiter is not None:
            self._slots.reject(self.principal, self._waiter, refusal)
        elif self.state == "running" and self._request_id:
            self.engine.cancel(self._request_id)
        log.info("cut %s on %s: %s", self.identity.label, self.model, refusal.message)

    def _end(self, outcome: str, reason: str) -> None:
        if self.state == "done":
            return
        running = self.state == "running"
        self.state = "done"
        self.rec.outcome, self.rec.reason = outcome, reason
        self.rec.ended_at = self.guard.clock()
        self.guard.finish(self, release=running)


# ----- the guard ---------------------------------------------------------------------------


class Guard:
    def __init__(
        self,
        gate: Gate,
        access: AccessState | None,
        *,
        tick: float = 0.25,
        tailnet_recheck: float = 2.0,
        flush_every: float = 1.0,
        clock: Callable[[], float] = time.time,
        bearer: BearerVerifier | None = None,
    ) -> None:
        self.gate = gate
        self.bearer = bearer  # tokens of servers without access state (tests, embedders)
        self.access = access
        self.tick = tick
        self.tailnet_recheck = tailnet_recheck
        self.flush_every = flush_every
        self.clock = clock
        self._slots: dict[int, Slots] = {}
        self._leases: set[Lease] = set()
        self._open: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._touched: dict[str, float] = {}
        self.telemetry = Telemetry()  # the status page, `lmlink top` and /metrics read it

    # ----- who -----------------------------------------------------------------------------

    async def identify(self, peer: str, authorization: str | None) -> Caller:
        """The caller of one call, or Refusal(unauthenticated / permission_denied)."""
        token = bearer_token(authorization)
        identity = self.gate.identify(peer)
        if token is not None and self.access is not None and (
            identity is None or looks_like_token(token)
        ):
            self.access.poll()
            info = self.access.tokens.verify(token)
            if info is None:
                raise Refusal("unauthenticated", "the bearer token is unknown or revoked",
                              code="invalid_api_key")
            now = self.clock()
            if now - self._touched.get(info.id, 0.0) > 60:
                self._touched[info.id] = now
                with contextlib.suppress(Exception):
                    self.access.tokens.touch(info.id, now)
            return Caller(info.identity(self.access.owner_login), info.id)
        if token is not None and identity is None and self.bearer is not None:
            identity = self.bearer.verify(token)
            if identity is None:
                raise Refusal("unauthenticated", "the bearer token is unknown or revoked",
                              code="invalid_api_key")
            return Caller(identity)
        if identity is None:
            raise Refusal("unauthenticated",
                          "caller is not an authenticated peer (send Authorization: Bearer "
                          "<token> from `lmlink token create`)", code="unauthenticated")
        refresh = getattr(self.gate, "refresh", None)
        if refresh is not None and identity.source == "tailnet":
            fresh = await refresh(identity)
            if fresh is None:
                raise Refusal("permission_denied",
                              f"{identity.label} is no longer a peer of this tailnet")
            identity = fresh
        return Caller(identity)

    def check(self, identity: Identity, action: str, model: str = "") -> Any:
        if self.access is not None:
            self.access.poll()
        return self.gate.check(identity, action, model)

    # ----- admission -----------------------------------------------------------------------

    async def admit(self, caller: Caller, engine: Any, request: GenerationRequest, via: str) -> Lease:
        identity = caller.identity
        model = engine.model_id
        rec = RequestRecord(
            request_id=request.request_id, login=identity.login_name,
            principal=principal_of(identity), source=identity.source,
            node=identity.node_name, via=via, model=model, started_at=self.clock(),
            credential=caller.credential,
            prompt=_prompt_text(request) if self.access and self.access.audit_prompts else None,
            server=self.access.server_id if self.access else "",
        )
        verdict = self.check(identity, "generate", model)
        if not verdict.allowed:  # (the reason names the caller)
            self._refuse(rec, Refusal("permission_denied", verdict.reason
                                      or f"{identity.label} may not generate with {model}"))
        limits = UNLIMITED if identity.is_owner else getattr(verdict, "limits", UNLIMITED)
        principal = rec.principal
        if limits.max_streams is not None and self._open.get(principal, 0) >= limits.max_streams:
            self._refuse(rec, Refusal(
                "resource_exhausted",
                f"{principal} already has {self._open.get(principal, 0)} streams open "
                f"(limit {limits.max_streams}); retry when one finishes",
                retry_after=1.0, code="too_many_streams", outcome="rate_limited"))
        if self.access is not None and not identity.is_owner:
            over = self.access.meter.over(principal, model, limits, self.clock())
            if over is not None:
                self._refuse(rec, self.quota_refusal(principal, model, over, mid=False))
            left = self.access.meter.remaining(principal, model, limits, self.clock())
            request = _within_budget(request, left, engine)
        if limits.max_prompt_tokens is not None:  # the engine counts; the grant bounds
            request = replace(request, max_prompt_tokens=limits.max_prompt_tokens)
        lease = Lease(self, caller, engine, limits, rec)
        lease.request = request
        self._leases.add(lease)
        self._open[principal] = self._open.get(principal, 0) + 1
        try:
            await lease.take_slot(self._slots_for(engine))
        except Refusal as refusal:
            lease.refusal = lease.refusal or refusal
            lease.state = "done"
            rec.outcome, rec.reason, rec.ended_at = lease.refusal.outcome, lease.refusal.message, self.clock()
            self.telemetry.call_refused(lease.refusal.code, principal, model, via)
            self.finish(lease, release=False)
            raise lease.refusal from None
        except BaseException:
            lease.state = "done"
            rec.outcome, rec.reason, rec.ended_at = "cancelled", "the caller went away while waiting", self.clock()
            self.finish(lease, release=False)
            raise
        if self.access is not None:
            try:
                self.access.audit.begin(rec)
            except Exception as exc:  # cannot account for it: give the slot back, refuse
                log.error("cannot record request %s: %s", rec.request_id, type(exc).__name__)
                log.debug("audit begin failed", exc_info=True)
                lease.cut(Refusal("unavailable", f"the server cannot record usage now ({exc})",
                                  retry_after=5.0, code="unavailable", outcome="failed"))
                lease.close()
                raise lease.refusal from None  # type: ignore[misc]
        self.telemetry.call_started(str(id(lease)), principal, model, via)
        return lease

    def _slots_for(self, engine: Any) -> Slots:
        slots = self._slots.get(id(engine))
        if slots is None:
            config = getattr(engine, "config", None)
            slots = Slots(getattr(config, "max_batch_size", 32), getattr(config, "max_queue", 1024))
            self._slots[id(engine)] = slots
        return slots

    def _refuse(self, rec: RequestRecord, refusal: Refusal) -> None:
        rec.outcome, rec.reason, rec.ended_at = refusal.outcome, refusal.message, self.clock()
        self.telemetry.call_refused(refusal.code, rec.principal, rec.model, rec.via)
        if self.access is not None:
            self.access.audit.finish(rec)
        raise refusal

    def quota_refusal(self, principal: str, model: str, over: OverQuota, *, mid: bool) -> Refusal:
        when = "during this answer" if mid else "already"
        return Refusal(
            "resource_exhausted",
            f"{principal} used {over.used} of {over.limit} tokens per {over.window} on "
            f"{model} {when}; retry in {_seconds(over.retry_after)}",
            retry_after=over.retry_after, code="quota_exceeded",
            outcome="quota_exceeded" if mid else "rate_limited",
        )

    def count(self, lease: Lease, n: int) -> None:
        rec = lease.rec
        rec.completion_tokens += n
        if self.access is None:
            return
        for key in self.access.meter.add(lease.principal, lease.model, n, self.clock()):
            rec.pending[key] += n
        rec.dirty = True

    def finish(self, lease: Lease, *, release: bool) -> None:
        self._leases.discard(lease)
        left = self._open.get(lease.principal, 0) - 1
        if left > 0:
            self._open[lease.principal] = left
        else:
            self._open.pop(lease.principal, None)
        if release:
            lease.release_slot()
            self.telemetry.call_ended(str(id(lease)), lease.rec.outcome, _usage(lease))
        if self.access is not None:
            try:
                self.access.audit.finish(lease.rec)
            except Exception:  # never let bookkeeping break the caller's stream
                log.error("could not write the audit record of %s", lease.rec.request_id)
                log.debug("audit finish failed", exc_info=True)

    # ----- live checks ---------------------------------------------------------------------

    def revalidate(self, leases: Iterable[Lease] | None = None) -> int:
        """Cut every lease whose access is gone; update the limits of the others."""
        cut = 0
        for lease in list(leases if leases is not None else self._leases):
            if lease.refusal is not None or lease.state == "done":
                continue
            cred = lease.caller.credential
            if cred and self.access is not None and not self.access.tokens.is_active(cred):
                lease.cut(Refusal("permission_denied", "access revoked: the bearer token was revoked",
                                  outcome="revoked"))
                cut += 1
                continue
            verdict = self.gate.check(lease.identity, "generate", lease.model)
            if not verdict.allowed:
                lease.cut(Refusal("permission_denied", f"access revoked: {verdict.reason}",
                                  outcome="revoked"))
                cut += 1
            elif not lease.identity.is_owner:
                lease.limits = getattr(verdict, "limits", UNLIMITED)
        return cut

    async def refresh_tailnet(self) -> None:
        """Ask the tailnet again who the callers of running streams are (grants may change)."""
        refresh = getattr(self.gate, "refresh", None)
        if refresh is None:
            return
        by_node: dict[tuple[str, ...], list[Lease]] = {}
        for lease in self._leases:
            if lease.identity.source == "tailnet" and lease.identity.addresses and lease.state != "done":
                by_node.setdefault(lease.identity.addresses, []).append(lease)
        for leases in by_node.values():
            fresh = await refresh(leases[0].identity)
            for lease in leases:
                if fresh is None:
                    lease.cut(Refusal("permission_denied",
                                      f"access revoked: {lease.identity.label} left the tailnet",
                                      outcome="revoked"))
                else:
                    lease.identity = fresh

    def shut(self, refusal: Refusal, *, waiting_only: bool = False) -> int:
        """End calls now with `refusal` (shutting down): those waiting for a slot, or all."""
        leases = [l for l in self._leases if not waiting_only or l.state == "waiting"]
        for lease in leases:
            lease.cut(refusal)
        return len(leases)

    @property
    def running_calls(self) -> int:
        return sum(1 for lease in self._leases if lease.state == "running")

    def flush(self) -> None:
        if self.access is not None:
            self.access.audit.flush([lease.rec for lease in self._leases])

    def stats(self) -> dict[str, Any]:
        return {
            "open": dict(self._open),
            "slots": {k: {"in_use": s.in_use, "queued": s.queued, "capacity": s.capacity}
                      for k, s in self._slots.items()},
        }

    async def run(self) -> None:
        """Background checks: store changes and expiry every tick, WhoIs every few seconds."""
        last_refresh = last_flush = last_prune = time.monotonic()
        while True:
            await asyncio.sleep(self.tick)
            try:
                if self.access is not None:
                    self.access.poll()
                now = time.monotonic()
                if now - last_refresh >= self.tailnet_recheck:
                    last_refresh = now
                    await self.refresh_tailnet()
                self.revalidate()
                if now - last_flush >= self.flush_every:
                    last_flush = now
                    self.flush()
                if self.access is not None and now - last_prune >= 300:
                    last_prune = now
                    self.access.prune()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("access check failed (%s); retrying", type(exc).__name__)
                log.debug("access check failure", exc_info=True)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self.run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            self.flush()

    def close(self) -> None:
        """Close the access state (after `aclose()` and after the streams ended)."""
        if self.access is not None:
            with contextlib.suppress(Exception):
                self.flush()
            self.access.close()


def _usage(lease: Lease) -> CallUsage:
    """A finished call's figures for the status views (timings only when it completed)."""
    rec, done = lease.rec, lease.done
    if done is None:
        return CallUsage(rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens)
    return CallUsage(done.prompt_tokens, done.completion_tokens, done.cached_tokens,
                     done.time_to_first_token_ms / 1000, done.total_ms / 1000, done.queued_ms / 1000)


def _within_budget(request: GenerationRequest, left: int | None, engine: Any) -> GenerationRequest:
    """Ask for no more tokens than the quota has left, so the answer ends ("length") at the
    budget instead of being cut with an error."""
    if left is None:
        return request
    wanted = request.sampling.max_tokens
    if wanted is None:
        wanted = getattr(getattr(engine, "config", None), "default_max_tokens", None)
    if wanted is not None and wanted <= left:
        return request
    return replace(request, sampling=replace(request.sampling, max_tokens=max(1, left)))


def _prompt_text(request: GenerationRequest) -> str:
    if request.messages is not None:
        return json.dumps([{"role": m.role, "content": m.content} for m in request.messages])
    return request.prompt or ""


def open_guard(
    state_dir: Any,
    identify: Callable[[str], Identity | None],
    *,
    gate: Gate | None = None,
    refresh: Callable[[Identity], Any] | None = None,
    owner_login: str = "local",
    audit_prompts: bool = False,
) -> Guard:
    """The server's guard: access state from `state_dir`, and (unless a gate is given) a
    policy gate uniting tailnet grants with the local shares. Raises StoreError."""
    from lmlink.access.gate import PolicyGate

    access = AccessState.open(state_dir, owner_login=owner_login or "owner",
                              audit_prompts=audit_prompts)
    if gate is not None:
        return Guard(gate, access)
    policy_gate: Any = PolicyGate(identify, access.policy, refresh=refresh)  # Decision ~ Verdict
    return Guard(policy_gate, access)
