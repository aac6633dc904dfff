"""`lmlink share|token|usage` on a state dir: bad input is one clear line and changes nothing."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import lmlink_cmd
from lmlink.cli import main

MODEL = "lmlink-tiny"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def fingerprint(state: Path) -> str:
    """Everything a command could change: every table's rows, and the audit file."""
    h = hashlib.sha256()
    if (state / "state.db").exists():
        db = sqlite3.connect(state / "state.db")
        for table in ("shares", "tokens", "usage", "requests", "audit"):
            h.update(json.dumps(db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()).encode())
        db.close()
    if (state / "audit.jsonl").exists():
        h.update((state / "audit.jsonl").read_bytes())
    h.update(json.dumps(sorted(p.name for p in state.iterdir()) if state.exists() else []).encode())
    return h.hexdigest()


@pytest.fixture
def state(tmp_path, capsys) -> Path:
    d = tmp_path / "state"
    assert run(capsys, "share", "add", "alice@example.com", "--model", MODEL,
               "--tokens-per-day", "1000", "--state-dir", str(d))[0] == 0
    assert run(capsys, "token", "create", "--name", "phone", "--state-dir", str(d))[0] == 0
    return d


BAD = [
    # (argv, words expected in the one-line error)
    (["share", "add", "alice", "--model", MODEL], "not a tailnet login"),
    (["share", "add", "alice@", "--model", MODEL], "not a tailnet login"),
    (["share", "add", "@example.com", "--model", MODEL], "not a tailnet login"),
    (["share", "add", "tag:", "--model", MODEL], "tag:NAME"),
    (["share", "add", "group:", "--model", MODEL], "group:NAME"),
    (["share", "add", "team:eng", "--model", MODEL], "not a tailnet login"),
    (["share", "add", "alice@example.com"], "at least one model"),
    (["share", "add", "alice@example.com", "--model", "a b"], "not a model id"),
    (["share", "add", "alice@example.com", "--model", MODEL, "--tokens-per-day", "-5"],
     "--tokens-per-day must be a positive whole number"),
    (["share", "add", "alice@example.com", "--model", MODEL, "--tokens-per-day", "0"],
     "positive whole number"),
    (["share", "add", "alice@example.com", "--model", MODEL, "--tokens-per-day", "1.5"],
     "positive whole number"),
    (["share", "add", "alice@example.com", "--model", MODEL, "--tokens-per-minute", "lots"],
     "--tokens-per-minute must be a positive whole number"),
    (["share", "add", "alice@example.com", "--model", MODEL, "--max-streams", "-1"],
     "--max-streams must be a positive whole number"),
    (["share", "add", "alice@example.com", "--model", MODEL, "--expires", "7x"], "duration"),
    (["share", "add", "alice@example.com", "--model", MODEL, "--expires=-3d"], "duration"),
    (["share", "add", "alice@example.com", "--model", MODEL, "--expires", "-3d"],
     "--expires: expected one argument"),
    (["share", "add", "alice@example.com", "--model", MODEL, "--expires", "0d"],
     "not a positive duration"),
    (["share", "add", "alice@example.com", "--model", MODEL, "--expires", "soon"], "duration"),
    (["share", "add", "alice@example.com", "--model", MODEL, "--expires", "2001-01-01"],
     "in the past"),
    (["share", "add", "alice@example.com", "--model", MODEL, "--action", "admin"],
     "admin stays with the owner"),
    (["share", "add", "alice@example.com", "--model", MODEL, "--action", "sudo"],
     "unknown action"),
    (["share", "add", "alice@example.com", "--model", MODEL, "--frob"], "unrecognized arguments"),
    (["share", "add", "alice@example.com", "--model", MODEL, "--server", "127.0.0.1:1"],
     "not both"),
    (["share", "revoke", "nobody"], "not a tailnet login"),
    (["share", "revoke", "alice@example.com", "--model", "a b"], "not a model id"),
    (["share", "list", "--frob"], "unrecognized arguments"),
    (["share", "frob"], "invalid choice"),
    (["token", "create", "--name", "my phone"], "token name"),
    (["token", "create", "--name", "phone2", "--as", "alice"], "not a tailnet login"),
    (["token", "create", "--name", "phone"], "already named 'phone'"),
    (["token", "create"], "--name"),
    (["token", "revoke", " "], "name the token"),
    (["usage", "--by", "team"], "--by must be user or model"),
    (["usage", "--since", "yesterday"], "duration"),
]


