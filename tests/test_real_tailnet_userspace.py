"""Userspace-networking tailscaled (`--tun=userspace-networking`), server and client side.

The server node's tailscaled has no TUN device: `lmlink serve --listen tailscaled` detects
that from LocalAPI status, listens on 127.0.0.1 where tailscaled forwards incoming tailnet
connections, and identifies each caller by WhoIs on the forwarded address. Any other local
process connecting to that loopback port is unknown to WhoIs and is refused.
alice's laptop is also a userspace node: it reaches the server only through its tailscaled's
HTTP CONNECT proxy (`grpc_proxy`), with the real CLI, discovery and `lmlink link`.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from lmlink.net.listeners import listening_sockets
from support.netns import require_root
from tailnet.bed import namespaces_left, tailnet_bed
from tailnet.lab import EVE_DENIED, GRPC_PORT, HTTP_PORT, MODEL, REPO, build_lab, lmlink, lmlink_argv, node_env

pytestmark = [pytest.mark.real_tailnet, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def lab():
    require_root()
    with tailnet_bed() as bed:
        lab = build_lab(bed, userspace=("server", "alice"))
        print(f"lab timings: {lab.timings}")
        try:
            yield lab
        finally:
            lab.serving.stop()
            print("serve log tail:\n" + lab.serving.stderr()[-1500:])
    assert not namespaces_left(bed.ctl_ns[:-4])


def proxied(lab) -> dict[str, str]:
    return {"grpc_proxy": f"http://{lab.alice.http_proxy}"}


def test_userspace_server_listens_on_loopback_only(lab):
    ready = lab.serving.ready
    assert ready["grpc"].split(", ")[0] == f"{lab.server.ip}:{GRPC_PORT}"  # what clients dial
    socks = listening_sockets(lab.serving.proc.pid, own_only=True)
    assert not [s for s in socks if s.wildcard], socks
    assert {s.host for s in socks} == {"127.0.0.1"}, socks
    assert {(s.host, s.port) for s in socks} >= {("127.0.0.1", GRPC_PORT), ("127.0.0.1", HTTP_PORT)}


def test_forwarded_callers_identified_by_whois(lab):
    res = lmlink(lab.bob, "status", "--server", f"{lab.server.ip}:{GRPC_PORT}", "--json")
    assert res.returncode == 0, res.stderr
    caller = json.loads(res.stdout)["caller"]
    assert caller["login_name"] == "bob@example.com" and caller["node_name"].startswith("bob-laptop.")
    res = lmlink(lab.bob, "chat", "--server", f"{lab.server.ip}:{GRPC_PORT}", "--max-tokens", "8",
                 "--ignore-eos", "hi")
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    res = lmlink(lab.eve, "chat", "--server", f"{lab.server.ip}:{GRPC_PORT}", "hi")
    assert res.returncode != 0 and EVE_DENIED in res.stderr, res.stderr


def test_local_processes_are_not_callers(lab):
    """A process on the server host dialling the loopback port is refused, not the owner."""
    before = lab.serving.stderr().count("refused 127.0.0.1:")
    res = lmlink(lab.server, "status", "--server", f"127.0.0.1:{GRPC_PORT}", "--json")
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr
    res = subprocess.run(lab.server.cmd("curl", "-sk", "-m", "10", f"https://127.0.0.1:{HTTP_PORT}/v1/models"),
                         capture_output=True, text=True, timeout=20)
    assert res.returncode != 0 and "data" not in res.stdout
    log = lab.serving.stderr()
    assert log.count("refused 127.0.0.1:") >= before + 2, log[-2000:]
    assert "not a known tailnet peer" in log


def test_userspace_client_through_tailscaled_proxy(lab):
    target = f"{lab.server.ip}:{GRPC_PORT}"
    # without the proxy, a userspace node has no route to the tailnet: one clear line
    res = lmlink(lab.alice, "status", "--server", target, "--timeout", "5")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    # with tailscaled's HTTP CONNECT proxy: status (pinning included), chat, discover, link
    res = lmlink(lab.alice, "status", "--server", target, "--json", **proxied(lab))
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["caller"]["login_name"] == "alice@example.com" and info["models"] == [MODEL]
    assert info["path"]["kind"] in ("direct", "relayed")
    res = lmlink(lab.alice, "chat", "--server", target, "--max-tokens", "8", "--ignore-eos", "hi",
                 **proxied(lab))
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    res = lmlink(lab.alice, "discover", "--json", "--timeout", "1", **proxied(lab))
    assert res.returncode == 0, res.stderr
    found = [e for e in json.loads(res.stdout)["endpoints"] if e["target"] == target]
    assert found and found[0]["status"] == "ok", res.stdout

    proc = subprocess.Popen(
        lab.alice.cmd(*lmlink_argv("link", "--server", target, "--no-discovery", "--json")),
        cwd=REPO, env=node_env(lab.alice, **proxied(lab)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        url = json.loads(line)["url"].rstrip("/")
        body = json.dumps({"model": MODEL, "max_tokens": 8, "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]})
        res = subprocess.run(lab.alice.cmd("curl", "-sS", "-N", "-m", "60", "--noproxy", "*",
                                           "-H", "content-type: application/json", "-d", body,
                                           f"{url}/chat/completions"),
                             capture_output=True, text=True, timeout=70)
        assert res.returncode == 0 and res.stdout.rstrip().endswith("data: [DONE]"), res
    finally:
        proc.terminate()
        proc.wait(10)
