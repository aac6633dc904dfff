"""Bearer tokens for devices and scripts whose tailnet identity cannot be used.

`lmlink token create --name iphone [--as LOGIN]` prints a token once. Only its SHA-256 is
stored (the token is 256 random bits, so a fast hash is enough; nothing to brute-force).
A token is bound to an identity: the owner (default) or a login, whose *local shares* then
apply (tailnet grants and tags belong to devices, which a token does not have).

Tokens look like `lmk_<43 url-safe chars>`, so the servers can tell an lmlink token from a
placeholder API key ("unused", "sk-...") that OpenAI tools insist on sending.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, List

from lmlink.access.identity import Identity
from lmlink.access.shares import NotFound, ShareError, _audit_admin, check_login, iso
from lmlink.access.store import Store

TOKEN_PREFIX = "lmk_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_token_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise ShareError(
            f"token name {name!r} must be letters, digits, '.', '_' or '-' (max 63)"
        )
    return name


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def looks_like_token(text: str) -> bool:
    return text.startswith(TOKEN_PREFIX)


@dataclass(frozen=True)
class TokenInfo:
    id: str
    name: str
    login: str  # "" for the owner
    is_owner: bool
    created_at: float
    created_by: str
    last_used_at: float | None
    revoked_at: float | None

    def identity(self, owner_login: str) -> Identity:
        """Who a request carrying this token is."""
        return Identity(
            login_name=owner_login if self.is_owner else self.login,
            display_name=f"token {self.name}",
            source="token",
            node_name=f"token:{self.name}",
            is_owner=self.is_owner,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "as": "owner" if self.is_owner else self.login,
            "created_at": iso(self.created_at),
            "created_by": self.created_by,
            "last_used_at": iso(self.last_used_at),
            "revoked_at": iso(self.revoked_at),
            "status": "revoked" if self.revoked_at is not None else "active",
        }


def _info(row: Any) -> TokenInfo:
    return TokenInfo(row["id"], row["name"], row["login"], bool(row["is_owner"]),
                     row["created_at"], row["created_by"], row["last_used_at"], row["revoked_at"])


class TokenBook:
    """Create, list, revoke and verify tokens; verification is an in-memory hash lookup."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._lock = threading.Lock()
        self._active: dict[str, TokenInfo] = {}
        self.reload()

    def reload(self) -> None:
        rows = self.store.query("SELECT * FROM tokens WHERE revoked_at IS NULL")
        active = {row["hash"]: _info(row) for row in rows}
        with self._lock:
            self._active = active

    def verify(self, token: str) -> TokenInfo | None:
        """The token's record if it is active, else None (unknown or revoked)."""
        digest = hash_token(token)
        with self._lock:
            for known, info in self._active.items():
                if hmac.compare_digest(known, digest):
                    return info
        return None

    def is_active(self, token_id: str) -> bool:
        with self._lock:
            return any(info.id == token_id for info in self._active.values())

    def create(self, name: str, login: str | None = None, *, by: str = "owner") -> tuple[str, TokenInfo]:
        """(the token, shown once; its record). Raises ShareError on bad input."""
        check_token_name(name)
        if login is not None:
            check_login(login)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = "tk_" + secrets.token_hex(4)
        now = self.clock()
        with self.store.transaction() as db:
            taken = db.execute(
                "SELECT 1 FROM tokens WHERE name = ? AND revoked_at IS NULL", (name,)
            ).fetchone()
            if taken:
                raise ShareError(f"an active token is already named {name!r}; revoke it first")
            db.execute(
                "INSERT INTO tokens (id, name, hash, login, is_owner, created_at, created_by)"
                " VALUES (?,?,?,?,?,?,?)",
                (token_id, name, hash_token(token), login or "", int(login is None), now, by),
            )
            _audit_admin(db, now, by, "token.create",
                         {"token": token_id, "name": name, "as": login or "owner"})
        self.reload()
        return token, self._get(token_id)

    def _get(self, token_id: str) -> TokenInfo:
        rows = self.store.query("SELECT * FROM tokens WHERE id = ?", (token_id,))
        return _info(rows[0])

    def list(self, *, include_revoked: bool = False) -> List[TokenInfo]:
        sql = "SELECT * FROM tokens" + ("" if include_revoked else " WHERE revoked_at IS NULL")
        return [_info(r) for r in self.store.query(sql + " ORDER BY created_at, id")]

    def revoke(self, selector: str, *, by: str = "owner") -> List[TokenInfo]:
        """Revoke by id (`tk_...`) or name; raises ShareError if no active token matches."""
        sel = (selector or "").strip()
        if not sel:
            raise ShareError("name the token to revoke (its name or tk_ id)")
        now = self.clock()
        with self.store.transaction() as db:
            rows = db.execute(
                "SELECT * FROM tokens WHERE (id = ? OR name = ?) AND revoked_at IS NULL",
                (sel, sel),
            ).fetchall()
            if not rows:
                raise NotFound(f"no active token named {sel!r}")
            for row in rows:
                db.execute("UPDATE tokens SET revoked_at = ? WHERE id = ?", (now, row["id"]))
            _audit_admin(db, now, by, "token.revoke", {"tokens": [r["id"] for r in rows]})
        self.reload()
        return [self._get(r["id"]) for r in rows]

    def touch(self, token_id: str, when: float) -> None:
        """Remember when a token was last used (best effort, for `token list`)."""
        with self.store.transaction() as db:
            db.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (when, token_id))
