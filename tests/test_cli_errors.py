"""Every bad input to the command line: one line on stderr, the right exit code, no traceback.

Run as users run it (`python -m lmlink.cli`, a real subprocess). Most cases need no server:
they must fail before anything is dialled or bound.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest

from lmlink.client import Client

from conftest import REPO, lmlink_cmd, start_server, stop_server
from support.procs import die_with_parent


def lmlink(*args: str, env: dict[str, str] | None = None, input: str | None = "",
           timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(lmlink_cmd(*args), capture_output=True, text=True, input=input,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)


def assert_one_line(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    assert lines[0].startswith("lmlink"), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])


USAGE = [  # exit 2: bad input, refused before anything is dialled, bound or written
    (["serve", "--grpc-port", "99999"], "out of range"),
    (["serve", "--http-port", "99999"], "out of range"),
    (["serve", "--grpc-port", "-1"], "out of range"),
    (["link", "--port", "99999"], "out of range"),
    (["chat", "--server", "127.0.0.1:99999", "Hi"], "out of range"),
    (["chat", "--server", "nonsense", "Hi"], "HOST:PORT"),
    (["chat", "--server", "127.0.0.1:", "Hi"], "not a number"),
    (["chat", "--server", "::1:47470", "Hi"], "[ADDRESS]:PORT"),
    (["status", "--server", "bad host:47470"], "host name"),
    (["models", "--server", "127.0.0.1:0"], "out of range"),
    (["link", "--server", "127.0.0.1:70000"], "out of range"),
    (["share", "list", "--server", "127.0.0.1:70000"], "out of range"),
    (["models", "load"], "name the model"),
    (["models", "unload"], "name the model"),
    (["models", "list", "qwen"], "unexpected argument"),
    (["link", "prefer"], "prefer MODEL SERVER"),
    (["link", "prefer", "qwen"], "prefer MODEL SERVER"),
    (["link", "prefs", "extra"], "unexpected arguments"),
    (["serve", "--max-batch", "0"], "at least 1"),
    (["serve", "--idle-ttl", "-1"], "at least 0"),
    (["serve", "--stream-pace-ms", "5000"], "at most 1000"),
    (["chat", "--temperature", "nan", "Hi"], "finite"),
    (["chat", "--temperature", "101", "Hi"], "at most 100"),
    (["chat", "--temperature", "-0.5", "Hi"], "at least 0"),
    (["chat", "--top-p", "0", "Hi"], "more than 0"),
    (["chat", "--top-p", "1.5", "Hi"], "at most 1"),
    (["chat", "--top-k", "-1", "Hi"], "at least 0"),
    (["chat", "--max-tokens", "0", "Hi"], "at least 1"),
    (["chat", "--max-tokens", "-4", "Hi"], "at least 1"),
    (["chat", "--max-tokens", "lots", "Hi"], "whole number"),
    (["chat", "--seed", "-1", "Hi"], "at least 0"),
    (["chat", "--timeout", "0", "Hi"], "more than 0"),
    (["chat", ""], "empty"),
    (["chat", "   "], "empty"),
    (["chat"], "no prompt"),  # stdin is empty (not a terminal)
    (["models", "--drain-timeout", "-3", "unload", "x"], "at least 0"),
    (["discover", "--timeout", "61"], "at most 60"),
    (["enroll", "../evil"], "device name"),
    (["enroll", "laptop", "--days", "0"], "at least 1"),
    (["share", "add", "alice@example.com", "--frob"], "unrecognized"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv,words", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors_exit_2(argv, words, capsys, monkeypatch):
    """In process (`main(argv)`, as the console script calls it) to keep the matrix fast; a
    traceback would surface here as an exception. A sample runs as a real subprocess below."""
    from lmlink.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    assert_one_line(subprocess.CompletedProcess(argv, code, out, err), 2, words)


@pytest.mark.parametrize("argv,words", [USAGE[0], USAGE[5], USAGE[12], USAGE[-9]],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_usage_errors_from_the_real_entry_point(argv, words):
    assert_one_line(lmlink(*argv), 2, words)


def test_bad_lmlink_server_variable_is_a_usage_error():
    result = lmlink("models", env={"LMLINK_SERVER": "127.0.0.1:99999"})
    assert_one_line(result, 2, "$LMLINK_SERVER", "out of range")


def test_serve_state_dir_that_cannot_be_created(tmp_path):
    result = lmlink("serve", "--state-dir", "/proc/nope", "--grpc-port", "0")
    assert_one_line(result, 1, "/proc/nope")
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = lmlink("serve", "--state-dir", str(blocker / "state"), "--grpc-port", "0")
    assert_one_line(result, 1, "state dir")


def test_share_list_on_a_missing_state_dir_is_an_error():
    result = lmlink("share", "list", "--state-dir", "/nonexistent/dir")
    assert_one_line(result, 1, "/nonexistent/dir")
    assert result.stdout == ""


def test_cluster_up_with_a_missing_model_is_one_line():
    result = lmlink("cluster", "up", "cluster/local-2-mpi.toml", "--model", "/nonexistent",
                    "--grpc-port", "0")
    assert_one_line(result, 1, "/nonexistent")


def test_cluster_up_on_a_busy_port_is_one_line_before_any_rank_starts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        start = time.monotonic()
        result = lmlink("cluster", "up", "cluster/local-2-mpi.toml", "--grpc-port", str(port))
    assert_one_line(result, 1, str(port), "in use")
    assert time.monotonic() - start < 20  # refused up front, not after the ranks loaded


def test_cluster_human_output_has_no_json_lines(capsys):
    from lmlink.cli.cluster import render_event

    ready = {"event": "ready", "grpc": "127.0.0.1:5", "http": "127.0.0.1:6", "model": "m",
             "listen": "local", "tls_fingerprint": None}
    for event in (ready, {"event": "progress", "rank": 1, "message": "loading"},
                  {"event": "cluster-failed", "rank": 1, "message": "gone"}):
        render_event(json.dumps(event))
    out, err = capsys.readouterr()
    assert "{" not in out + err
    assert "serving m on 127.0.0.1:5" in err and "http://127.0.0.1:6/v1" in err


def test_enroll_writes_into_a_private_directory(tmp_path):
    state = tmp_path / "state"
    result = subprocess.run(lmlink_cmd("enroll", "alice-laptop", "--state-dir", str(state)),
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = state / "enrolled" / "alice-laptop"
    assert str(out) in result.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in ("alice-laptop.key", "alice-laptop.pem"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # nothing in the cwd


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_discover_failure_is_one_line():
    # A fresh network namespace: no servers, no tailnet; discovery must fail in one line.
    result = subprocess.run(["unshare", "--net", *lmlink_cmd("discover", "--timeout", "0.3")],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "LMLINK_LOCALAPI_SOCKET": "/nonexistent.sock"})
    assert_one_line(result, 1, "no lmlink server found")


# ----- against a real server ---------------------------------------------------------------


@pytest.fixture
def own_server():
    """A server of this test's own: these tests unload its model."""
    srv = start_server()
    yield srv
    stop_server(srv.process)


