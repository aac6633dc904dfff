"""Issue 11 #11: an mDNS answer naming 127.0.0.1 can neither skip the checks nor rank first.

In a network namespace of its own (loopback only): a forged `_lmlink._tcp` answer (sent with
the product's own advertiser, as anyone on the LAN could) names 127.0.0.1:<port> where a
process of another user listens, with no fingerprint. `lmlink discover` must reject it
without dialling it; a plaintext loopback answer for a port this user holds is still fine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlink.client.discovery import Endpoint, rank
from support.netns import require_root
from support.netns import isolated_namespace, lmlink_in

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "support"
NOBODY_LISTENER = (
    "import os, socket, sys, time\n"
    "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "s.listen(); print('listening', flush=True)\n"
    "while True:\n    c, _ = s.accept(); open('/dev/null').close(); c.close();"
    " print('dialled', flush=True)\n"
)


def test_mdns_loopback_answers_rank_below_configured():
    mdns = Endpoint("127.0.0.1:47480", "mdns", path="loopback", status="ok")
    mdns.origins = ("mdns",)
    configured = Endpoint("127.0.0.1:47470", "configured", path="loopback", status="ok")
    configured.origins = ("configured",)
    assert rank(configured) == 0 and rank(mdns) > rank(configured)


@pytest.mark.timeout(90)
def test_forged_loopback_answer_is_rejected_not_dialled(tmp_path):
    require_root()
    with isolated_namespace() as ns:
        env = {**os.environ, "LMLINK_CONFIG_DIR": str(tmp_path / "config"),
               "LMLINK_LOCALAPI_SOCKET": str(tmp_path / "no-tailscaled.sock"),
               "LMLINK_STATE_DIR": str(tmp_path / "s")}
        for var in ("LMLINK_SERVER", "LMLINK_DIRECT_ONLY"):
            env.pop(var, None)
        victim = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                                   NOBODY_LISTENER, "5555"], stdout=subprocess.PIPE, text=True)
        spoof = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(SUPPORT / "mdns_spoof.py"),
             json.dumps([{"name": "evil", "mode": "local", "hosts": ["127.0.0.1"],
                          "port": 5555, "interfaces": "local"}])],
            cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        try:
            assert victim.stdout.readline().strip() == "listening"
            announced = json.loads(spoof.stdout.readline())
            assert announced["loopback_seen"] == ["evil"], announced
            res = lmlink_in(ns, "discover", "--timeout", "2", "--json", env=env)
            assert res.returncode == 1, res.stderr  # nothing usable: the only answer is forged
            assert "no usable lmlink server among 1 found" in res.stderr
            found = json.loads(res.stdout)
            [evil] = [e for e in found["endpoints"] if e["name"] == "evil"]
            assert evil["status"] == "rejected", evil
            assert "not held by a process of this user" in evil["error"]
            time.sleep(0.2)
        finally:
            spoof.terminate()
            victim.kill()
            spoof.wait(10)
            victim.wait(10)
        # the forged address was never dialled
        assert "dialled" not in victim.stdout.read()
