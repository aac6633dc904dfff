"""`lmlink link` when a server refuses the laptop's user (root only: real namespaces).

A server in tailscaled mode (real `lmlink serve`, its tailnet view from a LocalAPI stand-in)
in one namespace, reached over a real WireGuard tunnel from a laptop namespace where the link
runs and the `openai` package asks it. The laptop's user (eve, 100.87.0.2) is a tailnet peer
with no grant; 100.87.0.3 is not a peer at all. The link must pass the server's refusal on
(403 with the server's reason; 401 is in tests/test_link_refusals.py), not call a server that answered "not you" unreachable
(503, which it keeps for servers that really do not answer), and must still use another
server that serves the model (the laptop's own local server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.localapi_standin import LocalAPIStandin, Node, Tailnet
from support.netns import require_root, wireguard_pair
from support.procs import read_json_line, stop

ROOT = Path(__file__).resolve().parent.parent
ASKER = Path(__file__).resolve().parent / "support" / "link_ask.py"
SERVER, EVE, NOBODY = "100.87.0.1", "100.87.0.2", "100.87.0.3"
MODEL = "lmlink-tiny"
STUDIO = "lmlink-studio.tail1234.ts.net"


def server_view() -> Tailnet:
    me = Node(STUDIO, [SERVER], login_name="owner@example.com", user_id=1)
    eve = Node("eve-laptop.tail1234.ts.net", [EVE], login_name="eve@example.com", user_id=3)
    return Tailnet(me, [eve], cert_domains=[STUDIO])


@pytest.mark.timeout(240)
def test_link_reports_a_refusal_and_fails_over_past_it(tmp_path):
    require_root()
    procs: list[subprocess.Popen] = []
    with LocalAPIStandin(tmp_path / "tailscaled.sock", server_view()) as standin, \
            wireguard_pair([EVE, NOBODY]) as pair:
        env = {**os.environ, "LMLINK_CONFIG_DIR": str(tmp_path / "laptop-config"),
               "LMLINK_STATE_DIR": str(tmp_path / "laptop-state")}

        def ask(*servers: str) -> dict:
            run = subprocess.run(pair.cmd(pair.ns_client, sys.executable, str(ASKER), MODEL, *servers),
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr[-3000:]
            return json.loads(run.stdout.strip().splitlines()[-1])

        try:
            studio = subprocess.Popen(
                pair.cmd(pair.ns_server, sys.executable, "-m", "lmlink.cli", "serve",
                         "--listen", "tailscaled", "--localapi-socket", standin.socket_path,
                         "--state-dir", str(tmp_path / "studio-state"), "--grpc-port", "47470",
                         "--http-port", "47471", "--name", "lmlink-studio", "--no-mdns", "--json",
                         "--log-level", "warning"),
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(studio)
            mine = subprocess.Popen(  # the laptop's own server (local mode: its user owns it)
                pair.cmd(pair.ns_client, sys.executable, "-m", "lmlink.cli", "serve",
                         "--grpc-port", "47480", "--http-port", "0", "--name", "mine", "--no-mdns",
                         "--json", "--log-level", "warning"),
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(mine)
            assert read_json_line(studio, timeout=90)["event"] == "ready"
            assert read_json_line(mine, timeout=90)["event"] == "ready"
            target = f"{SERVER}:47470"

            # eve: a peer without a grant -> 403 with the server's own reason
            pair.use_source(EVE)
            denied = ask(target)
            assert (denied["status"], denied["exception"]) == (403, "PermissionDeniedError"), denied
            assert denied["code"] == "permission_denied"
            assert "eve@example.com" in denied["message"] and "grant" in denied["message"], denied
            assert "lmlink-studio" in denied["message"] or target in denied["message"], denied

            # a refusal does not stop the link from using another server with the model
            served = ask(target, "127.0.0.1:47480")
            assert (served["status"], served["server"]) == (200, "mine"), served
            assert served["text"]

            # not a tailnet peer at all: the server's relay drops the connection unanswered,
            # so for the link it is unreachable (503), as is a port where nothing listens
            pair.use_source(NOBODY)
            for where in (target, f"{SERVER}:47499"):
                gone = ask(where)
                assert (gone["status"], gone["code"]) == (503, "no_server_reachable"), gone
                assert "no lmlink server is reachable" in gone["message"], gone
        finally:
            errs = [stop(p)[1] for p in procs]
    for err in errs:
        assert "Traceback" not in err, err[-3000:]
