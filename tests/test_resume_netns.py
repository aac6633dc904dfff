"""Streams and links across a real WireGuard tunnel whose underlay goes away and comes back
(root only): a stream cut mid-way resumes token for token; after an idle period longer than
the keepalive settings, with the link gone meanwhile, the next request works within a bound.

`lmlink serve --listen tailscaled` runs in one namespace (a LocalAPI stand-in answers WhoIs),
lmlink's client in the other (tests/support/resume_netns_client.py); the parent takes the
client's veth (the "Wi-Fi") down and up.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlink import defaults
from lmlink.access.policy import CAPABILITY
from support.localapi_standin import LocalAPIStandin
from support.netns import require_root, run, wireguard_pair
from support.procs import read_json_line, stop
from support.tailnets import laptop, studio_tailnet

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "support"
NODE, OWNER = "100.87.0.1", "100.87.0.4"
DOWN_MID_STREAM_S = 6.0
# Longer than keepalive time + timeout, so the client's pings find the link dead while idle.
IDLE_DOWN_S = (defaults.KEEPALIVE_TIME_MS + defaults.KEEPALIVE_TIMEOUT_MS) / 1000 + 3


@pytest.mark.timeout(240)
def test_stream_resumes_across_a_dropped_tunnel_and_idle_link_recovers(tmp_path):
    require_root()
    tailnet = studio_tailnet(NODE, laptop("owner", OWNER, 1))
    with LocalAPIStandin(tmp_path / "tailscaled.sock", tailnet) as standin, \
            wireguard_pair([OWNER]) as pair:
        server = subprocess.Popen(
            pair.cmd(pair.ns_server, sys.executable, "-m", "lmlink.cli", "serve",
                     "--listen", "tailscaled", "--localapi-socket", standin.socket_path,
                     "--state-dir", str(tmp_path / "state"), "--grpc-port", "0",
                     "--http-port", "0", "--json", "--log-level", "warning", "--no-mdns"),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ready = read_json_line(server, timeout=40)
            assert ready["event"] == "ready", ready
            cfg = {"grpc": ready["grpc"], "fingerprint": ready["tls_fingerprint"], "tokens": 400}
            (tmp_path / "client.json").write_text(json.dumps(cfg))
            client = subprocess.Popen(
                pair.cmd(pair.ns_client, sys.executable, str(SUPPORT / "resume_netns_client.py"),
                         str(tmp_path / "client.json")),
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
            assert client.stdin is not None and client.stdout is not None
            link = ("ip", "-n", pair.ns_client, "link", "set", pair.veth_client)
            for step, down_for in (("down", DOWN_MID_STREAM_S), ("idle", IDLE_DOWN_S)):
                line = client.stdout.readline().strip()
                assert line == step, (line, client.stderr.read()[-3000:] if not line else "")
                run(*link, "down")
                time.sleep(down_for)
                run(*link, "up")
                client.stdin.write("ok\n")
                client.stdin.flush()
            out, err = client.communicate(timeout=120)
            assert client.returncode == 0, err[-3000:]
            report = json.loads(out.strip().splitlines()[-1])
        finally:
            stop(server)
    print(report)
    cut = report["cut"]
    assert cut["equal"] and cut["resumed"] >= 1, cut
    # The link was down 6 s; once back, the stream continues within a reconnect backoff.
    assert 0 <= cut["seconds_from_link_up_to_next_token"] < 2 * defaults.RECONNECT_MAX_MS / 1000 + 3
    # Idle longer than the keepalive with the link gone: the next request still works, fast.
    assert 0 <= report["idle"]["seconds_to_first_token"] < 2 * defaults.RECONNECT_MAX_MS / 1000 + 3
