"""The audit trail: who used which model, when, how many tokens, and how it ended.

Every Generate call (gRPC or HTTP) becomes one row of the `requests` table: inserted as
`running` when admitted (or directly with its refusal), its completion-token count and the
quota `usage` buckets advanced together in one transaction as tokens stream (at most a
second behind) and once more when it ends. Counters and audit rows therefore never
disagree, and a `kill -9` loses at most the last second of an unfinished stream's tokens;
nothing is ever counted twice. On the next start, rows still `running` become
`interrupted` (their counted tokens stay charged).

Each final row (and each admin change) is also written as one JSON line to `audit.jsonl`
in the state dir, in commit order; the file is re-synchronised from the database on every
write and on start, so a crash between commit and append loses no line and duplicates none.
Prompt text is recorded only when the owner opted in (`lmlink serve --audit-prompts`), only
for admitted calls (a refused call's prompt is never stored), and capped at
`MAX_PROMPT_CHARS` (longer prompts keep their head plus their length and SHA-256).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmlink.access.shares import iso
from lmlink.access.store import Store

AUDIT_FILE = "audit.jsonl"
MAX_PROMPT_CHARS = 4096  # stored prompt text per request (--audit-prompts)
_TAIL_CHUNK = 65536
FINAL_OUTCOMES = ("completed", "cancelled", "denied", "rate_limited", "quota_exceeded",
                  "revoked", "failed", "interrupted")


@dataclass(eq=False)
class RequestRecord:
    """One Generate call as the audit trail sees it (mutated by its owner task only)."""

    request_id: str
    login: str
    principal: str
    source: str
    node: str
    via: str  # "grpc" | "http"
    model: str
    started_at: float
    credential: str = ""  # token id when a bearer token named the caller
    prompt: str | None = None  # only when the owner opted in
    server: str = ""  # the server run that handled it (see AuditTrail.recover)
    seq: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    outcome: str = "running"
    reason: str = ""
    ended_at: float | None = None
    # quota usage counted in memory but not yet on disk: (window, bucket) -> tokens
    pending: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    dirty: bool = False

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ts": iso(self.ended_at or self.started_at),
            "event": "request",
            "request_id": self.request_id,
            "login": self.login,
            "principal": self.principal,
            "source": self.source,
            "node": self.node,
            "via": self.via,
            "model": self.model,
            "started_at": iso(self.started_at),
            "duration_ms": round(((self.ended_at or self.started_at) - self.started_at) * 1000),
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "outcome": self.outcome,
        }
        if self.credential:
            out["token"] = self.credential
        if self.reason:
            out["reason"] = self.reason
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return out


def capped_prompt(prompt: str | None) -> str | None:
    """A prompt as the audit trail stores it: whole up to MAX_PROMPT_CHARS, else head + digest."""
    if prompt is None or len(prompt) <= MAX_PROMPT_CHARS:
        return prompt
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()
    return (f"{prompt[:MAX_PROMPT_CHARS]}... [truncated: {len(prompt)} chars, "
            f"sha256 {digest}]")


class AuditTrail:
    """Writes request rows, usage buckets and audit records; exports `audit.jsonl`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = store.state_dir / AUDIT_FILE
        self._export_lock = threading.Lock()

    # ----- request lifecycle ----------------------------------------------------------------

    def begin(self, rec: RequestRecord) -> None:
        rec.prompt = capped_prompt(rec.prompt)
        with self.store.transaction() as db:
            cur = db.execute(
                "INSERT INTO requests (request_id, started_at, login, principal, source, node,"
                " credential, via, model, outcome, prompt, server)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.request_id, rec.started_at, rec.login, rec.principal, rec.source, rec.node,
                 rec.credential or None, rec.via, rec.model, "running", rec.prompt,
                 rec.server or None),
            )
            rec.seq = int(cur.lastrowid or 0)

    def flush(self, records: list[RequestRecord]) -> None:
        """Persist streamed token counts (request rows + usage buckets) in one transaction."""
        dirty = [r for r in records if r.dirty and r.seq]
        if not dirty:
            return
        with self.store.transaction() as db:
            for rec in dirty:
                self._write_progress(db, rec)

    def finish(self, rec: RequestRecord) -> None:
        """The final row, its last usage, and its audit record: one transaction, then export."""
        with self.store.transaction() as db:
            if rec.seq:
                self._write_progress(db, rec)
                db.execute(
                    "UPDATE requests SET request_id = ?, ended_at = ?, prompt_tokens = ?,"
                    " cached_tokens = ?, outcome = ?, reason = ? WHERE seq = ?",
                    (rec.request_id, rec.ended_at, rec.prompt_tokens, rec.cached_tokens,
                     rec.outcome, rec.reason, rec.seq),
                )
            else:  # refused before it was admitted: its prompt is never stored
                rec.prompt = None
                cur = db.execute(
                    "INSERT INTO requests (request_id, started_at, ended_at, login, principal,"
                    " source, node, credential, via, model, outcome, reason, prompt)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (rec.request_id, rec.started_at, rec.ended_at, rec.login, rec.principal,
                     rec.source, rec.node, rec.credential or None, rec.via, rec.model,
                     rec.outcome, rec.reason, rec.prompt),
                )
                rec.seq = int(cur.lastrowid or 0)
            db.execute("INSERT INTO audit (record) VALUES (?)",
                       (json.dumps(rec.record(), sort_keys=True),))
        self.export()

    def _write_progress(self, db: Any, rec: RequestRecord) -> None:
        db.execute("UPDATE requests SET completion_tokens = ?, request_id = ? WHERE seq = ?",
                   (rec.completion_tokens, rec.request_id, rec.seq))
        for (window, bucket), tokens in rec.pending.items():
            db.execute(
                "INSERT INTO usage (principal, model, window, bucket, tokens) VALUES (?,?,?,?,?)"
                " ON CONFLICT (principal, model, window, bucket)"
                " DO UPDATE SET tokens = tokens + excluded.tokens",
                (rec.principal, rec.model, window, bucket, tokens),
            )
        rec.pending.clear()
        rec.dirty = False

    def recover(self, now: float, alive: Callable[[str], bool] = lambda server: False) -> int:
        """Mark requests a dead server left `running` as `interrupted`; returns how many.

        `alive(server)` tells whether another server run sharing this state dir is still
        serving (its requests are left alone)."""
        with self.store.transaction() as db:
            rows = [r for r in db.execute("SELECT * FROM requests WHERE outcome = 'running'")
                    if not (r["server"] and alive(r["server"]))]
            for row in rows:
                db.execute(
                    "UPDATE requests SET outcome = 'interrupted', ended_at = ?,"
                    " reason = 'the server stopped during the request' WHERE seq = ?",
                    (now, row["seq"]),
                )
                rec = _from_row(row)
                rec.outcome, rec.ended_at = "interrupted", now
                rec.reason = "the server stopped during the request"
                db.execute("INSERT INTO audit (record) VALUES (?)",
                           (json.dumps(rec.record(), sort_keys=True),))
        self.export()
        return len(rows)

    def usage_rows(self, since_bucket: dict[str, int]) -> list[tuple[str, str, str, int, int]]:
        out: list[tuple[str, str, str, int, int]] = []
        for window, first in since_bucket.items():
            rows = self.store.query(
                "SELECT principal, model, window, bucket, tokens FROM usage"
                " WHERE window = ? AND bucket >= ?", (window, first))
            out.extend((r[0], r[1], r[2], r[3], r[4]) for r in rows)
        return out

    def prune_usage(self, before_bucket: dict[str, int]) -> None:
        with self.store.transaction() as db:
            for window, first in before_bucket.items():
                db.execute("DELETE FROM usage WHERE window = ? AND bucket < ?", (window, first))

    # ----- audit.jsonl ----------------------------------------------------------------------

    def export(self) -> int:
        """Append every audit record the file does not have yet; returns how many."""
        return export_audit(self.store, self.path, self._export_lock)


