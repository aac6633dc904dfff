"""The `lmlink` command line, run as a real subprocess against a real server."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from conftest import lmlink_cmd, start_server, stop_server


def lmlink(*args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(lmlink_cmd(*args), capture_output=True, text=True, input=input, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int = 1) -> None:
    """Client commands print exactly one line; `serve` may log before failing, but its
    error is still one final line and never a traceback."""
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    command = result.args[3]
    if command == "serve":
        assert lines[-1].startswith("lmlink serve: "), result.stderr
    else:
        assert len(lines) == 1, result.stderr


def test_help_lists_commands():
    result = lmlink("--help")
    assert result.returncode == 0
    for command in ("serve", "chat", "models", "status"):
        assert command in result.stdout
    assert lmlink("serve", "--help").returncode == 0


def test_no_command_is_usage_error():
    assert lmlink().returncode == 2
    assert lmlink("chat", "--max-tokens", "lots", "hi").returncode == 2


def test_chat_prints_the_answer(server):
    result = lmlink("chat", "--server", server.address, "--max-tokens", "12", "Tell me about the river.")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "no answer printed"


def test_chat_json_emits_one_object_per_event(server):
    result = lmlink("chat", "--server", server.address, "--max-tokens", "8", "--json", "hello")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "completed"
    assert set(kinds[1:-1]) <= {"delta", "prompt_progress"}
    assert events[-1]["usage"]["completion_tokens"] == sum(len(e["token_ids"]) for e in events if e["type"] == "delta")


def test_chat_streams_before_the_answer_is_complete(server):
    proc = subprocess.Popen(
        lmlink_cmd("chat", "--server", server.address, "--json", "--max-tokens", "1500", "--ignore-eos", "--raw", "Once upon a time"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        seen_delta = False
        for line in proc.stdout:
            if json.loads(line)["type"] == "delta":
                seen_delta = True
                break
        assert seen_delta
        assert proc.poll() is None, "the first token should arrive while generation is still running"
    finally:
        proc.terminate()
        proc.wait(10)


def test_chat_reads_prompt_from_stdin(server):
    result = lmlink("chat", "--server", server.address, "--max-tokens", "5", "--json", input="hello from a pipe")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["type"] == "completed"


def test_env_var_selects_server(server, monkeypatch):
    monkeypatch.setenv("LMLINK_SERVER", server.address)
    result = lmlink("models", "--json")
    assert result.returncode == 0, result.stderr
    assert [m["id"] for m in json.loads(result.stdout)] == [server.model]


def test_models_and_status(server):
    table = lmlink("models", "--server", server.address)
    assert table.returncode == 0 and server.model in table.stdout
    status = lmlink("status", "--server", server.address, "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["health"] == "SERVING" and info["caller"]["is_owner"]
    assert info["ranks"] == [] and info["cluster_backend"] == ""  # a single node: no cluster
    human = lmlink("status", "--server", server.address)
    assert "SERVING" in human.stdout and "you are" in human.stdout
    assert "cluster" not in human.stdout


def test_chat_unknown_model_is_one_line(server):
    result = lmlink("chat", "--server", server.address, "--model", "ghost", "hi")
    assert_one_line_error(result)
    assert "ghost" in result.stderr


def test_unreachable_server_is_one_line():
    result = lmlink("status", "--server", "127.0.0.1:1", "--timeout", "3")
    assert_one_line_error(result)
    assert "cannot reach" in result.stderr


def test_serve_refuses_non_loopback_in_local_mode():
    result = lmlink("serve", "--host", "0.0.0.0", "--grpc-port", "0", "--http-port", "0")
    assert_one_line_error(result)
    assert "loopback" in result.stderr


def test_serve_reports_busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = lmlink("serve", "--grpc-port", str(port), "--http-port", "0")
    assert_one_line_error(result)
    assert str(port) in result.stderr


def test_serve_unknown_model_is_one_line(tmp_path):
    result = lmlink("serve", "--model", str(tmp_path), "--grpc-port", "0", "--http-port", "0")
    assert_one_line_error(result)
    assert "config.json" in result.stderr


def test_serve_stops_cleanly_on_sigterm():
    srv = start_server()
    start = time.monotonic()
    stop_server(srv.process)
    assert srv.process.returncode == 0, srv.process.stderr.read()[-2000:]
    assert time.monotonic() - start < 10


def test_enroll_issues_private_client_cert(tmp_path):
    from cryptography import x509

    result = lmlink("enroll", "alice-laptop", "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    key, pem = tmp_path / "out/alice-laptop.key", tmp_path / "out/alice-laptop.pem"
    assert key.stat().st_mode & 0o777 == 0o600 and pem.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "state/tls/ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert "alice-laptop" in cert.subject.rfc4514_string()


def test_enroll_rejects_bad_device_name(tmp_path):
    result = lmlink("enroll", "../evil", "--state-dir", str(tmp_path), "--out", str(tmp_path))
    assert_one_line_error(result, 2)
    assert not list(tmp_path.glob("*.key"))


def test_cluster_ranks_get_the_same_serve_options():
    """`cluster up` hands rank 0 its ServeOptions (no CLI in the rank): nothing is lost."""
    import argparse

    from lmlink.cluster.rank import decode_serve_options, encode_serve_options
    from lmlink.server import ServeOptions

    args = argparse.Namespace(model="builtin", listen="local", grpc_port=0, http_port=None,
                              state_dir="/tmp/somewhere", max_batch=3, max_queue=7,
                              default_max_tokens=9, name="studio", no_mdns=True,
                              verify_position_cost=0.5)
    options = ServeOptions.from_args(args)
    assert options.http_port == 0 and options.engine.max_batch_size == 3 and not options.mdns
    assert options.engine.verify_position_cost == 0.5
    assert decode_serve_options(encode_serve_options(options)[0]) == options


def test_tests_never_use_real_state_or_config_dirs():
    """conftest forces scratch dirs even when the developer exported real ones."""
    import os
    import subprocess
    import sys

    probe = ("import os, conftest; print(os.environ['LMLINK_STATE_DIR']); "
             "print(os.environ['LMLINK_CONFIG_DIR']); print(os.environ.get('LMLINK_SERVER'))")
    env = {**os.environ, "LMLINK_STATE_DIR": "/real/state", "LMLINK_CONFIG_DIR": "/real/config",
           "LMLINK_SERVER": "studio:47470", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, cwd=os.path.dirname(__file__), timeout=60, check=True).stdout
    state, config, server = out.split()
    assert "lmlink-tests-" in state and "lmlink-tests-" in config and server == "None"