@pytest.mark.parametrize("argv,words", BAD, ids=[" ".join(a[:3]) + f" #{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_input_is_one_line_and_changes_nothing(state, capsys, argv, words):
    before = fingerprint(state)
    code, out, err = run(capsys, *argv, "--state-dir", str(state))
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lmlink {argv[0]}"), lines[0]
    assert words in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    assert fingerprint(state) == before


@pytest.mark.parametrize("argv,words", [
    (["share", "revoke", "#99"], "no active share matches share #99"),
    (["share", "revoke", "bob@example.com"], "no active share matches 'bob@example.com'"),
    (["share", "revoke", "alice@example.com", "--model", "other"], "for other"),
    (["token", "revoke", "laptop"], "no active token named 'laptop'"),
])
def test_revoking_what_does_not_exist_fails_in_one_line(state, capsys, argv, words):
    before = fingerprint(state)
    code, out, err = run(capsys, *argv, "--state-dir", str(state))
    assert code == 1 and len(err.strip().splitlines()) == 1 and words in err, err
    assert fingerprint(state) == before


def test_bad_input_on_a_fresh_state_dir_creates_nothing(tmp_path, capsys):
    d = tmp_path / "fresh"
    code, _, err = run(capsys, "share", "add", "alice", "--model", MODEL, "--state-dir", str(d))
    assert code == 2 and not d.exists()
    # Reading a --state-dir that does not exist is an error (a typo must not look like an
    # empty list), and it creates nothing.
    for argv in (["share", "list"], ["token", "list"], ["usage", "--json"]):
        code, out, err = run(capsys, *argv, "--state-dir", str(d))
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, (argv, err)
        assert "no state dir" in err and not d.exists()


def test_an_existing_empty_state_dir_lists_nothing(tmp_path, capsys):
    d = tmp_path / "empty"
    d.mkdir()
    code, out, _ = run(capsys, "share", "list", "--state-dir", str(d))
    assert code == 0 and "no shares" in out
    code, out, _ = run(capsys, "usage", "--json", "--state-dir", str(d))
    assert code == 0 and json.loads(out)["rows"] == []
    assert list(d.iterdir()) == []


def test_share_lifecycle_and_listing(state, capsys):
    code, out, _ = run(capsys, "share", "add", "tag:ci", "--model", MODEL, "--model", "qwen-*",
                       "--max-streams", "2", "--tokens-per-minute", "1_000", "--expires", "1d12h",
                       "--json", "--state-dir", str(state))
    assert code == 0
    share = json.loads(out)
    assert share["kind"] == "tag" and share["models"] == [MODEL, "qwen-*"]
    assert share["max_streams"] == 2 and share["tokens_per_minute"] == 1000
    assert share["status"] == "active" and share["expires_at"]
    code, out, _ = run(capsys, "share", "list", "--state-dir", str(state))
    assert code == 0 and "alice@example.com" in out and "tag:ci" in out and "2 streams" in out
    code, out, _ = run(capsys, "share", "revoke", f"#{share['id']}", "--state-dir", str(state))
    assert code == 0 and f"revoked share #{share['id']}" in out
    code, out, _ = run(capsys, "share", "list", "--json", "--state-dir", str(state))
    assert [s["principal"] for s in json.loads(out)] == ["alice@example.com"]
    code, out, _ = run(capsys, "share", "list", "--all", "--json", "--state-dir", str(state))
    assert [s["status"] for s in json.loads(out)] == ["active", "revoked"]


def test_revoking_one_model_keeps_the_others(tmp_path, capsys):
    """`share revoke P --model qwen-7b` takes away qwen-7b only, never a `qwen-*` grant."""
    d = str(tmp_path / "state")
    assert run(capsys, "share", "add", "alice@example.com", "--model", "qwen-7b", "--model",
               "qwen-*", "--tokens-per-day", "500", "--expires", "7d", "--state-dir", d)[0] == 0
    assert run(capsys, "share", "add", "alice@example.com", "--model", "qwen-*",
               "--state-dir", d)[0] == 0
    assert run(capsys, "share", "add", "bob@example.com", "--model", "qwen-7b",
               "--state-dir", d)[0] == 0
    code, out, err = run(capsys, "share", "revoke", "alice@example.com", "--model", "qwen-7b",
                         "--state-dir", d)
    assert code == 0, err
    assert "revoked share #1 (alice@example.com: qwen-7b)" in out and "kept qwen-*" in out
    code, out, _ = run(capsys, "share", "list", "--json", "--state-dir", d)
    active = {(s["principal"], tuple(s["models"])): s for s in json.loads(out)}
    assert set(active) == {("alice@example.com", ("qwen-*",)), ("bob@example.com", ("qwen-7b",))}
    kept = [s for s in json.loads(out) if s["principal"] == "alice@example.com"]
    assert len(kept) == 2  # share #2 untouched, plus #1's qwen-* re-granted
    renewed = next(s for s in kept if s["id"] == 4)
    assert renewed["tokens_per_day"] == 500 and renewed["expires_at"]
    # Nothing left to take for that model: one line, exit 1.
    code, _, err = run(capsys, "share", "revoke", "alice@example.com", "--model", "qwen-7b",
                       "--state-dir", d)
    assert code == 1 and len(err.strip().splitlines()) == 1


def test_tokens_are_shown_once_and_stored_hashed(state, capsys):
    code, out, err = run(capsys, "token", "create", "--name", "laptop-script", "--as",
                         "bob@example.com", "--state-dir", str(state))
    assert code == 0
    token = out.strip()
    assert token.startswith("lmk_") and len(token) > 40 and "shown only now" in err
    code, out, _ = run(capsys, "token", "list", "--json", "--state-dir", str(state))
    listed = json.loads(out)
    assert {t["name"]: t["as"] for t in listed} == {"phone": "owner", "laptop-script": "bob@example.com"}
    assert token not in out
    raw = b"".join(p.read_bytes() for p in state.iterdir())
    assert token.encode() not in raw  # only its hash is on disk
    assert hashlib.sha256(token.encode()).hexdigest().encode() in raw


def test_the_real_command_line(tmp_path):
    d = tmp_path / "s"
    res = subprocess.run(lmlink_cmd("share", "add", "alice@example.com", "--model", MODEL,
                                    "--tokens-per-day", "-5", "--state-dir", str(d)),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip() == (
        "lmlink share add: --tokens-per-day must be a positive whole number, got -5")
    res = subprocess.run(lmlink_cmd("share", "add", "alice@example.com", "--model", MODEL,
                                    "--state-dir", str(d)), capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "share #1" in res.stdout


def test_state_dir_default_is_the_servers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMLINK_STATE_DIR", str(tmp_path / "env-state"))
    code, _, _ = run(capsys, "share", "add", "alice@example.com", "--model", MODEL)
    assert code == 0 and (tmp_path / "env-state" / "state.db").exists()
