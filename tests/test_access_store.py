"""Access state units: SQLite store and migrations, shares in the policy, quotas, audit file,
tokens, and the guard's fair admission (fake engines, fake clock; no model, no network)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import dataclass

import pytest

from lmlink.access.audit import AUDIT_FILE, RequestRecord, export_audit
from lmlink.access.identity import Identity
from lmlink.access.policy import CAPABILITY, GROUPS_CAPABILITY, Limits
from lmlink.access.quotas import UsageMeter, Window
from lmlink.access.shares import ShareError, parse_duration
from lmlink.access.state import AccessState, principal_of
from lmlink.access.store import SCHEMA_VERSION, Store, StoreError
from lmlink.api.admission import Slots
from lmlink.api.limits import Caller, Guard, Refusal
from lmlink.engine.types import Completed, GenerationRequest, SamplingOptions, TokenDelta


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def who(login="alice@example.com", *, tags=(), caps=None, owner=False, node="alice-laptop"):
    return Identity(login_name=login, source="tailnet", node_name=node, tags=tuple(tags),
                    capabilities=caps or {}, addresses=("100.87.0.9",), is_owner=owner)


# ----- store ---------------------------------------------------------------------------------


def test_store_is_wal_versioned_and_private(tmp_path):
    with Store(tmp_path / "s") as store:
        assert store.version == SCHEMA_VERSION
        assert store.query("PRAGMA journal_mode")[0][0] == "wal"
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "s" / "state.db").stat().st_mode & 0o777 == 0o600
    with Store(tmp_path / "s") as again:  # reopening migrates nothing twice
        assert again.version == SCHEMA_VERSION


def test_store_refuses_a_newer_schema(tmp_path):
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this lmlink"):
        Store(tmp_path)


def test_transactions_are_all_or_nothing(tmp_path):
    with Store(tmp_path) as store:
        with pytest.raises(RuntimeError):
            with store.transaction() as db:
                db.execute("INSERT INTO audit (record) VALUES ('{}')")
                raise RuntimeError("crash in the middle")
        assert store.query("SELECT count(*) FROM audit")[0][0] == 0


# ----- shares + policy -----------------------------------------------------------------------


def test_shares_unite_with_tailnet_grants_most_generous_limit_wins(tmp_path):
    clock = Clock()
    state = AccessState.open(tmp_path, clock=clock)
    alice = who(caps={CAPABILITY: [{"models": ["tiny"], "tokens_per_minute": 100, "max_streams": 4}]})
    d = state.policy.check(alice, "generate", "tiny")
    assert d.allowed and d.limits == Limits(max_streams=4, tokens_per_minute=100)
    assert not state.policy.check(alice, "generate", "big").allowed
    state.shares.add("alice@example.com", ["tiny", "big"], tokens_per_minute=500, max_streams=1,
                     tokens_per_day=9000)
    d = state.policy.check(alice, "generate", "tiny")  # both grants apply: widest of each limit
    assert d.limits == Limits(max_streams=4, tokens_per_minute=500, tokens_per_day=None)
    d = state.policy.check(alice, "generate", "big")  # only the share applies
    assert d.allowed and d.limits == Limits(1, 500, 9000)
    state.close()


def test_share_expiry_revocation_tags_and_groups(tmp_path):
    clock = Clock()
    state = AccessState.open(tmp_path, clock=clock)
    ci = Identity(login_name="tagged-devices", source="tailnet", node_name="ci.ts.net", tags=("tag:ci",))
    carol = who("carol@example.com", caps={GROUPS_CAPABILITY: [{"groups": ["group:eng", 7]}]})
    state.shares.add("tag:ci", ["*"], expires="10m")
    state.shares.add("group:eng", ["tiny"])
    assert state.policy.check(ci, "generate", "any").allowed
    assert state.policy.check(carol, "generate", "tiny").allowed
    assert not state.policy.check(who("dave@example.com"), "generate", "tiny").allowed
    clock.t += 601  # expiry needs no reload: it is checked at lookup time
    assert not state.policy.check(ci, "generate", "any").allowed
    state.shares.revoke("group:eng")
    assert not state.policy.check(carol, "generate", "tiny").allowed
    assert principal_of(ci) == "ci.ts.net" and principal_of(carol) == "carol@example.com"
    state.close()


def test_another_process_change_is_seen_by_poll(tmp_path):
    state = AccessState.open(tmp_path)
    with Store(tmp_path) as other:  # e.g. `lmlink share add` while the server runs
        from lmlink.access.shares import ShareBook

        ShareBook(other).add("bob@example.com", ["tiny"])
    assert not state.policy.check(who("bob@example.com"), "generate", "tiny").allowed
    assert state.poll() is True
    assert state.policy.check(who("bob@example.com"), "generate", "tiny").allowed
    assert state.poll() is False
    state.close()


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("12h", 43200),
                                          ("7d", 604800), ("2w", 1209600), ("1d12h", 129600)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "-1d", "0s", "1.5h", "7 d"])
def test_bad_durations(text):
    with pytest.raises(ShareError):
        parse_duration(text)


# ----- quotas --------------------------------------------------------------------------------


def test_sliding_window_and_retry_after():
    meter = UsageMeter({"minute": Window("minute", 60.0)})
    limits = Limits(tokens_per_minute=100)
    t = 1000.0
    meter.add("a", "m", 60, t)
    meter.add("a", "m", 40, t + 30)
    over = meter.over("a", "m", limits, t + 31)
    assert over is not None and over.used == 100
    assert over.retry_after == pytest.approx(29, abs=1.01)  # when the first 60 leave
    assert meter.over("a", "m", limits, t + 61) is None  # 40 used, 60 left
    assert meter.remaining("a", "m", limits, t + 61) == 60
    assert meter.used("a", "other-model", "minute", t) == 0  # per model
    assert meter.remaining("a", "m", Limits(), t) is None


# ----- audit file ----------------------------------------------------------------------------


def test_audit_file_heals_a_torn_line_and_never_duplicates(tmp_path):
    state = AccessState.open(tmp_path)
    for i in range(3):
        rec = RequestRecord(f"r{i}", "a@x", "a@x", "tailnet", "n", "grpc", "m", 1.0 + i)
        rec.outcome, rec.ended_at = "completed", 2.0 + i
        state.audit.finish(rec)
    path = tmp_path / AUDIT_FILE
    assert [json.loads(x)["seq"] for x in path.read_text().splitlines()] == [1, 2, 3]
    with open(path, "ab") as f:  # a crash in the middle of writing a line
        f.write(b'{"seq": 4, "event": "req')
    with state.store.transaction() as db:  # and a record committed but never exported
        db.execute("INSERT INTO audit (record) VALUES ('{\"event\": \"x\"}')")
    assert export_audit(state.store, path) == 1
    assert export_audit(state.store, path) == 0
    seqs = [json.loads(x)["seq"] for x in path.read_text().splitlines()]
    assert seqs == [1, 2, 3, 4]
    state.close()


# ----- fair admission ------------------------------------------------------------------------


async def test_a_free_slot_goes_to_the_caller_holding_fewest():
    slots = Slots(capacity=2, max_waiting=100)
    order: list[str] = []

    async def take(who: str) -> None:
        await slots.acquire(who, lambda fut: None)
        order.append(who)

    await take("heavy")
    await take("heavy")
    flood = [asyncio.ensure_future(take("heavy")) for _ in range(5)]
    await asyncio.sleep(0)
    newcomer = asyncio.ensure_future(take("light"))
    await asyncio.sleep(0)
    slots.release("heavy")
    await asyncio.sleep(0)
    assert order[-1] == "light"  # not the five heavy requests queued before it
    for _ in range(5):
        slots.release("heavy")
        await asyncio.sleep(0)
    await asyncio.gather(*flood, newcomer)
    assert order.count("heavy") == 7


async def test_waiting_queue_is_bounded_but_keeps_a_place_for_an_idle_caller():
    slots = Slots(capacity=1, max_waiting=1)
    await slots.acquire("a", lambda f: None)
    waiter = asyncio.ensure_future(slots.acquire("a", lambda f: None))
    await asyncio.sleep(0)
    with pytest.raises(Refusal) as info:  # the queue is full for "a" ...
        await slots.acquire("a", lambda f: None)
    assert info.value.kind == "overloaded"
    other = asyncio.ensure_future(slots.acquire("b", lambda f: None))  # ... not for idle "b"
    await asyncio.sleep(0)
    assert not other.done()
    with pytest.raises(Refusal):  # but "b" gets one place only
        await slots.acquire("b", lambda f: None)
    slots.release("a")
    await asyncio.sleep(0)
    slots.release("a")
    await asyncio.sleep(0)
    assert waiter.done() and other.done() and slots.running == {"b": 1}


@dataclass
class FakeConfig:
    max_batch_size: int = 1
    max_queue: int = 10
    default_max_tokens: int = 512


class FakeEngine:
    model_id = "tiny"

    def __init__(self) -> None:
        self.config = FakeConfig()
        self.cancelled: list[str] = []

    def cancel(self, request_id: str, owner: str | None = None) -> bool:
        self.cancelled.append(request_id)
        return True


class FakeGate:
    def __init__(self, state: AccessState) -> None:
        self.state = state

    def identify(self, peer: str):
        return None

    def check(self, identity, action, model=""):
        return self.state.policy.check(identity, action, model or None)


async def test_guard_quota_clamp_cut_and_revocation_while_waiting(tmp_path):
    clock = Clock()
    state = AccessState.open(tmp_path, clock=clock)
    state.shares.add("alice@example.com", ["tiny"], tokens_per_day=50)
    guard = Guard(FakeGate(state), state, clock=clock)
    engine = FakeEngine()
    alice = Caller(who())
    req = GenerationRequest("r1", prompt="x", sampling=SamplingOptions(max_tokens=80))
    lease = await guard.admit(alice, engine, req, "grpc")
    assert lease.request.sampling.max_tokens == 50  # clamped to the budget left
    lease.started("r1")
    assert lease.observe([TokenDelta("a", [1] * 30)]) is None
    # a second call waits for the single slot ...
    waiting = asyncio.ensure_future(guard.admit(alice, engine, GenerationRequest("r2", prompt="y"), "http"))
    await asyncio.sleep(0)
    assert not waiting.done()
    # ... and is refused when the share is revoked; the running one is cut too
    state.shares.revoke("alice@example.com")
    assert guard.revalidate() == 2
    with pytest.raises(Refusal) as info:
        await waiting
    assert info.value.kind == "permission_denied" and "access revoked" in info.value.message
    assert engine.cancelled == ["r1"]
    refusal = lease.observe([Completed("cancelled", 1, 30, 0, 1, 1, 1, 1, 0)])
    assert refusal is not None and refusal.kind == "permission_denied"
    lease.close()
    rows = state.store.query("SELECT request_id, outcome, completion_tokens FROM requests ORDER BY seq")
    assert [tuple(r) for r in rows] == [("r1", "revoked", 30), ("r2", "revoked", 0)]
    state.close()


async def test_guard_cuts_a_stream_that_uses_up_the_quota(tmp_path):
    clock = Clock()
    state = AccessState.open(tmp_path, clock=clock)
    state.shares.add("alice@example.com", ["tiny"], tokens_per_minute=10)
    guard = Guard(FakeGate(state), state, clock=clock)
    engine = FakeEngine()
    engine.config.max_batch_size = 4
    a = await guard.admit(Caller(who()), engine, GenerationRequest("a", prompt="x"), "grpc")
    b = await guard.admit(Caller(who()), engine, GenerationRequest("b", prompt="x"), "grpc")
    a.started("a")
    b.started("b")
    assert a.observe([TokenDelta("", [1] * 6)]) is None
    cut = b.observe([TokenDelta("", [1] * 6)])  # 12 of 10: concurrent streams went over
    assert cut is not None and cut.kind == "resource_exhausted" and cut.retry_after > 0
    assert engine.cancelled == ["b"]
    with pytest.raises(Refusal) as info:  # and the next call is refused with when to retry
        await guard.admit(Caller(who()), engine, GenerationRequest("c", prompt="x"), "grpc")
    assert "retry in" in info.value.message and info.value.retry_seconds() >= 1
    clock.t += 61
    d = await guard.admit(Caller(who()), engine, GenerationRequest("d", prompt="x"), "grpc")
    assert d.request.sampling.max_tokens == 10
    for lease in (a, b, d):
        lease.close()
    state.close()


def test_recovery_leaves_a_live_servers_requests_alone(tmp_path):
    import os

    first = AccessState.open(tmp_path)
    rec = RequestRecord("r1", "a@x", "a@x", "tailnet", "n", "grpc", "m", 1.0, server=first.server_id)
    first.audit.begin(rec)
    second = AccessState.open(tmp_path)  # another server on the same state dir
    outcome = lambda: second.store.query("SELECT outcome FROM requests")[0][0]  # noqa: E731
    assert outcome() == "running"
    os.close(first._lock_fd)  # the first server dies (kill -9 drops its lock)
    first._lock_fd = -1
    third = AccessState.open(tmp_path)
    assert outcome() == "interrupted"
    for s in (first, second, third):
        s.close()


def test_a_version_1_database_is_migrated_in_place(tmp_path):
    from lmlink.access.store import MIGRATIONS

    db = sqlite3.connect(tmp_path / "state.db")
    db.executescript(MIGRATIONS[0])  # a database as version 1 left it
    db.execute("INSERT INTO shares (principal, models, actions, created_at, created_by)"
               " VALUES ('a@x', '[\"m\"]', '[\"generate\"]', 1.0, 'owner')")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    state = AccessState.open(tmp_path)
    assert state.store.version == SCHEMA_VERSION == 2
    assert [s.principal for s in state.shares.list()] == ["a@x"]
    cols = [r[1] for r in state.store.query("PRAGMA table_info(requests)")]
    assert "server" in cols
    state.close()


def test_locks_of_dead_runs_are_swept(tmp_path):
    (tmp_path / "servers").mkdir(parents=True)
    (tmp_path / "servers" / "deadbeef.lock").write_text("")
    state = AccessState.open(tmp_path)
    assert [p.stem for p in (tmp_path / "servers").iterdir()] == [state.server_id]
    state.close()
    assert list((tmp_path / "servers").iterdir()) == []


async def test_prompt_text_is_audited_only_when_the_owner_opted_in(tmp_path):
    from lmlink.engine.types import ChatTurn

    req = GenerationRequest("p", messages=(ChatTurn("user", "secret plans"),))
    for opted_in in (False, True):
        state = AccessState.open(tmp_path / str(opted_in), audit_prompts=opted_in)
        guard = Guard(FakeGate(state), state)
        lease = await guard.admit(Caller(who(owner=True)), FakeEngine(), req, "grpc")
        lease.started("p")
        lease.complete(Completed("stop", 3, 0, 0, 1, 1, 1, 1, 0))
        text = (tmp_path / str(opted_in) / AUDIT_FILE).read_text()
        assert ("secret plans" in text) is opted_in
        assert ("secret plans" in str(state.store.query("SELECT prompt FROM requests")[0][0])) is opted_in
        state.close()
