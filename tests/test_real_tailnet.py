"""Every tailnet claim against a real tailnet: headscale + tailscaled in namespaces (root only).

One lab per module (tests/tailnet/lab.py): headscale with the policy block from
deploy/tailscale-policy.md, a server node tagged tag:lmlink running
`lmlink serve --listen tailscaled`, and three laptops: alice (admin grant), bob (team grant),
eve (an `ip` grant only). Clients are the real `lmlink` CLI, `lmlink link`, and curl, each run
inside its own node's namespace and talking through that node's tailscaled.
Tests that change the tailnet (policy reload, node deletion) come last; key expiry has a lab of
its own (test_real_tailnet_expiry.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmlink.net.listeners import listening_sockets
from tailnet.bed import wait_for
from tailnet.lab import (EVE_DENIED, GRPC_PORT, HTTP_PORT, MODEL, Lab, lab_policy, lmlink,
                         running_lab, tailscale_ping)

pytestmark = [pytest.mark.real_tailnet, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def lab():
    with running_lab() as lab:
        yield lab


def status(lab: Lab, who: str, **env: str) -> subprocess.CompletedProcess:
    return lmlink(lab.clients[who], "status", "--server", lab.target(), "--json", **env)


def chat(lab: Lab, who: str, *extra: str, tokens: int = 12) -> subprocess.CompletedProcess:
    return lmlink(lab.clients[who], "chat", "--server", lab.target(), "--max-tokens", str(tokens),
                  "--ignore-eos", "--json", *extra, "Hello over a real tailnet")


def events(res: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def curl(node, *args: str) -> tuple[int, str]:
    res = subprocess.run(node.cmd("curl", "-sS", "-m", "30", "-w", "\n%{http_code}", *args),
                         capture_output=True, text=True, timeout=40)
    body, _, code = res.stdout.rpartition("\n")
    return int(code or 0), body


# -- where it listens ---------------------------------------------------------------------


def test_serve_binds_only_tailnet_addresses(lab):
    ready = lab.serving.ready
    assert ready["listen"] == "tailscaled" and ready["model"] == MODEL
    v6 = lab.server.ips[1]
    assert ready["grpc"] == f"{lab.server.ip}:{GRPC_PORT}, [{v6}]:{GRPC_PORT}"
    assert ready["http"] == f"{lab.server.ip}:{HTTP_PORT}, [{v6}]:{HTTP_PORT}"
    socks = listening_sockets(lab.serving.proc.pid, own_only=False)
    assert socks and not [s for s in socks if s.wildcard], socks
    public = {(s.host, s.port) for s in socks if s.port in (GRPC_PORT, HTTP_PORT)}
    # every tailnet address tailscaled reports (IPv4 and IPv6), nothing else
    assert public == {(ip, p) for ip in lab.server.ips for p in (GRPC_PORT, HTTP_PORT)}, public
    hosts = {s.host for s in socks}
    assert hosts <= set(lab.server.ips) | {"127.0.0.1"}, hosts
    # the LAN (underlay) address of the server has nothing listening
    probe = subprocess.run(lab.alice.cmd("curl", "-sS", "-m", "5",
                                         f"http://{lab.server.underlay}:{GRPC_PORT}/"),
                           capture_output=True, text=True, timeout=15)
    assert "Connection refused" in probe.stderr or "Failed to connect" in probe.stderr, probe.stderr


def test_nothing_can_be_dialled_outside(lab):
    """No namespace of the bed has a default route; the only DERP region is headscale's own."""
    for node in [lab.server, *lab.clients.values()]:
        routes = subprocess.run(node.cmd("ip", "-4", "route", "show"), capture_output=True,
                                text=True, timeout=10).stdout
        assert "default" not in routes, (node.role, routes)
        netcheck = node.tailscale("netcheck", "--format=json", timeout=60)
        regions = set((json.loads(netcheck).get("RegionLatency") or {}).keys())
        assert regions == {"900"}, regions  # reachable: headscale's embedded DERP, nothing else
    routes = subprocess.run(["ip", "-n", lab.bed.ctl_ns, "-4", "route", "show"],
                            capture_output=True, text=True, timeout=10).stdout
    assert "default" not in routes, routes


# -- who may do what: gRPC ------------------------------------------------------------------


