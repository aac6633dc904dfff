"""Tailnet discovery against the LocalAPI stand-in, and the discovery CLI end to end.

In-process: peers from the stand-in (through the product's LocalAPI client) are filtered by the
convention (tag:lmlink, or a host name lmlink / lmlink-*), confirmed with GetServerInfo against
a real `lmlink serve` on loopback, and a relayed peer is refused under direct-only without being
dialled. Nothing here dials anything but loopback.

CLI: in a network namespace of its own (loopback only, so mDNS and every dial stay inside it),
a real local-mode `lmlink serve` is found by `lmlink discover` (mDNS + tailnet + the local
default, merged), `lmlink chat` with no --server and no $LMLINK_SERVER uses discovery,
`lmlink status` shows the path, and relayed paths are refused with one clear line under
--direct-only or `direct_only = true` in config.toml.
"""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmlink.client.discovery import ClientSettings, discover
from lmlink.net.localapi import LocalAPI
from lmlink.net.tailnet_discovery import tailnet_candidates
from support.localapi_standin import LocalAPIStandin, Node, Tailnet
from support.netns import isolated_namespace, lmlink_in, namespaces_left, require_root
from support.checks import one_line_error
from support.procs import read_json_line

ROOT = Path(__file__).resolve().parent.parent
MODEL = "lmlink-tiny"


def tailnet(server_ip: str = "127.0.0.1") -> Tailnet:
    me = Node("laptop.tail1234.ts.net", ["100.101.0.1"], login_name="me@example.com", user_id=1)
    peers = [
        Node("gpu-box.tail1234.ts.net", [server_ip], tags=["tag:lmlink"], cur_addr="192.0.2.9:41641"),
        Node("desk.tail1234.ts.net", ["127.0.0.3"], login_name="me@example.com", user_id=1,
             cur_addr="192.0.2.10:41641"),  # runs nothing we know of: not tagged, not named
        Node("lmlink-mini.tail1234.ts.net", ["100.101.0.7"], login_name="me@example.com",
             user_id=1, relay="fra"),  # named lmlink-*, reachable only through DERP
        Node("old-server.tail1234.ts.net", ["100.101.0.8"], tags=["tag:lmlink"], online=False),
    ]
    return Tailnet(me, peers)


def test_candidates_follow_the_convention(tmp_path):
    with LocalAPIStandin(tmp_path / "ts.sock", tailnet()) as standin:
        peers = LocalAPI(standin.socket_path).peers()
    found = {c.peer.host_name: (c.reason, c.target) for c in tailnet_candidates(peers, port=47470)}
    assert found == {
        "gpu-box": ("tag:lmlink", "127.0.0.1:47470"),
        "lmlink-mini": ("name lmlink-mini", "100.101.0.7:47470"),
    }
    offline = tailnet_candidates(peers, include_offline=True)
    assert "old-server" in {c.peer.host_name for c in offline}
    paths = {p.host_name: p.path for p in peers}
    assert paths["gpu-box"] == "direct" and paths["lmlink-mini"] == "relayed"


def test_tailnet_discovery_confirms_and_refuses_relayed(server, tmp_path, monkeypatch):
    monkeypatch.setenv("LMLINK_CONFIG_DIR", str(tmp_path / "config"))
    port = int(server.address.rsplit(":", 1)[1])
    settings = ClientSettings(tailnet_port=port)
    with LocalAPIStandin(tmp_path / "ts.sock", tailnet()) as standin:
        strict = discover(0.2, mdns=False, include_default=False, settings=settings,
                          localapi_socket=standin.socket_path, direct_only=True)
        listing = discover(0.2, mdns=False, include_default=False, settings=settings,
                           localapi_socket=standin.socket_path, verify=False)
    by_peer = {e.peer.split(".")[0]: e for e in strict}
    assert set(by_peer) == {"gpu-box", "lmlink-mini"}  # untagged and offline peers: not found
    gpu = by_peer["gpu-box"]
    assert gpu.origin == "tailnet" and gpu.status == "ok", gpu
    assert gpu.target == f"127.0.0.1:{port}" and gpu.models == (MODEL,)
    assert gpu.path == "loopback" and gpu.tags == ("tag:lmlink",)
    mini = by_peer["lmlink-mini"]
    assert mini.status == "refused" and mini.path == "relayed"
    assert "relayed via DERP fra" in mini.error and "direct-only" in mini.error
    assert strict.usable == [gpu]
    relayed = {e.peer.split(".")[0]: e for e in listing}["lmlink-mini"]
    assert relayed.status == "unverified" and relayed.path_detail == "relayed via DERP fra"


# ----- the CLI in a namespace of its own ----------------------------------------------------


