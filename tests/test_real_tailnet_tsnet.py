"""`lmlink serve --listen tsnet` as its own tailnet node, against the same real tailnet.

The serving namespace runs no tailscaled of its own: lmlink starts a private userspace-
networking tailscaled child (lmlink/net/tsnet_child.py), joins headscale with a pre-auth key
tagged tag:lmlink, and must then pass the same checks as tailscaled mode, grants included:
bob (team grant) streams, eve (ip grant only) is denied, discovery finds it by its tag.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from support.netns import require_root
from tailnet.bed import namespaces_left, tailnet_bed, wait_for
from tailnet.lab import EVE_DENIED, GRPC_PORT, MODEL, build_lab, lmlink, start_serve
from tailnet.tools import tool

pytestmark = [pytest.mark.real_tailnet, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def lab():
    require_root()
    with tailnet_bed() as bed:
        lab = build_lab(bed, serve=False)
        host = bed.add_host("embed", hostname="lmlink-embedded")
        keyfile = host.dir / "authkey"
        keyfile.write_text(bed.auth_key("alice", ("tag:lmlink",)) + "\n")
        keyfile.chmod(0o600)
        env = {"LMLINK_TAILSCALED": tool("tailscaled"), "TS_DEBUG_USE_DERP_HTTP": "1",
               "TS_DISABLE_PORTMAPPER": "1", "TS_DISABLE_UPNP": "true",
               "TS_PANIC_IF_HIT_MAIN_CONTROL": "1", "TS_NO_LOGS_NO_SUPPORT": "true"}
        os.environ.update(env)  # start_serve passes os.environ on (via node_env)
        t0 = time.monotonic()
        try:
            lab.serving = start_serve(host, "--listen", "tsnet", "--tsnet-hostname", "lmlink-embedded",
                                      "--tsnet-auth-key-file", str(keyfile),
                                      "--tsnet-control-url", bed.url, name="embedded")
        finally:
            for k in env:
                os.environ.pop(k, None)
        lab.timings["tsnet_serve_ready_s"] = time.monotonic() - t0
        m = re.search(r"private tailscaled \(tsnet mode\) up in ([0-9.]+) s", lab.serving.stderr())
        assert m, lab.serving.stderr()[-2000:]  # the child, not tailscale-py, is what serves
        lab.timings["tsnet_child_up_s"] = float(m.group(1))
        lab.embed = host
        # The server is up once it has joined; each laptop can route to it only once headscale
        # has sent the new node to that laptop's tailscaled (seen: over 12 s on a loaded bed,
        # "Network is unreachable" until then). Wait for that signal on every laptop.
        ip = lab.serving.ready["grpc"].split(", ")[0].rsplit(":", 1)[0]
        t1 = time.monotonic()
        for node in (lab.alice, lab.bob, lab.eve):
            wait_for(f"{node.role}'s tailscaled to list the tsnet node {ip}",
                     lambda node=node: any(ip in (p.get("TailscaleIPs") or [])
                                           for p in (node.status().get("Peer") or {}).values()), 60)
        lab.timings["tsnet_in_laptops_netmaps_s"] = time.monotonic() - t1
        print(f"lab timings: {lab.timings}")
        try:
            yield lab
        finally:
            lab.serving.stop()
            print("serve log tail:\n" + lab.serving.stderr()[-1500:])
    assert not namespaces_left(bed.ctl_ns[:-4])


def embedded_ip(lab) -> str:
    return lab.serving.ready["grpc"].split(", ")[0].rsplit(":", 1)[0]


def test_tsnet_node_joined_with_its_tag(lab):
    ip = embedded_ip(lab)
    assert ip.startswith("100.")
    nodes = {n.get("given_name") or n.get("name"): n for n in lab.bed.headscale_nodes()}
    node = nodes["lmlink-embedded"]
    assert "tag:lmlink" in (node.get("tags") or node.get("forced_tags") or []), node
    assert lab.serving.ready["listen"] == "tsnet"
    # the key file was used once; state persists in the state dir (0700)
    assert oct((lab.serving.state_dir / "tsnet").stat().st_mode & 0o777) == "0o700"


def test_tsnet_grants_apply(lab):
    target = f"{embedded_ip(lab)}:{GRPC_PORT}"
    res = lmlink(lab.bob, "status", "--server", target, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["caller"]["login_name"] == "bob@example.com" and info["models"] == [MODEL]
    assert info["listen_mode"] == "tsnet"
    res = lmlink(lab.bob, "chat", "--server", target, "--max-tokens", "8", "--ignore-eos", "hi")
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    res = lmlink(lab.eve, "chat", "--server", target, "hi")
    assert res.returncode != 0 and EVE_DENIED in res.stderr, res.stderr


def test_tsnet_node_discovered_by_tag(lab):
    res = lmlink(lab.alice, "discover", "--json", "--timeout", "1")
    assert res.returncode == 0, res.stderr
    targets = {e["target"]: e for e in json.loads(res.stdout)["endpoints"]}
    e = targets.get(f"{embedded_ip(lab)}:{GRPC_PORT}")
    assert e and e["status"] == "ok", targets


# ----- fast, no namespaces: the child's failure is one line ---------------------------------


def test_tsnet_child_that_dies_is_one_line(tmp_path):
    import subprocess
    import sys

    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in (("tailscaled", "echo 'cannot start' >&2; exit 3"), ("tailscale", "exit 0")):
        (bindir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bindir / name).chmod(0o755)
    env = {**os.environ, "LMLINK_TAILSCALED": str(bindir / "tailscaled"),
           "LMLINK_STATE_DIR": str(tmp_path / "state")}
    res = subprocess.run([sys.executable, "-m", "lmlink.cli", "serve", "--listen", "tsnet", "--json"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stdout == ""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("lmlink serve: tailscaled exited (3)"), lines