def test_grpc_identity_from_real_whois(lab):
    seen = {}
    for who in ("alice", "bob"):
        res = status(lab, who)
        assert res.returncode == 0, res.stderr
        seen[who] = json.loads(res.stdout)
    for who, email in (("alice", "alice@example.com"), ("bob", "bob@example.com")):
        caller = seen[who]["caller"]
        assert caller["login_name"] == email, caller
        assert caller["source"] == "tailnet" and caller["is_owner"] is False  # tagged server
        assert caller["node_name"].startswith(f"{who}-laptop."), caller
        assert seen[who]["listen_mode"] == "tailscaled"
    assert seen["alice"]["models"] == [MODEL] and seen["bob"]["models"] == [MODEL]
    # eve reaches the port (ip grant) but holds no capability: even server info is refused,
    # naming her real tailnet login
    res = status(lab, "eve")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert EVE_DENIED in res.stderr, res.stderr
    # the path comes from the client's own tailscaled
    assert seen["bob"]["path"]["kind"] in ("direct", "relayed"), seen["bob"]["path"]
    assert seen["bob"]["path"]["peer"].startswith("studio.")


def test_grpc_generate_granted_and_denied(lab):
    for who in ("alice", "bob"):
        res = chat(lab, who)
        assert res.returncode == 0, res.stderr
        evs = events(res)
        deltas = [e for e in evs if e.get("type", e.get("event")) in ("token", "delta", "TokenDelta")
                  or "text" in e]
        done = [e for e in evs if "finish_reason" in e]
        assert done and done[-1]["finish_reason"] == "length", evs
        assert done[-1]["usage"]["completion_tokens"] == 12
        assert len(deltas) >= 2, evs  # streamed, not one blob
    res = chat(lab, "eve")
    assert res.returncode != 0
    assert EVE_DENIED in res.stderr and "Traceback" not in res.stderr, res.stderr


# -- the HTTP bridge --------------------------------------------------------------------------


def test_http_bridge_granted_and_denied(lab):
    ca = lab.serving.state_dir / "tls" / "ca.pem"
    url = f"https://{lab.server.ip}:{HTTP_PORT}"
    body = json.dumps({"model": MODEL, "max_tokens": 8, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]})
    for who in ("alice", "bob"):
        node = lab.clients[who]
        code, text = curl(node, "--cacert", str(ca), f"{url}/v1/models")
        assert code == 200 and [m["id"] for m in json.loads(text)["data"]] == [MODEL], text
        code, text = curl(node, "-N", "--cacert", str(ca), "-H", "content-type: application/json",
                          "-d", body, f"{url}/v1/chat/completions")
        assert code == 200, text
        chunks = [line for line in text.splitlines() if line.startswith("data: {")]
        assert len(chunks) >= 2 and text.rstrip().endswith("data: [DONE]"), text[-500:]
    for path, data in (("/v1/models", ()), ("/v1/chat/completions", ("-d", body))):
        code, text = curl(lab.eve, "--cacert", str(ca), "-H", "content-type: application/json",
                          *data, f"{url}{path}")
        assert code == 403, (path, code, text)
        assert EVE_DENIED in json.loads(text)["error"]["message"], text


# -- lmlink link on a laptop -----------------------------------------------------------------


def start_link(lab: Lab, who: str) -> tuple[subprocess.Popen, str]:
    node = lab.clients[who]
    from tailnet.lab import REPO, lmlink_argv, node_env

    proc = subprocess.Popen(
        node.cmd(*lmlink_argv("link", "--server", lab.target(), "--no-discovery", "--json")),
        cwd=REPO, env=node_env(node), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(proc.stderr.read() if proc.stderr else "link exited")
    return proc, json.loads(line)["url"]


def test_link_granted_and_denied(lab):
    body = json.dumps({"model": MODEL, "max_tokens": 8, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]})
    results = {}
    for who in ("bob", "eve"):
        proc, url = start_link(lab, who)
        try:
            results[who] = curl(lab.clients[who], "-N", "-H", "content-type: application/json",
                                "-d", body, f"{url.rstrip('/')}/chat/completions")
        finally:
            proc.terminate()
            proc.wait(10)
    code, text = results["bob"]
    assert code == 200, text
    assert len([x for x in text.splitlines() if x.startswith("data: {")]) >= 2, text
    code, text = results["eve"]
    # the link's only server refuses her: the link says so (403), with the server's reason
    assert code == 403, (code, text)
    assert EVE_DENIED in json.loads(text)["error"]["message"], text


# -- discovery and TLS pinning -----------------------------------------------------------------


