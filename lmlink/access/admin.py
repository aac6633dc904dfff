"""The owner's commands over the access state: shares, tokens, usage.

One implementation for both ways in: `lmlink share|token|usage --state-dir DIR` runs these
against the state database directly (the owner on the server machine), and
`... --server HOST:PORT` sends the same command name and JSON arguments to a running server,
which runs them here after checking the caller is the node owner. Arguments arrive as JSON,
so every one is type-checked before use; bad input raises `ShareError` and changes nothing.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Protocol

from lmlink.access.audit import summarize
from lmlink.access.shares import (
    ShareBook,
    ShareError,
    check_actions,
    check_limit,
    check_login,
    check_models,
    iso,
    parse_when,
    principal_kind,
)
from lmlink.access.store import Store
from lmlink.access.tokens import TokenBook, check_token_name

COMMANDS: tuple[str, ...] = (
    "share.add", "share.list", "share.revoke", "token.create", "token.list", "token.revoke",
    "usage",
)


class Books(Protocol):
    store: Store
    shares: ShareBook
    tokens: TokenBook


class LocalBooks:
    """The books of a state dir opened by a command (not by a server)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.shares = ShareBook(store, clock)
        self.tokens = TokenBook(store, clock)


def _str(args: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = args.get(key)
    if value is None:
        if required:
            raise ShareError(f"missing {key}")
        return None
    if not isinstance(value, str):
        raise ShareError(f"{key} must be a string, got {value!r}")
    return value


def _strs(args: dict[str, Any], key: str) -> list[str]:
    value = args.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ShareError(f"{key} must be a list of strings")
    return value


def _limit(args: dict[str, Any], key: str) -> Any:
    value = args.get(key)
    if value is None or isinstance(value, (int, str)):
        return value
    raise ShareError(f"{key} must be a whole number, got {value!r}")


def validate(command: str, args: dict[str, Any], *, now: float) -> None:
    """Every check that needs no database: run before anything is opened or changed."""
    if command not in COMMANDS:
        raise ShareError(f"unknown admin command {command!r}")
    if not isinstance(args, dict):
        raise ShareError("arguments must be a JSON object")
    if command == "share.add":
        principal_kind(_str(args, "principal", required=True) or "")
        check_models(_strs(args, "models"))
        check_actions(_strs(args, "actions") or None)
        check_limit("--max-streams", _limit(args, "max_streams"))
        check_limit("--tokens-per-minute", _limit(args, "tokens_per_minute"))
        check_limit("--tokens-per-day", _limit(args, "tokens_per_day"))
        expires = _str(args, "expires")
        if expires is not None:
            parse_when(expires, now=now, future=True)
    elif command == "share.revoke":
        sel = (_str(args, "selector", required=True) or "").strip()
        if not re.fullmatch(r"#?\d+", sel):
            principal_kind(sel)
        models = _strs(args, "models")
        if models:
            check_models(models)
    elif command == "token.create":
        check_token_name(_str(args, "name", required=True) or "")
        login = _str(args, "as")
        if login is not None:
            check_login(login)
    elif command == "token.revoke":
        if not (_str(args, "selector", required=True) or "").strip():
            raise ShareError("name the token to revoke (its name or tk_ id)")
    elif command == "usage":
        by = _str(args, "by") or "user"
        if by not in ("user", "model"):
            raise ShareError(f"--by must be user or model, got {by!r}")
        since = _str(args, "since")
        if since is not None:
            parse_when(since, now=now, future=False)


def run(books: Books, command: str, args: dict[str, Any], *, actor: str = "owner",
        clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Run one admin command; returns its JSON-able result."""
    now = clock()
    validate(command, args, now=now)
    if command == "share.add":
        share = books.shares.add(
            _str(args, "principal", required=True) or "",
            _strs(args, "models"),
            actions=_strs(args, "actions") or None,
            max_streams=_limit(args, "max_streams"),
            tokens_per_minute=_limit(args, "tokens_per_minute"),
            tokens_per_day=_limit(args, "tokens_per_day"),
            expires=_str(args, "expires"),
            by=actor,
        )
        return {"share": share.to_json(now)}
    if command == "share.list":
        shares = books.shares.list(include_inactive=bool(args.get("all")))
        return {"shares": [s.to_json(now) for s in shares]}
    if command == "share.revoke":
        revoked, kept = books.shares.revoke_models(
            _str(args, "selector", required=True) or "", models=_strs(args, "models"), by=actor)
        return {"revoked": [s.to_json(now) for s in revoked],
                "kept": [s.to_json(now) for s in kept]}
    if command == "token.create":
        token, info = books.tokens.create(_str(args, "name", required=True) or "",
                                          _str(args, "as"), by=actor)
        return {"token": token, **info.to_json()}
    if command == "token.list":
        return {"tokens": [t.to_json() for t in books.tokens.list(include_revoked=bool(args.get("all")))]}
    if command == "token.revoke":
        gone = books.tokens.revoke(_str(args, "selector", required=True) or "", by=actor)
        return {"revoked": [t.to_json() for t in gone]}
    if command == "usage":
        by = _str(args, "by") or "user"
        if by not in ("user", "model"):
            raise ShareError(f"--by must be user or model, got {by!r}")
        since_text = _str(args, "since")
        since = parse_when(since_text, now=now, future=False) if since_text else None
        return {"by": by, "since": iso(since), "rows": summarize(books.store, by=by, since=since)}
    raise ShareError(f"unknown admin command {command!r}")
