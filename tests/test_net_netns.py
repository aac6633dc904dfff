"""End to end over a real WireGuard tunnel between two network namespaces (root only).

Server namespace: a tailscaled-mode server (tests/support/tunnel_server.py) whose bind
addresses, peer identities, grants and TLS certificate all come from the LocalAPI stand-in
through the product's LocalAPI client. Client namespace: four tunnel addresses acting as four
tailnet peers (a granted teammate, a teammate without grant, the owner's laptop, and a node
the tailnet does not know).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlink.access.policy import CAPABILITY
from lmlink.net.listeners import listening_sockets
from support.localapi_standin import LocalAPIStandin, Node, Tailnet
from support.netns import namespaces_left, require_root, wireguard_pair

SUPPORT = Path(__file__).resolve().parent / "support"
MATE, NOGRANT, OWNER, UNKNOWN = "100.87.0.2", "100.87.0.3", "100.87.0.4", "100.87.0.5"
MODELS = ["tiny", "qwen-7b", "kimi-k2"]  # what support.probe_service serves

pytestmark = pytest.mark.timeout(120)


def the_tailnet() -> Tailnet:
    me = Node("studio.tail1234.ts.net", ["100.87.0.1"], login_name="owner@example.com",
              display_name="Owner", user_id=1)
    peers = [
        Node("mate-laptop.tail1234.ts.net", [MATE], login_name="mate@example.com", user_id=2,
             cap_map={CAPABILITY: [{"models": ["tiny", "qwen-*"], "actions": ["generate", "list"]}]}),
        Node("bob-laptop.tail1234.ts.net", [NOGRANT], login_name="bob@example.com", user_id=3),
        Node("owner-laptop.tail1234.ts.net", [OWNER], login_name="owner@example.com", user_id=1),
    ]
    return Tailnet(me, peers, cert_domains=["studio.tail1234.ts.net"])


def read_json_line(proc: subprocess.Popen, timeout: float) -> dict:
    """Next JSON line from proc's stdout, within `timeout` seconds."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = proc.stdout.readline()
        if not line:
            break
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    proc.kill()
    raise AssertionError(f"no JSON line from server: {proc.stderr.read()[-3000:]}")


def stop(proc: subprocess.Popen) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=5)


def test_reachable_only_over_the_tailnet(tmp_path):
    require_root()
    net = the_tailnet()
    with LocalAPIStandin(tmp_path / "tailscaled.sock", net) as standin, \
            wireguard_pair([MATE, NOGRANT, OWNER, UNKNOWN]) as pair:
        server = subprocess.Popen(
            pair.cmd(pair.ns_server, sys.executable, str(SUPPORT / "tunnel_server.py"),
                     "--localapi-socket", standin.socket_path, "--state-dir", str(tmp_path / "state")),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ready = read_json_line(server, timeout=30)
            assert ready["event"] == "ready"
            port = ready["addresses"][0][1]
            # bound only to the tailnet address LocalAPI reported, with the tailnet's cert
            assert ready["addresses"] == [["100.87.0.1", port]]
            assert ready["cert_source"] == "tailnet"
            # nothing in the server namespace listens on a wildcard; ours: tunnel IP + loopback
            everything = listening_sockets(ready["pid"], own_only=False)
            assert everything and not [s for s in everything if s.wildcard]
            assert {s.host for s in everything} == {"100.87.0.1", "127.0.0.1"}
            assert {(s.host, s.port) for s in listening_sockets(ready["pid"])} == {
                ("100.87.0.1", port), ("127.0.0.1", ready["internal_port"])}

            cfg = {"server": "100.87.0.1", "port": port, "veth": pair.server_veth_ip,
                   "wg_dev": pair.wg_client, "pin_store": str(tmp_path / "client" / "known.json"),
                   "sources": [MATE, NOGRANT, OWNER, UNKNOWN], "models": MODELS}
            (tmp_path / "client.json").write_text(json.dumps(cfg))
            client = subprocess.run(
                pair.cmd(pair.ns_client, sys.executable, str(SUPPORT / "tunnel_client.py"),
                         str(tmp_path / "client.json")),
                capture_output=True, text=True, timeout=90)
            assert client.returncode == 0, client.stderr[-3000:]
            report = json.loads(client.stdout.strip().splitlines()[-1])
            rx, tx = pair.wg_transfer(pair.ns_server, pair.wg_server)
        finally:
            out, err = stop(server)

    # TOFU over the tunnel pinned exactly the certificate the server serves
    assert report["pin"] == {"fingerprint": ready["fingerprint"], "new": True, "again_new": False}
    peers = report["peers"]

    mate = peers[MATE]
    assert mate["whoami"]["ok"]["login_name"] == "mate@example.com"
    assert mate["whoami"]["ok"]["node_name"] == "mate-laptop.tail1234.ts.net"
    assert mate["list"] == {"ok": ["tiny", "qwen-7b"]}
    assert "ok" in mate["generate"]["tiny"] and "ok" in mate["generate"]["qwen-7b"]
    assert mate["generate"]["kimi-k2"]["code"] == "PERMISSION_DENIED"
    assert "kimi-k2" in mate["generate"]["kimi-k2"]["details"]

    bob = peers[NOGRANT]
    assert bob["whoami"]["ok"]["login_name"] == "bob@example.com"
    assert bob["list"]["code"] == "PERMISSION_DENIED"
    for model in MODELS:
        assert bob["generate"][model]["code"] == "PERMISSION_DENIED"
        assert CAPABILITY in bob["generate"][model]["details"]

    owner = peers[OWNER]
    assert owner["whoami"]["ok"]["is_owner"] is True
    assert owner["list"] == {"ok": MODELS}
    assert all("ok" in owner["generate"][m] for m in MODELS)

    stranger = peers[UNKNOWN]
    assert stranger["whoami"]["code"] == "UNAVAILABLE"  # closed at connect, before TLS
    assert stranger["list"]["code"] == "UNAVAILABLE"

    # the veth (LAN, non-tailnet) address has nothing listening
    assert report["veth_raw"] == "ConnectionRefusedError"
    assert report["veth_grpc"]["code"] == "UNAVAILABLE"

    assert "SERVER CERTIFICATE CHANGED" in report["wrong_pin"]
    assert ready["fingerprint"] in report["wrong_pin"] and "sha256:" + "ab" * 32 in report["wrong_pin"]

    # traffic really went through WireGuard; the server asked LocalAPI about each peer
    assert rx > 0 and tx > 0
    assert any(r.startswith(f"/localapi/v0/whois?addr={UNKNOWN}%3A") for r in standin.requests)
    assert f"refused {UNKNOWN}:" in err and "not a known tailnet peer" in err
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["event"] == "stopped" and stopped["refused"] >= 1 and stopped["accepted"] >= 3
    # and everything was torn down
    assert pair.ns_server not in namespaces_left() and pair.ns_client not in namespaces_left()
    assert not os.path.exists(f"/var/run/wireguard/{pair.wg_server}.sock")


def test_namespaces_torn_down_on_failure():
    require_root()
    names = []
    with pytest.raises(RuntimeError, match="boom"):
        with wireguard_pair() as pair:
            names = [pair.ns_server, pair.ns_client]
            assert set(names) <= set(namespaces_left())
            raise RuntimeError("boom")
    assert names and not set(names) & set(namespaces_left())
    assert not os.path.exists(f"/var/run/wireguard/{pair.wg_client}.sock")


def test_require_root_skips_for_non_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="need root"):
        require_root()
