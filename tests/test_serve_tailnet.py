"""The real `lmlink serve --listen tailscaled`, end to end over a real WireGuard tunnel (root only).

Server namespace: `python -m lmlink.cli serve --listen tailscaled` with the built-in model, its
tailnet view (addresses, peers, grants, certificate) coming from the LocalAPI stand-in.
Client namespace: the real `lmlink.client.Client` (pinning on first use) acting as four tailnet
peers: the owner's laptop, a teammate granted lmlink-tiny, a teammate granted only another
model, and an address the tailnet does not know. Plus fast checks of the one-line failures of
`serve` when the tailnet is not there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlink.access.policy import CAPABILITY
from lmlink.net.listeners import listening_sockets
from support.localapi_standin import LocalAPIStandin, Tailnet
from support.tailnets import laptop, studio_tailnet
from support.netns import namespaces_left, require_root, wireguard_pair
from support.checks import one_line_error
from support.procs import read_json_line, stop

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "support"
NODE = "100.87.0.1"
MATE, OTHER, OWNER, UNKNOWN = "100.87.0.2", "100.87.0.3", "100.87.0.4", "100.87.0.5"
MODEL = "lmlink-tiny"
WRONG_FP = "sha256:" + "ab" * 32


def the_tailnet() -> Tailnet:
    grant = {"actions": ["generate", "list", "info"]}
    return studio_tailnet(
        NODE,
        laptop("owner", OWNER, 1),
        laptop("mate", MATE, 2, cap_map={CAPABILITY: [{"models": [MODEL], **grant}]}),
        laptop("bob", OTHER, 3, cap_map={CAPABILITY: [{"models": ["qwen-7b"], **grant}]}),
    )


def serve_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "lmlink.cli", "serve", *extra]


@pytest.mark.timeout(120)
def test_serve_tailscaled_over_wireguard(tmp_path):
    require_root()
    t0 = time.monotonic()
    with LocalAPIStandin(tmp_path / "tailscaled.sock", the_tailnet()) as standin, \
            wireguard_pair([OWNER, MATE, OTHER, UNKNOWN]) as pair:
        server = subprocess.Popen(
            pair.cmd(pair.ns_server, *serve_argv(
                "--listen", "tailscaled", "--localapi-socket", standin.socket_path,
                "--state-dir", str(tmp_path / "state"), "--grpc-port", "0", "--http-port", "0",
                "--name", "studio", "--json", "--log-level", "info")),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ready = read_json_line(server, timeout=40)
            assert ready["event"] == "ready", ready
            assert ready["model"] == MODEL and ready["listen"] == "tailscaled"
            grpc_host, grpc_port = ready["grpc"].rsplit(":", 1)
            http_host, http_port = ready["http"].rsplit(":", 1)
            assert grpc_host == http_host == NODE  # only the tailnet address LocalAPI reported
            assert int(grpc_port) > 0 and int(http_port) > 0 and grpc_port != http_port
            assert ready["tls_fingerprint"].startswith("sha256:")

            # nothing in the server namespace listens on a wildcard; public ports on the tunnel
            # IP only, the TLS servers themselves on unix sockets in a private directory (no
            # TCP port a local process could dial: lmlink.net.inner)
            everything = listening_sockets(server.pid, own_only=False)
            assert everything and not [s for s in everything if s.wildcard], everything
            assert {s.host for s in everything} == {NODE}
            ours = {(s.host, s.port) for s in listening_sockets(server.pid)}
            assert {(NODE, int(grpc_port)), (NODE, int(http_port))} <= ours
            assert {h for h, _ in ours} == {NODE}

            cfg = {"server": NODE, "grpc": ready["grpc"], "http": ready["http"],
                   "fingerprint": ready["tls_fingerprint"], "veth": pair.server_veth_ip,
                   "wg_dev": pair.wg_client, "config_dir": str(tmp_path / "client-config"),
                   "model": MODEL, "wrong_fingerprint": WRONG_FP,
                   "sources": {"owner": OWNER, "mate": MATE, "other": OTHER, "unknown": UNKNOWN}}
            (tmp_path / "client.json").write_text(json.dumps(cfg))
            client = subprocess.run(
                pair.cmd(pair.ns_client, sys.executable, str(SUPPORT / "serve_tailnet_client.py"),
                         str(tmp_path / "client.json")),
                cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert client.returncode == 0, client.stderr[-3000:]
            report = json.loads(client.stdout.strip().splitlines()[-1])
            rx, tx = pair.wg_transfer(pair.ns_server, pair.wg_server)
        finally:
            out, err = stop(server)
        assert server.returncode == 0, err[-3000:]
    elapsed = time.monotonic() - t0
    peers = report["peers"]

    # TOFU pinned exactly the certificate the server announced, under the tunnel address
    assert report["pins"]["servers"][ready["grpc"]]["fingerprint"] == ready["tls_fingerprint"]

    owner = peers["owner"]
    assert owner["connect"] == {"ok": ready["tls_fingerprint"]}
    assert owner["info"]["ok"] == {"login_name": "owner@example.com",
                                   "node_name": "owner-laptop.tail1234.ts.net",
                                   "source": "tailnet", "is_owner": True,
                                   "listen_mode": "tailscaled"}
    assert owner["list"] == {"ok": [MODEL]}
    gen = owner["generate"]["ok"]
    assert gen["completion_tokens"] == 16 and gen["finish_reason"] == "length"
    assert gen["deltas"] >= 2  # streamed, not one blob

    mate = peers["mate"]
    assert mate["info"]["ok"]["login_name"] == "mate@example.com"
    assert mate["info"]["ok"]["node_name"] == "mate-laptop.tail1234.ts.net"
    assert mate["info"]["ok"]["source"] == "tailnet" and mate["info"]["ok"]["is_owner"] is False
    assert mate["list"] == {"ok": [MODEL]}
    assert mate["generate"]["ok"]["completion_tokens"] == 16
    assert mate["generate"]["ok"]["deltas"] >= 2

    other = peers["other"]
    assert other["info"]["ok"]["login_name"] == "bob@example.com"
    assert other["info"]["ok"]["is_owner"] is False
    assert other["list"] == {"ok": []}  # lmlink-tiny is not visible to bob
    denied = other["generate"]
    assert denied["code"] == "PERMISSION_DENIED" and denied["error"] == "PermissionDenied"
    assert MODEL in denied["message"] and "bob@example.com" in denied["message"], denied

    stranger = peers["unknown"]  # closed at connect, before TLS: the client cannot even pin
    assert stranger["connect"]["code"] == "UNAVAILABLE", stranger
    assert "cannot reach lmlink server" in stranger["connect"]["message"]
    assert "info" not in stranger

    # the HTTP bridge over HTTPS through the tunnel, certificate checked against the ready line
    http = report["http"]
    assert http["owner_health"] == {"status": 200, "body": {"status": "ok"}}
    assert http["owner_models"]["status"] == 200
    assert [m["id"] for m in http["owner_models"]["body"]["data"]] == [MODEL]
    assert http["other_models"]["status"] == 200 and http["other_models"]["body"]["data"] == []

    # the veth (LAN, non-tailnet) address has nothing listening
    assert report["veth_raw"] == "ConnectionRefusedError"
    assert report["veth_client"]["code"] == "UNAVAILABLE"

    wrong = report["wrong_pin"]
    assert wrong.get("error") == "TrustError", wrong
    assert "SERVER CERTIFICATE CHANGED" in wrong["message"]
    assert ready["tls_fingerprint"] in wrong["message"] and WRONG_FP in wrong["message"]

    # traffic really went through WireGuard; the server asked LocalAPI about each peer
    assert rx > 0 and tx > 0
    for ip in (OWNER, MATE, OTHER, UNKNOWN):
        assert any(r.startswith(f"/localapi/v0/whois?addr={ip}%3A") for r in standin.requests), ip
    assert f"refused {UNKNOWN}:" in err and "not a known tailnet peer" in err
    assert "Traceback" not in err, err[-3000:]
    assert pair.ns_server not in namespaces_left() and pair.ns_client not in namespaces_left()
    assert elapsed < 60, f"took {elapsed:.1f} s"


# ----- fast, no namespaces ------------------------------------------------------------------


def run_serve(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMLINK_STATE_DIR": str(tmp_path / "state")}
    env.pop("TS_AUTHKEY", None)
    return subprocess.run(serve_argv(*extra, "--json"), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)


def one_line_failure(res: subprocess.CompletedProcess) -> str:
    assert res.stdout == ""  # no ready line
    return one_line_error(res, "serve")


def test_tailscaled_without_localapi_fails_in_one_line(tmp_path):
    missing = tmp_path / "no-such-tailscaled.sock"
    line = one_line_failure(run_serve(tmp_path, "--listen", "tailscaled",
                                      "--localapi-socket", str(missing)))
    assert str(missing) in line and "LocalAPI" in line


def test_tsnet_without_tailscale_py_fails_in_one_line(tmp_path):
    try:
        import tailscale  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        pass
    else:
        if hasattr(tailscale, "connect"):
            pytest.skip("tailscale-py is installed here")
    line = one_line_failure(run_serve(tmp_path, "--listen", "tsnet"))
    assert "--listen tsnet needs" in line and "tailscale-py" in line
