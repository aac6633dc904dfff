"""Local shares: grants the server keeps itself, next to the tailnet policy's app capabilities.

`lmlink share add alice@example.com --model M --tokens-per-day N --expires 7d` stores one row
in `state.db`; the `ShareBook` turns the active rows (not revoked, not expired) into grant
values of exactly the tailnet capability's JSON shape, so `Policy` treats both sources the
same way: the effective permission is the union of every grant that applies to the caller,
and each limit is the most generous one among the grants allowing the request.

Principals: a login (`alice@example.com`, `alice@github`), a tailnet tag (`tag:ci`) or a
tailnet group (`group:eng`, membership stated by the tailnet policy, see `policy.py`).
Everything a person types is validated here, with one-line reasons (`ShareError`).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Sequence

from lmlink.access.policy import ACTIONS, DEFAULT_ACTIONS
from lmlink.access.store import Store

_LOGIN = re.compile(r"[^\s@:/,]+@[^\s@:/,]+")
_TAG = re.compile(r"tag:[A-Za-z][A-Za-z0-9-]{0,62}")
_GROUP = re.compile(r"group:[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_MODEL = re.compile(r"[^\s,]{1,200}")
_DURATION = re.compile(r"(?:(\d+)([smhdw]))+")
_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
SHAREABLE_ACTIONS: tuple[str, ...] = tuple(a for a in ACTIONS if a != "admin")
MAX_LIMIT = 10**12


class ShareError(ValueError):
    """Bad input to a share command; the message is one line fit for stderr."""


class NotFound(ShareError):
    """The share or token to change does not exist (or is no longer active)."""


# ----- validation --------------------------------------------------------------------------


def principal_kind(text: str) -> str:
    """'user', 'tag' or 'group'; raises ShareError for anything else."""
    if _TAG.fullmatch(text):
        return "tag"
    if _GROUP.fullmatch(text):
        return "group"
    if _LOGIN.fullmatch(text):
        return "user"
    raise ShareError(
        f"{text!r} is not a tailnet login (user@example.com), tag:NAME or group:NAME"
    )


def check_login(text: str) -> str:
    if not _LOGIN.fullmatch(text or ""):
        raise ShareError(f"{text!r} is not a tailnet login (user@example.com)")
    return text


def check_models(models: Sequence[str]) -> list[str]:
    if not models:
        raise ShareError("name at least one model with --model (or --model '*' for all)")
    out: list[str] = []
    for m in models:
        if not isinstance(m, str) or not _MODEL.fullmatch(m):
            raise ShareError(f"{m!r} is not a model id or pattern (no spaces or commas)")
        if m not in out:
            out.append(m)
    return out


def check_actions(actions: Sequence[str] | None) -> list[str]:
    if not actions:
        return sorted(DEFAULT_ACTIONS)
    out: list[str] = []
    for a in actions:
        if a not in SHAREABLE_ACTIONS:
            raise ShareError(
                f"unknown action {a!r} (choose from {', '.join(SHAREABLE_ACTIONS)}; "
                "admin stays with the owner)"
            )
        if a not in out:
            out.append(a)
    return out


def check_limit(name: str, value: Any) -> int | None:
    """None (unlimited) or a positive whole number; strings from the command line accepted."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ShareError(f"{name} must be a positive whole number, got {value!r}")
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ShareError(f"{name} must be a positive whole number, got {value!r}")
        value = int(text)
    if not isinstance(value, int) or value < 1 or value > MAX_LIMIT:
        raise ShareError(f"{name} must be a positive whole number, got {value!r}")
    return value