@pytest.mark.slow
def test_stream_cut_by_unload_fails_and_says_so(own_server):
    chat = subprocess.Popen(
        lmlink_cmd("chat", "--server", own_server.address, "--max-tokens", "2000",
                   "--ignore-eos", "--raw", "Once upon a time"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
    try:
        assert chat.stdout is not None and chat.stdout.read(1), "no text streamed"
        with Client(own_server.address) as owner:
            result = owner.unload_model(own_server.model, cancel_streams=True)
        assert result.cancelled_streams == 1, result
        out, err = chat.communicate(timeout=30)
    finally:
        if chat.poll() is None:
            chat.kill()
    assert chat.returncode == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "ended the answer early" in err and "unloaded" in err
    # With nothing loaded, a chat says so plainly (not "model ''").
    after = lmlink("chat", "--server", own_server.address, "Hi")
    assert_one_line(after, 1, "no model is loaded", "lmlink models load")
    assert "''" not in after.stderr


def test_reflection_lists_every_service(server):
    import grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.address) as channel:
        names = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"lmlink.v1.Inference", "lmlink.v1.Admin", "grpc.health.v1.Health"} <= names


@pytest.mark.slow
def test_default_http_port_follows_grpc_port_0():
    """`--grpc-port 0` alone must not collide on 47471 (e.g. with `make serve` running)."""
    holder = socket.socket()
    try:
        try:
            holder.bind(("127.0.0.1", 47471))
            holder.listen()
        except OSError:
            pass  # already taken by something else: the same situation
        proc = subprocess.Popen(
            lmlink_cmd("serve", "--grpc-port", "0", "--json", "--no-mdns"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            preexec_fn=die_with_parent)
        try:
            assert proc.stdout is not None
            ready = json.loads(proc.stdout.readline() or "{}")
            assert ready.get("event") == "ready", proc.stderr.read() if proc.stderr else ""
            assert not ready["http"].endswith(":47471")
        finally:
            stop_server(proc)
    finally:
        holder.close()


@pytest.mark.cluster
@pytest.mark.slow
def test_cluster_ranks_that_cannot_load_end_without_tracebacks():
    """A Hugging Face id is resolved by each rank (it may be cached there, not here): when it
    is missing, every rank says so in a line and `cluster up` ends with one final line."""
    result = lmlink("cluster", "up", "cluster/local-2-mpi.toml", "--model", "org/not-cached",
                    "--grpc-port", "0", env={"HF_HUB_OFFLINE": "1"}, timeout=180)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "cannot start: model 'org/not-cached' is not in the local cache" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("lmlink cluster: ")
    assert "{" not in result.stdout  # no raw JSON event lines without --json