@pytest.mark.timeout(120)
def test_discovery_cli_in_a_namespace(tmp_path):
    require_root()
    config = tmp_path / "config"
    with LocalAPIStandin(tmp_path / "ts.sock", tailnet()) as standin, \
            isolated_namespace() as ns:
        env = {**os.environ, "LMLINK_CONFIG_DIR": str(config),
               "LMLINK_LOCALAPI_SOCKET": standin.socket_path, "LMLINK_STATE_DIR": str(tmp_path / "s")}
        for var in ("LMLINK_SERVER", "LMLINK_DIRECT_ONLY"):
            env.pop(var, None)
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "lmlink.cli", "serve", "--json",
             "--name", "devbox", "--log-level", "info"],  # default ports 47470 / 47471
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ready = read_json_line(server, timeout=40)
            assert ready["grpc"] == "127.0.0.1:47470"

            res = lmlink_in(ns, "discover", "--timeout", "3", "--json", env=env)
            assert res.returncode == 0, res.stderr
            found = json.loads(res.stdout)
            assert found["mdns_interfaces"] == ["127.0.0.1"]
            [dev] = [e for e in found["endpoints"] if e["name"] == "devbox"]
            # one server, found three ways: mDNS on loopback, the tagged tailnet peer, the default
            assert dev["target"] == "127.0.0.1:47470" and dev["status"] == "ok"
            assert dev["origin"] == "mdns"
            assert set(dev["origins"]) == {"mdns", "tailnet", "configured"}
            assert dev["path"] == "loopback" and dev["models"] == [MODEL]
            assert dev["advertised_fingerprint"] == ""  # local mode: plaintext loopback
            assert dev["http"] == "127.0.0.1:47471" and dev["protocol"] == 1
            [mini] = [e for e in found["endpoints"] if e["target"] == "100.101.0.7:47470"]
            assert mini["status"] == "unreachable" and mini["path"] == "relayed"

            res = lmlink_in(ns, "discover", "--timeout", "1", "--direct-only", env=env)
            assert res.returncode == 0, res.stderr
            [header, *rows] = res.stdout.splitlines()
            assert header.split()[:3] == ["NAME", "ADDRESS", "FOUND"]
            [dev_row] = [r for r in rows if r.startswith("devbox ")]
            assert "127.0.0.1:47470" in dev_row and "mdns+" in dev_row and dev_row.endswith(" ok")
            [mini_row] = [r for r in rows if "100.101.0.7:47470" in r]
            assert "refused: refusing" in mini_row and "relayed via DERP fra" in mini_row

            res = lmlink_in(ns, "chat", "--max-tokens", "6", "--ignore-eos", "Hello", env=env)
            assert res.returncode == 0, res.stderr
            assert res.stdout.strip()
            assert "lmlink: using devbox at 127.0.0.1:47470 (found via " in res.stderr

            res = lmlink_in(ns, "status", env=env)
            assert res.returncode == 0, res.stderr
            assert "path       loopback" in res.stdout.splitlines()
            res = lmlink_in(ns, "status", "--json", "--server", "127.0.0.1:47470", env=env)
            assert json.loads(res.stdout)["path"]["kind"] == "loopback"

            relayed = {**env, "LMLINK_SERVER": "100.101.0.7:47470"}
            line = one_line_error(lmlink_in(ns, "chat", "--direct-only", "Hi", env=relayed), "chat")
            assert "refusing lmlink-mini" in line and "relayed via DERP fra" in line
            config.mkdir(parents=True, exist_ok=True)
            (config / "config.toml").write_text("direct_only = true\n")
            line = one_line_error(lmlink_in(ns, "models", env=relayed), "models")
            assert "relayed via DERP fra" in line
            (config / "config.toml").write_text("direct_only = 3\n")
            line = one_line_error(lmlink_in(ns, "models", env=relayed), "models")
            assert "direct_only must be true or false" in line
            (config / "config.toml").unlink()
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
            _, err = server.communicate(timeout=20)
        assert server.returncode == 0 and "Traceback" not in err, err[-2000:]
        assert "mDNS: advertising devbox._lmlink._tcp.local. on 127.0.0.1" in err

        nothing = {**env, "LMLINK_LOCALAPI_SOCKET": str(tmp_path / "no-tailscaled.sock")}
        line = one_line_error(lmlink_in(ns, "discover", "--timeout", "0.5", env=nothing), "discover")
        took = re.search(r"no lmlink server found in (\d+\.\d+) s", line)
        assert took and 0.5 <= float(took.group(1)) < 1.0, line  # it gave up at its timeout
        line = one_line_error(lmlink_in(ns, "chat", "Hi", env=nothing), "chat")
        assert "no lmlink server found" in line and "--server" in line
    assert ns not in namespaces_left()


@pytest.mark.parametrize("value", ["soon", "0", "-1", "61", "nan"])
def test_discover_rejects_a_bad_timeout(value):
    res = subprocess.run([sys.executable, "-m", "lmlink.cli", "discover", "--timeout", value],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "--timeout" in res.stderr and "Traceback" not in res.stderr