def export_audit(store: Store, path: Path, lock: threading.Lock | None = None) -> int:
    lock = lock or threading.Lock()
    with lock:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one writer at a time across processes
            last = _last_seq(fd)
            rows = store.query("SELECT id, record FROM audit WHERE id > ? ORDER BY id", (last,))
            if rows:
                lines = [json.dumps({"seq": r["id"], **json.loads(r["record"])}, sort_keys=True)
                         for r in rows]
                data = ("\n".join(lines) + "\n").encode()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            return len(rows)
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _last_seq(fd: int) -> int:
    """The seq of the file's last complete line; a torn last line is cut off first.

    Reads backwards in chunks until a whole line with a seq is found, however long the
    records are (a 64 KiB window used to miss long ones and re-append the whole table).
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    if os.pread(fd, 1, size - 1) != b"\n":  # torn last line (crash mid-append): cut it
        end = _find_back(fd, size, b"\n")
        os.ftruncate(fd, end + 1 if end >= 0 else 0)
        size = end + 1 if end >= 0 else 0
    end = size - 1  # position of the newline that ends the current line
    while end >= 0:
        start = _find_back(fd, end, b"\n") + 1  # first byte of the line ending at `end`
        line = os.pread(fd, end - start, start)
        try:
            return int(json.loads(line)["seq"])
        except (ValueError, KeyError, TypeError):
            end = start - 1
    return 0


def _find_back(fd: int, before: int, byte: bytes) -> int:
    """Offset of the last `byte` in the file before offset `before`, or -1."""
    pos = before
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        cut = os.pread(fd, pos - start, start).rfind(byte)
        if cut >= 0:
            return start + cut
        pos = start
    return -1


def _from_row(row: Any) -> RequestRecord:
    rec = RequestRecord(
        request_id=row["request_id"], login=row["login"], principal=row["principal"],
        source=row["source"], node=row["node"], via=row["via"], model=row["model"],
        started_at=row["started_at"], credential=row["credential"] or "", prompt=row["prompt"],
        seq=row["seq"],
    )
    rec.prompt_tokens, rec.cached_tokens = row["prompt_tokens"], row["cached_tokens"]
    rec.completion_tokens = row["completion_tokens"]
    rec.outcome, rec.reason, rec.ended_at = row["outcome"], row["reason"], row["ended_at"]
    return rec


# ----- summaries (`lmlink usage`) ----------------------------------------------------------


def summarize(store: Store, *, by: str = "user", since: float | None = None) -> list[dict[str, Any]]:
    """Requests and tokens per caller (principal) or per model, newest data included."""
    column = {"user": "principal", "model": "model"}[by]
    rows = store.query(
        f"SELECT {column} AS key, count(*) AS requests,"
        " sum(prompt_tokens) AS prompt_tokens, sum(cached_tokens) AS cached_tokens,"
        " sum(completion_tokens) AS completion_tokens,"
        " sum(outcome = 'completed') AS completed,"
        " sum(outcome IN ('denied', 'rate_limited', 'quota_exceeded', 'revoked')) AS refused,"
        " sum(outcome IN ('failed', 'interrupted')) AS failed,"
        " sum(outcome = 'running') AS running,"
        " min(started_at) AS first, max(coalesce(ended_at, started_at)) AS last"
        " FROM requests WHERE started_at >= ? GROUP BY key"
        " ORDER BY completion_tokens DESC, key",
        (since if since is not None else 0.0,),
    )
    return [
        {
            by: r["key"],
            "requests": r["requests"],
            "prompt_tokens": r["prompt_tokens"] or 0,
            "cached_tokens": r["cached_tokens"] or 0,
            "completion_tokens": r["completion_tokens"] or 0,
            "completed": r["completed"] or 0,
            "refused": r["refused"] or 0,
            "failed": r["failed"] or 0,
            "running": r["running"] or 0,
            "first": iso(r["first"]),
            "last": iso(r["last"]),
        }
        for r in rows
    ]
