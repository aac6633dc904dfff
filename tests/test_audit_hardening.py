"""Issue 11 #6: audit.jsonl stays one line per record with long prompts; refused prompts unstored.

The real AuditTrail on a real state database, driven the way the Guard drives it: admitted
calls `begin` then `finish`; refused calls only `finish` (no row before the refusal).
"""

from __future__ import annotations

import json
import time

from lmlink.access.audit import MAX_PROMPT_CHARS, AuditTrail, RequestRecord
from lmlink.access.store import Store


def _rec(i: int, prompt: str) -> RequestRecord:
    return RequestRecord(request_id=f"r{i}", login="mate@example.com", principal="mate@example.com",
                         source="tailnet", node="laptop", via="http", model="lmlink-tiny",
                         started_at=time.time(), prompt=prompt)


def test_eight_pairs_with_long_prompts_export_one_line_each(tmp_path):
    store = Store(tmp_path)
    trail = AuditTrail(store)
    long_prompt = "secret plan " * 20_000  # ~240 KB: longer than any fixed tail window
    for i in range(8):
        ok = _rec(2 * i, long_prompt + str(i))
        trail.begin(ok)
        ok.outcome, ok.ended_at, ok.completion_tokens = "completed", time.time(), 5
        trail.finish(ok)
        refused = _rec(2 * i + 1, "refused prompt text " + str(i))
        refused.outcome, refused.ended_at, refused.reason = "denied", time.time(), "no grant"
        trail.finish(refused)
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    rows = store.query("SELECT count(*) AS n FROM audit")[0]["n"]
    assert len(lines) == rows == 16  # one line per record, no re-appended table
    assert [r["seq"] for r in records] == sorted({r["seq"] for r in records})
    done = [r for r in records if r["outcome"] == "completed"]
    denied = [r for r in records if r["outcome"] == "denied"]
    assert len(done) == len(denied) == 8
    for r in done:  # capped: head + length + digest, not 240 KB per row
        assert len(r["prompt"]) < MAX_PROMPT_CHARS + 200
        assert r["prompt"].startswith("secret plan ") and "sha256 " in r["prompt"]
    for r in denied:
        assert "prompt" not in r
    stored = store.query("SELECT prompt, outcome FROM requests")
    assert all(row["prompt"] is None for row in stored if row["outcome"] == "denied")
    assert all(len(row["prompt"]) < MAX_PROMPT_CHARS + 200 for row in stored
               if row["outcome"] == "completed")


def test_a_torn_long_last_line_is_cut_and_nothing_duplicated(tmp_path):
    store = Store(tmp_path)
    trail = AuditTrail(store)
    for i in range(3):
        rec = _rec(i, "p")
        trail.begin(rec)
        rec.outcome, rec.ended_at = "completed", time.time()
        trail.finish(rec)
    path = tmp_path / "audit.jsonl"
    with open(path, "ab") as f:  # a crash in the middle of appending a 200 KB line
        f.write(b'{"seq": 99, "prompt": "' + b"x" * 200_000)
    assert trail.export() == 0
    lines = path.read_text().splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [1, 2, 3]
