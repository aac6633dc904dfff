"""The server's durable access state: one SQLite file (`state.db`) in the state dir.

Why SQLite: shares, tokens and usage counters must survive `kill -9` and restarts without
losing or double-counting anything, and the `lmlink share|token|usage` commands (separate
processes) must be able to change them while a server runs. SQLite in WAL mode gives atomic,
durable transactions against process crashes (a killed process never leaves a half-applied
update), readers that never block the server, and `PRAGMA data_version` to notice another
process's changes cheaply.

The schema is versioned with `PRAGMA user_version`; `MIGRATIONS[i]` upgrades version i to
i+1 inside one transaction, so a crash mid-upgrade leaves the old version intact. A database
written by a newer lmlink (higher version) is refused rather than guessed at.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

DB_NAME = "state.db"

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: shares, tokens, usage buckets, request audit trail, audit records
    """
    CREATE TABLE shares (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        principal TEXT NOT NULL,
        models TEXT NOT NULL,
        actions TEXT NOT NULL,
        max_streams INTEGER,
        tokens_per_minute INTEGER,
        tokens_per_day INTEGER,
        created_at REAL NOT NULL,
        created_by TEXT NOT NULL,
        expires_at REAL,
        revoked_at REAL,
        revoked_by TEXT
    );
    CREATE INDEX shares_principal ON shares(principal);
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        login TEXT NOT NULL,
        is_owner INTEGER NOT NULL,
        created_at REAL NOT NULL,
        created_by TEXT NOT NULL,
        last_used_at REAL,
        revoked_at REAL
    );
    CREATE TABLE usage (
        principal TEXT NOT NULL,
        model TEXT NOT NULL,
        window TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        PRIMARY KEY (principal, model, window, bucket)
    ) WITHOUT ROWID;
    CREATE TABLE requests (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        login TEXT NOT NULL,
        principal TEXT NOT NULL,
        source TEXT NOT NULL,
        node TEXT NOT NULL,
        credential TEXT,
        via TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        outcome TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        prompt TEXT
    );
    CREATE INDEX requests_started ON requests(started_at);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        record TEXT NOT NULL
    );
    """,
    # 1 -> 2: which server run handled a request, so a starting server only marks the
    # requests of dead runs as interrupted when several share one state dir
    """
    ALTER TABLE requests ADD COLUMN server TEXT;
    CREATE INDEX requests_running ON requests(outcome) WHERE outcome = 'running';
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """The state database cannot be opened or used; one-line reason."""


def private_state_dir(path: Path) -> Path:
    """Create the state dir 0700 if missing (keys and the database live there)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


class Store:
    """One connection to `state.db`, shared by the threads of one process under a lock.

    Every write goes through `transaction()` (BEGIN IMMEDIATE ... COMMIT): either all of it
    is on disk or none of it, also when the process is killed in the middle.
    """

    def __init__(self, state_dir: Path | str, *, create: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        if not create and not self.path.exists():
            raise StoreError(f"no lmlink state in {self.state_dir} (nothing shared yet)")
        try:
            private_state_dir(self.state_dir)
            fresh = not self.path.exists()
            self._db = sqlite3.connect(
                self.path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
            if fresh:
                os.chmod(self.path, 0o600)
            self._db.row_factory = sqlite3.Row
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            # NORMAL in WAL mode: a committed transaction survives any process crash
            # (kill -9); only an OS crash / power loss may drop the last commits.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=10000")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from None
        except PermissionError as exc:
            raise StoreError(f"cannot open {self.path}: {exc.strerror}") from None
        self._lock = threading.RLock()
        self._migrate()

    # ----- schema -----------------------------------------------------------------------

    @property
    def version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                current = self.version
                if current > SCHEMA_VERSION:
                    self._db.execute("ROLLBACK")
                    raise StoreError(
                        f"{self.path} has schema version {current}, newer than this lmlink "
                        f"understands ({SCHEMA_VERSION}); upgrade lmlink"
                    )
                for version in range(current, SCHEMA_VERSION):
                    for statement in _statements(MIGRATIONS[version]):
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version={version + 1}")
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise StoreError(f"cannot prepare {self.path}: {exc}") from None

    # ----- access -----------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def data_version(self) -> int:
        """Changes whenever *another* connection commits (e.g. an `lmlink share` command)."""
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