def test_discover_finds_tagged_server_via_real_localapi(lab):
    res = lmlink(lab.bob, "discover", "--json", "--timeout", "1")
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)["endpoints"]
    mine = [e for e in found if e["target"] == lab.target()]
    assert mine, found
    e = mine[0]
    assert "tailnet" in "+".join(e["origins"]) and e["status"] == "ok", e
    assert e["path"] in ("direct", "relayed")


def test_tls_pin_over_tailnet(lab):
    res = status(lab, "alice")
    assert res.returncode == 0, res.stderr
    pins = json.loads((lab.alice.dir / "lmlink-config" / "known_servers.json").read_text())
    assert pins["servers"][lab.target()]["fingerprint"] == lab.serving.fingerprint
    # a different pinned fingerprint (as if the server's certificate were swapped): refused loudly
    cfg = lab.bob.dir / "lmlink-config-wrongpin"
    cfg.mkdir(mode=0o700, exist_ok=True)
    wrong = "sha256:" + "ab" * 32
    pinned = json.loads((lab.alice.dir / "lmlink-config" / "known_servers.json").read_text())
    pinned["servers"][lab.target()]["fingerprint"] = wrong
    (cfg / "known_servers.json").write_text(json.dumps(pinned))
    (cfg / "known_servers.json").chmod(0o600)
    res = lmlink(lab.bob, "status", "--server", lab.target(), LMLINK_CONFIG_DIR=str(cfg))
    assert res.returncode != 0
    assert "SERVER CERTIFICATE CHANGED" in res.stderr and wrong in res.stderr, res.stderr
    assert lab.serving.fingerprint in res.stderr


# -- local shares keyed by the real WhoIs login ------------------------------------------------


def test_local_share_for_a_real_tailnet_login(lab):
    """A share for eve's real WhoIs login opens the model to her; revoking closes it again."""
    assert chat(lab, "eve").returncode != 0
    # a tagged server has no owner: even the admin grant cannot manage shares remotely
    res = lmlink(lab.alice, "share", "add", "eve@example.com", "--model", MODEL,
                 "--server", lab.target())
    assert res.returncode != 0 and "is not the owner of this server" in res.stderr, res.stderr
    state = str(lab.serving.state_dir)  # so the operator does it on the server machine
    res = lmlink(lab.server, "share", "add", "eve@example.com", "--model", MODEL,
                 "--state-dir", state)
    assert res.returncode == 0, res.stderr
    res = chat(lab, "eve")
    assert res.returncode == 0, res.stderr
    assert events(res)[-1]["usage"]["completion_tokens"] == 12
    res = lmlink(lab.server, "share", "revoke", "eve@example.com", "--state-dir", state)
    assert res.returncode == 0, res.stderr
    res = chat(lab, "eve")
    assert res.returncode != 0 and EVE_DENIED in res.stderr, res.stderr


# -- direct vs relayed, for real ----------------------------------------------------------------


def path_of(lab: Lab, who: str) -> dict:
    res = status(lab, who)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["path"]


def wait_path(lab: Lab, who: str, kind: str, timeout: float = 45.0) -> dict:
    """Poke the path with disco pings until the client's tailscaled reports `kind`."""
    node = lab.clients[who]

    def check():
        tailscale_ping(node, lab.server, count=3)
        p = path_of(lab, who)
        return p if p["kind"] == kind else None

    return wait_for(f"{who}'s path to become {kind}", check, timeout, interval=0.5)


