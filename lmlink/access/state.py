"""Everything the server knows about access, opened once from the state dir.

`AccessState.open(state_dir)` gives the shares, tokens, quota meter, audit trail and the
`Policy` that unites tailnet grants with local shares. `lmlink share|token|usage` open the
same database directly (they may run while the server does); `poll()` notices their commits
via SQLite's `data_version` and reloads the in-memory views, so a revocation applies at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lmlink.access.audit import AuditTrail
from lmlink.access.identity import Identity
from lmlink.access.policy import Policy
from lmlink.access.quotas import WINDOWS, UsageMeter, Window
from lmlink.access.shares import ShareBook
from lmlink.access.store import Store
from lmlink.access.tokens import TokenBook


def principal_of(identity: Identity) -> str:
    """Whose budget a call spends: the login, or the device for tagged (ownerless) nodes."""
    if identity.tags or not identity.login_name or identity.login_name == "tagged-devices":
        return identity.node_name or identity.login_name or "unknown"
    return identity.login_name


@dataclass
class AccessState:
    store: Store
    shares: ShareBook
    tokens: TokenBook
    meter: UsageMeter
    audit: AuditTrail
    policy: Policy
    owner_login: str = "local"
    audit_prompts: bool = False
    clock: Callable[[], float] = time.time
    server_id: str = ""
    _version: int = field(default=-1, repr=False)
    _lock_fd: int = field(default=-1, repr=False)

    @classmethod
    def open(
        cls,
        state_dir: Path | str,
        *,
        owner_login: str = "local",
        audit_prompts: bool = False,
        windows: dict[str, Window] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> AccessState:
        store = Store(state_dir)
        shares = ShareBook(store, clock)
        state = cls(
            store=store,
            shares=shares,
            tokens=TokenBook(store, clock),
            meter=UsageMeter(windows or WINDOWS),
            audit=AuditTrail(store),
            policy=Policy(local_grants=shares),
            owner_login=owner_login,
            audit_prompts=audit_prompts,
            clock=clock,
        )
        state._version = store.data_version()
        state._hold_server_lock()
        now = clock()
        state.audit.recover(now, alive=state._server_alive)
        state.meter.load(state.audit.usage_rows(state._first_buckets(now)))
        return state

    def _first_buckets(self, now: float) -> dict[str, int]:
        return {w.name: w.bucket(now) - w.buckets + 1 for w in self.meter.windows.values()}

    def poll(self) -> bool:
        """Reload shares and tokens if another process changed the database; True if so."""
        version = self.store.data_version()
        if version == self._version:
            return False
        self._version = version
        self.reload()
        return True

    def reload(self) -> None:
        self.shares.reload()
        self.tokens.reload()

    def prune(self) -> None:
        now = self.clock()
        self.meter.prune(now)
        self.audit.prune_usage(self._first_buckets(now))

    # ----- which server runs are alive (several may share a state dir) ---------------------

    def _lock_path(self, server_id: str) -> Path:
        return self.store.state_dir / "servers" / f"{server_id}.lock"

    def _hold_server_lock(self) -> None:
        """Held (flock) for as long as this server runs; the kernel drops it on kill -9."""
        self.server_id = uuid.uuid4().hex[:16]
        path = self._lock_path(self.server_id)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        for other in path.parent.glob("*.lock"):  # sweep the locks of runs that died
            self._server_alive(other.stem)

    def _server_alive(self, server_id: str) -> bool:
        if server_id == self.server_id:
            return True
        path = self._lock_path(server_id)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        return False

    def close(self) -> None:
        self.store.close()
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                self._lock_path(self.server_id).unlink()
            os.close(self._lock_fd)
            self._lock_fd = -1