def parse_duration(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w', '1d12h' -> seconds (> 0)."""
    t = (text or "").strip().lower()
    if not _DURATION.fullmatch(t):
        raise ShareError(
            f"{text!r} is not a duration (like 30m, 12h, 7d, 2w or 1d12h)"
        )
    seconds = sum(int(n) * _UNITS[u] for n, u in _DURATION_PART.findall(t))
    if seconds <= 0:
        raise ShareError(f"{text!r} is not a positive duration")
    if seconds > 100 * 365 * 86400:
        raise ShareError(f"{text!r} is longer than a hundred years")
    return float(seconds)


def parse_when(text: str, *, now: float, future: bool) -> float:
    """A duration from now ('7d': now+7d if future, now-7d if not) or an ISO date/time."""
    t = (text or "").strip()
    if t and t[0].isdigit() and _DURATION.fullmatch(t.lower()):
        d = parse_duration(t)
        return now + d if future else now - d
    try:
        when = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise ShareError(
            f"{text!r} is neither a duration (30m, 12h, 7d) nor a date (2026-08-01T12:00)"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time, as people type it
    ts = when.timestamp()
    if future and ts <= now:
        raise ShareError(f"{text!r} is in the past")
    return ts


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


# ----- the share table ---------------------------------------------------------------------


@dataclass(frozen=True)
class Share:
    id: int
    principal: str
    models: tuple[str, ...]
    actions: tuple[str, ...]
    max_streams: int | None
    tokens_per_minute: int | None
    tokens_per_day: int | None
    created_at: float
    created_by: str
    expires_at: float | None
    revoked_at: float | None

    @property
    def kind(self) -> str:
        return principal_kind(self.principal)

    def active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def grant(self) -> dict[str, Any]:
        """The grant value, in the tailnet capability's JSON shape."""
        g: dict[str, Any] = {"models": list(self.models), "actions": list(self.actions)}
        for key in ("max_streams", "tokens_per_minute", "tokens_per_day"):
            if getattr(self, key) is not None:
                g[key] = getattr(self, key)
        return g

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "principal": self.principal,
            "kind": self.kind,
            "models": list(self.models),
            "actions": list(self.actions),
            "max_streams": self.max_streams,
            "tokens_per_minute": self.tokens_per_minute,
            "tokens_per_day": self.tokens_per_day,
            "created_at": iso(self.created_at),
            "created_by": self.created_by,
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "status": self.status(now),
        }


def _share(row: Any) -> Share:
    return Share(
        id=row["id"],
        principal=row["principal"],
        models=tuple(json.loads(row["models"])),
        actions=tuple(json.loads(row["actions"])),
        max_streams=row["max_streams"],
        tokens_per_minute=row["tokens_per_minute"],
        tokens_per_day=row["tokens_per_day"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
    )


class ShareBook(Mapping[str, Sequence[dict[str, Any]]]):
    """The share table, and a live `principal -> [grant values]` view for `Policy`.

    The view holds the non-revoked shares in memory (reloaded by `reload()` when the
    database changes) and filters expiry at lookup time, so an expired share stops granting
    the moment it expires, without waiting for a reload.
    """

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._lock = threading.Lock()
        self._by_principal: dict[str, list[Share]] = {}
        self.reload()

    # ----- Mapping view (what Policy reads) ------------------------------------------------

    def __getitem__(self, principal: str) -> Sequence[dict[str, Any]]:
        now = self.clock()
        with self._lock:
            shares = self._by_principal.get(principal, ())
        grants = [s.grant() for s in shares if s.active(now)]
        if not grants:
            raise KeyError(principal)
        return grants

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._by_principal))

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_principal)

    def reload(self) -> None:
        rows = self.store.query("SELECT * FROM shares WHERE revoked_at IS NULL ORDER BY id")
        by: dict[str, list[Share]] = {}
        for row in rows:
            share = _share(row)
            by.setdefault(share.principal, []).append(share)
        with self._lock:
            self._by_principal = by

    def next_expiry(self, now: float) -> float | None:
        with self._lock:
            times = [s.expires_at for ss in self._by_principal.values() for s in ss
                     if s.expires_at is not None and s.expires_at > now]
        return min(times, default=None)

    # ----- changes (validated) -------------------------------------------------------------

    def add(
        self,
        principal: str,
        models: Sequence[str],
        *,
        actions: Sequence[str] | None = None,
        max_streams: Any = None,
        tokens_per_minute: Any = None,
        tokens_per_day: Any = None,
        expires: str | None = None,
        by: str = "owner",
    ) -> Share:
        """Validate everything first, then insert one row; nothing changes on bad input."""
        principal_kind(principal)
        models = check_models(models)
        acts = check_actions(actions)
        limits = {
            "max_streams": check_limit("--max-streams", max_streams),
            "tokens_per_minute": check_limit("--tokens-per-minute", tokens_per_minute),
            "tokens_per_day": check_limit("--tokens-per-day", tokens_per_day),
        }
        now = self.clock()
        expires_at = parse_when(expires, now=now, future=True) if expires else None
        with self.store.transaction() as db:
            cur = db.execute(
                "INSERT INTO shares (principal, models, actions, max_streams, tokens_per_minute,"
                " tokens_per_day, created_at, created_by, expires_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (principal, json.dumps(models), json.dumps(acts), limits["max_streams"],
                 limits["tokens_per_minute"], limits["tokens_per_day"], now, by, expires_at),
            )
            share_id = int(cur.lastrowid or 0)
            _audit_admin(db, now, by, "share.add", {
                "share": share_id, "principal": principal, "models": models, "actions": acts,
                **limits, "expires_at": iso(expires_at)})
        self.reload()
        return self.get_share(share_id)

    def get_share(self, share_id: int) -> Share:
        rows = self.store.query("SELECT * FROM shares WHERE id = ?", (share_id,))
        if not rows:
            raise NotFound(f"no share #{share_id}")
        return _share(rows[0])

    def list(self, *, include_inactive: bool = False) -> List[Share]:
        rows = self.store.query("SELECT * FROM shares ORDER BY id")
        now = self.clock()
        shares = [_share(r) for r in rows]
        return shares if include_inactive else [s for s in shares if s.active(now)]

    def revoke(self, selector: str, *, models: Sequence[str] = (), by: str = "owner") -> List[Share]:
        """Revoke share #ID (`3` or `#3`), or every active share of a principal
        (optionally only those naming one of `models`). Raises if nothing matches."""
        return self.revoke_models(selector, models=models, by=by)[0]

    def revoke_models(self, selector: str, *, models: Sequence[str] = (),
                      by: str = "owner") -> tuple[List[Share], List[Share]]:
        """`revoke`, returning (revoked, kept): with `models`, a share that also names other
        models is revoked and its other models re-granted as a new share (same limits and
        expiry), so `--model qwen-7b` never takes away a `qwen-*` grant."""
        sel = (selector or "").strip()
        now = self.clock()
        params: List[Any]
        if re.fullmatch(r"#?\d+", sel):
            where, params = "id = ?", [int(sel.lstrip("#"))]
        else:
            principal_kind(sel)
            where, params = "principal = ?", [sel]
        wanted = set(check_models(models)) if models else None
        with self.store.transaction() as db:
            rows = db.execute(
                f"SELECT * FROM shares WHERE {where} AND revoked_at IS NULL", params
            ).fetchall()
            targets = [s for s in map(_share, rows)
                       if s.active(now) and (wanted is None or wanted & set(s.models))]
            if not targets:
                what = f"share #{sel.lstrip('#')}" if sel.lstrip("#").isdigit() else repr(sel)
                models_note = f" for {', '.join(sorted(wanted))}" if wanted else ""
                raise NotFound(f"no active share matches {what}{models_note}")
            kept: dict[int, int] = {}
            for s in targets:
                db.execute("UPDATE shares SET revoked_at = ?, revoked_by = ? WHERE id = ?",
                           (now, by, s.id))
                rest = [m for m in s.models if m not in wanted] if wanted else []
                if rest:  # revoke only the models named: the rest live on in a new share
                    cur = db.execute(
                        "INSERT INTO shares (principal, models, actions, max_streams,"
                        " tokens_per_minute, tokens_per_day, created_at, created_by, expires_at)"
                        " VALUES (?,?,?,?,?,?,?,?,?)",
                        (s.principal, json.dumps(rest), json.dumps(list(s.actions)),
                         s.max_streams, s.tokens_per_minute, s.tokens_per_day, now, by,
                         s.expires_at))
                    kept[s.id] = int(cur.lastrowid or 0)
            _audit_admin(db, now, by, "share.revoke",
                         {"shares": [s.id for s in targets], "selector": sel,
                          **({"models": sorted(wanted), "kept_as": kept} if wanted else {})})
        self.reload()
        return ([self.get_share(s.id) for s in targets],
                [self.get_share(new) for new in kept.values()])


def _audit_admin(db: Any, now: float, actor: str, event: str, details: dict[str, Any]) -> None:
    """Admin changes go to the audit trail in the same transaction as the change itself."""
    record = {"ts": iso(now), "event": event, "by": actor, **details}
    db.execute("INSERT INTO audit (record) VALUES (?)", (json.dumps(record, sort_keys=True),))
