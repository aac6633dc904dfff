"""The iPhone path on a real tailnet (root only): headscale + tailscaled in namespaces.

headscale issues no HTTPS certificates, so this is the "project CA" case of README "Phones and
resuming": `lmlink serve` tells the Shortcut URL (the server's MagicDNS name) and that a
profile is needed; `lmlink phone --serve-profile` hands the profile out once over the tailnet;
the "phone" (alice's node) takes the CA out of the downloaded profile (as iOS would install
it) and replays the recipe's exchange (deploy/ios-shortcut.md) against the server's name,
trusting only the system roots plus that CA. `lmlink phone --device` checks grants.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from lmlink.net.mobileconfig import ca_from_profile
from tailnet.lab import EVE_IP_ONLY, HTTP_PORT, lab_policy, lmlink_argv, node_env, running_lab

pytestmark = [pytest.mark.real_tailnet, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "support"
SYSTEM_ROOTS = "/etc/ssl/certs/ca-certificates.crt"
PROFILE_PORT = 47473  # `lmlink phone --serve-profile`'s default port
# What README "Phones and resuming" tells admins to add for the one-time profile download.
PHONE_PROFILE = ('    {"src": ["alice@example.com"], "dst": ["tag:lmlink"], '
                 f'"ip": ["tcp:{PROFILE_PORT}"]}},\n')


def recipe_requests() -> list[list]:
    """Every request block (```http POST ...) in deploy/ios-shortcut.md, parsed (as in
    tests/test_http_bridge.py)."""
    doc = (REPO / "deploy" / "ios-shortcut.md").read_text()
    out = []
    for block in re.findall(r"```http\n(.*?)```", doc, flags=re.S):
        if not block.startswith("POST "):
            continue
        head, _, body = block.partition("\n\n")
        request_line, *header_lines = head.split("\n")
        method, path, _ = request_line.split(" ")
        out.append([method, path, [h.split(": ", 1) for h in header_lines], body.rstrip("\n")])
    return out


@pytest.fixture(scope="module")
def lab():
    with running_lab(lab_policy(extra=EVE_IP_ONLY + PHONE_PROFILE)) as lab:
        yield lab


def phone_cli(lab, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    server = lab.server
    return subprocess.run(
        server.cmd(*lmlink_argv("phone", "--json", "--no-qr", "--state-dir",
                                str(lab.serving.state_dir), "--localapi-socket", server.socket,
                                *args)),
        cwd=REPO, env=node_env(server), capture_output=True, text=True, timeout=timeout)


def test_shortcut_exchange_with_the_profile_ca_over_the_real_tailnet(lab, tmp_path):
    ready = lab.serving.ready
    url = urlsplit(ready["phone_url"])
    # headscale: no HTTPS certificates, so the project CA, and the user is told so
    assert ready["phone_needs_profile"] is True
    assert url.scheme == "https" and url.port == HTTP_PORT and url.path == "/v1/shortcuts/ask"
    assert url.hostname == "studio.tn.lmlink.test"  # the server node's MagicDNS name

    # `lmlink phone` says the same, and serves the profile once on the tailnet address only
    server = lab.server
    proc = subprocess.Popen(
        server.cmd(*lmlink_argv("phone", "--json", "--no-qr", "--serve-profile", "--minutes", "2",
                                "--state-dir", str(lab.serving.state_dir),
                                "--localapi-socket", server.socket)),
        cwd=REPO, env=node_env(server), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = json.loads(proc.stdout.readline())
        assert said["url"] == ready["phone_url"] and said["needs_profile"] is True
        profile_url = urlsplit(said["profile_url"])
        assert profile_url.hostname == server.ip and profile_url.scheme == "http"
        # not on the LAN (underlay) address
        lan = subprocess.run(lab.alice.cmd("curl", "-sS", "-m", "5", "-o", "/dev/null",
                                           f"http://{server.underlay}:{profile_url.port}/"),
                             capture_output=True, text=True, timeout=15)
        assert lan.returncode != 0
        profile = tmp_path / "lmlink.mobileconfig"
        for _ in range(6):  # the policy reload reaches the server's packet filter shortly
            got = subprocess.run(lab.alice.cmd("curl", "-sS", "-m", "8", "-D", "-", "-o",
                                               str(profile), said["profile_url"]),
                                 capture_output=True, text=True, timeout=20)
            if got.returncode == 0:
                break
        assert got.returncode == 0, got.stderr
        assert "content-type: application/x-apple-aspen-config" in got.stdout.lower()
        assert proc.wait(30) == 0  # one download, then it stops
    finally:
        if proc.poll() is None:
            proc.kill()
    ca_pem = ca_from_profile(profile.read_bytes())
    bundle = tmp_path / "phone-trust.pem"
    bundle.write_bytes(Path(SYSTEM_ROOTS).read_bytes() + b"\n" + ca_pem)

    cfg = {"host": url.hostname, "ip": server.ip, "port": url.port, "bundle": str(bundle),
           "system_roots": SYSTEM_ROOTS, "requests": recipe_requests(),
           "conversation_placeholder": "Qm9vTGx5OWtD"}
    (tmp_path / "phone.json").write_text(json.dumps(cfg))
    res = subprocess.run(lab.alice.cmd(sys.executable, str(SUPPORT / "phone_client.py"),
                                       str(tmp_path / "phone.json")),
                         cwd=REPO, env=node_env(lab.alice), capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    # a phone without the profile cannot connect; nor under another name
    assert "tls_error" in report["system_roots_only"], report["system_roots_only"]
    assert "tls_error" in report["wrong_name"], report["wrong_name"]
    first = report["first"]
    assert first["status"] == 200, first
    answer = json.loads(first["body"])
    assert answer["answer"] and answer["conversation"]
    follow = json.loads(report["follow_up"]["body"])
    assert report["follow_up"]["status"] == 200 and follow["conversation"] == answer["conversation"]
    assert report["plain"]["status"] == 200 and not report["plain"]["body"].startswith("{")


def test_status_tells_the_shortcut_url(lab):
    res = subprocess.run(lab.alice.cmd(*lmlink_argv("status", "--server", lab.target(), "--json")),
                         cwd=REPO, env=node_env(lab.alice), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["shortcut_url"] == lab.serving.ready["phone_url"]
    assert info["shortcut_needs_profile"] is True


def test_phone_device_check_uses_the_servers_grants(lab):
    ok = phone_cli(lab, "--device", "alice-laptop")
    assert ok.returncode == 0, ok.stderr
    seen = json.loads(ok.stdout)["device"]
    assert seen["allowed"] is True and seen["login"] == "alice@example.com"
    denied = phone_cli(lab, "--device", "eve-laptop")
    assert denied.returncode == 1
    seen = json.loads(denied.stdout)["device"]
    assert seen["allowed"] is False and seen["reason"]
    unknown = phone_cli(lab, "--device", "nobody-phone")
    assert unknown.returncode == 1 and "no tailnet device" in unknown.stderr