def latency(lab: Lab, who: str, rounds: int = 8) -> dict:
    from tailnet.lab import REPO, node_env

    node = lab.clients[who]
    proc, url = start_link(lab, who)
    try:
        res = subprocess.run(
            node.cmd(sys.executable, str(REPO / "tests" / "tailnet" / "latency_client.py"),
                     f"https://{lab.server.ip}:{HTTP_PORT}",
                     str(lab.serving.state_dir / "tls" / "ca.pem"), url, MODEL, str(rounds)),
            cwd=REPO, env=node_env(node, PYTHONPATH=f"{REPO}:{REPO / 'tests'}"),
            capture_output=True, text=True, timeout=300)
    finally:
        proc.terminate()
        proc.wait(10)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_direct_then_relayed_then_direct(lab):
    bob, server = lab.bob, lab.server
    direct = wait_path(lab, "bob", "direct")
    assert direct["cur_addr"].startswith(server.underlay + ":"), direct
    assert "via " + server.underlay in tailscale_ping(bob, server, count=1)
    numbers = {"direct": latency(lab, "bob")}

    lab.bed.block_direct(bob, server)  # nftables: no UDP between their underlay addresses
    try:
        relayed = wait_path(lab, "bob", "relayed")
        assert relayed["relay"] == "lmlinktest" and relayed["cur_addr"] == "", relayed
        assert "via DERP(lmlinktest)" in tailscale_ping(bob, server, count=1)
        # still served, through headscale's embedded DERP
        res = chat(lab, "bob")
        assert res.returncode == 0, res.stderr
        # --direct-only refuses, with one line naming the relay
        res = chat(lab, "bob", "--direct-only")
        assert res.returncode != 0 and "relayed" in res.stderr and "Traceback" not in res.stderr
        res = lmlink(bob, "discover", "--json", "--timeout", "1", "--direct-only")
        found = [e for e in json.loads(res.stdout or "{}").get("endpoints", [])
                 if e["target"] == lab.target()]
        assert found and found[0]["path"] == "relayed" and not found[0]["status"] == "ok", (res.stdout, res.stderr)
        numbers["relayed"] = latency(lab, "bob")
    finally:
        lab.bed.unblock_direct(bob, server)
    again = wait_path(lab, "bob", "direct")
    assert again["cur_addr"].startswith(server.underlay + ":")
    assert chat(lab, "bob", "--direct-only").returncode == 0
    print("link hop over the real tailnet (medians):", json.dumps(numbers))
    for kind in ("direct", "relayed"):
        assert numbers[kind]["added"]["ttft_ms"] < 100, numbers
        assert numbers[kind]["added"]["per_token_ms"] < 5, numbers
    out = os.environ.get("LMLINK_BENCH_OUT")
    if out:
        Path(out).write_text(json.dumps(numbers, indent=1))


# -- changes to the tailnet: revocation, deletion, expiry ---------------------------------------


def test_policy_reload_revokes_running_stream(lab):
    from tailnet.lab import REPO, lmlink_argv, node_env

    bob = lab.bob
    proc = subprocess.Popen(
        bob.cmd(*lmlink_argv("chat", "--server", lab.target(), "--max-tokens", "2000",
                             "--ignore-eos", "--json", "a long answer please")),
        cwd=REPO, env=node_env(bob), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("{"), proc.stderr.read() if proc.stderr else first
        assert proc.poll() is None
        drain = threading.Thread(target=proc.stdout.read, daemon=True)  # never block the stream
        drain.start()
        # the admin narrows the team's grant to the Qwen family and reloads headscale
        narrowed = lab_policy().replace('"models": ["qwen-*", "lmlink-tiny"]', '"models": ["qwen-*"]')
        assert narrowed != lab_policy()
        t0 = time.monotonic()
        lab.bed.set_policy(narrowed)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail("stream still running 15 s after the policy change")
        elapsed = time.monotonic() - t0
        err = proc.stderr.read() if proc.stderr else ""
        print(f"revoked {elapsed:.2f} s after SIGHUP")
        assert proc.returncode != 0
        assert "revoked" in err.lower() or "PERMISSION_DENIED" in err, err
        # README: within 2 s of a tailnet policy change (re-check period), plus the real
        # headscale -> tailscaled propagation
        assert elapsed < 3.5, f"revocation took {elapsed:.2f} s"
        # a new call is refused at once; models are no longer listed
        res = status(lab, "bob")
        assert res.returncode == 0 and json.loads(res.stdout)["models"] == []
        res = chat(lab, "bob")
        assert res.returncode != 0 and MODEL in res.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        lab.bed.set_policy(lab_policy())
    wait_for("bob's grant to come back",
             lambda: json.loads(status(lab, "bob").stdout or "{}").get("models") == [MODEL], 20)


def test_deleted_node_loses_access(lab):
    res = chat(lab, "bob")
    assert res.returncode == 0, res.stderr
    accepted = lab.serving.stderr().count("accepted bob@example.com")
    node_id = lab.bed.headscale_id(lab.bob)
    lab.bed.headscale("nodes", "delete", "--identifier", str(node_id), "--force", json_out=False)
    # the server forgets the peer: new connections are refused before TLS
    wait_for("server to drop bob", lambda: lab.server.peer_status(lab.bob) is None, 20)
    res = lmlink(lab.bob, "status", "--server", lab.target(), "--timeout", "5")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and "cannot reach" in res.stderr, res.stderr
    # the server's tailscaled drops the packets: lmlink never even sees a connection from bob
    assert lab.serving.stderr().count("accepted bob@example.com") == accepted
