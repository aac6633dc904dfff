"""lmlink.net.localapi against the LocalAPI stand-in (real HTTP over a unix socket)."""

from __future__ import annotations

import http.client
import socket

import pytest

from lmlink.access.policy import CAPABILITY
from lmlink.net.localapi import LocalAPI, LocalAPIError, LocalAPIForbidden, LocalAPIUnavailable
from support.localapi_standin import LocalAPIStandin, Node, Tailnet

GRANT = {"models": ["tiny"], "actions": ["generate", "list"]}


def make_tailnet(**kw) -> Tailnet:
    me = Node("studio.tail1234.ts.net", ["100.87.0.1", "fd7a:115c:a1e0::1"],
              login_name="owner@example.com", display_name="Owner", user_id=1)
    peers = [
        Node("owner-laptop.tail1234.ts.net", ["100.87.0.4"], login_name="owner@example.com",
             user_id=1, cur_addr="192.168.1.20:41641"),
        Node("mate.tail1234.ts.net", ["100.87.0.2", "fd7a:115c:a1e0::2"],
             login_name="mate@example.com", display_name="Team Mate", user_id=2,
             cap_map={CAPABILITY: [GRANT]}),
        Node("ci-runner.tail1234.ts.net", ["100.87.0.3"], tags=["tag:ci"], user_id=1,
             relay="fra"),
    ]
    kw.setdefault("cert_domains", ["studio.tail1234.ts.net"])
    return Tailnet(me, peers, **kw)


@pytest.fixture
def standin(tmp_path):
    with LocalAPIStandin(tmp_path / "tailscaled.sock", make_tailnet()) as s:
        yield s


@pytest.fixture
def api(standin):
    client = LocalAPI(standin.socket_path)
    yield client
    client.close()


def test_self_node_from_status(api, standin):
    me = api.self_node()
    assert me.dns_name == "studio.tail1234.ts.net"
    assert me.tailscale_ips == ("100.87.0.1", "fd7a:115c:a1e0::1")
    assert me.login_name == "owner@example.com"
    assert not me.is_tagged
    assert me.cert_domains == ("studio.tail1234.ts.net",)
    assert "/localapi/v0/status?peers=false" in standin.requests


def test_whois_known_peer_with_grant(api, standin):
    who = api.whois("100.87.0.2", 51234)
    assert who is not None
    assert who.login_name == "mate@example.com"
    assert who.display_name == "Team Mate"
    assert who.node_name == "mate.tail1234.ts.net"
    assert who.source == "tailnet"
    assert who.capabilities == {CAPABILITY: [GRANT]}
    assert who.addresses == ("100.87.0.2", "fd7a:115c:a1e0::2")
    assert not who.is_owner
    assert "/localapi/v0/whois?addr=100.87.0.2%3A51234" in standin.requests


def test_whois_owner_and_tagged(api):
    owner = api.whois("100.87.0.4", 1000)
    assert owner is not None and owner.is_owner
    tagged = api.whois("100.87.0.3", 1000)  # created by the owner, but tagged: not the owner
    assert tagged is not None and not tagged.is_owner
    assert tagged.tags == ("tag:ci",) and tagged.login_name == "tagged-devices"


def test_whois_ipv6_and_mapped_ipv4(api):
    assert api.whois("fd7a:115c:a1e0::2", 443).login_name == "mate@example.com"
    assert api.whois("::ffff:100.87.0.2", 443).login_name == "mate@example.com"


def test_whois_unknown_peer_is_none(api):
    assert api.whois("100.87.0.99", 4000) is None
    assert api.whois("192.168.7.7") is None


def test_tagged_server_has_no_owner(tmp_path):
    net = make_tailnet()
    net.self_node.tags = ["tag:lmlink-server"]
    with LocalAPIStandin(tmp_path / "s.sock", net) as s:
        api = LocalAPI(s.socket_path)
        assert api.self_node().is_tagged
        assert not api.whois("100.87.0.4").is_owner
        # an explicit owner login restores an owner for a tagged server
        api2 = LocalAPI(s.socket_path, owner_login="owner@example.com")
        assert api2.whois("100.87.0.4").is_owner


def test_cert_pair(api):
    cert, key = api.cert_pair("studio.tail1234.ts.net")
    assert cert.startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY-----" in key and b"CERTIFICATE" not in key


def test_cert_for_foreign_domain_is_a_clear_error(api):
    with pytest.raises(LocalAPIError, match="must be one of"):
        api.cert_pair("evil.example.com")


def test_forbidden_maps_to_localapiforbidden(tmp_path):
    with LocalAPIStandin(tmp_path / "s.sock", make_tailnet(permit_cert=False, permit_read=False)) as s:
        api = LocalAPI(s.socket_path)
        with pytest.raises(LocalAPIForbidden, match="cert access denied"):
            api.cert_pair("studio.tail1234.ts.net")
        with pytest.raises(LocalAPIForbidden, match="status access denied"):
            api.self_node()


def test_not_running_backend(tmp_path):
    with LocalAPIStandin(tmp_path / "s.sock", make_tailnet(backend_state="NeedsLogin")) as s:
        with pytest.raises(LocalAPIUnavailable, match="NeedsLogin"):
            LocalAPI(s.socket_path).self_node()


def test_missing_socket_is_unavailable_not_traceback(tmp_path):
    api = LocalAPI(str(tmp_path / "nope.sock"))
    with pytest.raises(LocalAPIUnavailable, match="not reachable at .*nope.sock"):
        api.self_node()
    with pytest.raises(LocalAPIUnavailable):
        api.whois("100.87.0.2")


def test_socket_from_env(standin, monkeypatch):
    monkeypatch.setenv("LMLINK_LOCALAPI_SOCKET", standin.socket_path)
    assert LocalAPI().self_node().dns_name == "studio.tail1234.ts.net"


def test_peers_with_path(api):
    peers = {p.name: p for p in api.peers()}
    assert set(peers) == {"owner-laptop.tail1234.ts.net", "mate.tail1234.ts.net",
                          "ci-runner.tail1234.ts.net"}
    assert peers["owner-laptop.tail1234.ts.net"].path == "direct"
    assert peers["mate.tail1234.ts.net"].path == "relayed"
    assert peers["ci-runner.tail1234.ts.net"].tags == ("tag:ci",)
    assert peers["mate.tail1234.ts.net"].login_name == "mate@example.com"


async def test_awhois_does_not_block(api):
    who = await api.awhois("100.87.0.2", 1)
    assert who is not None and who.login_name == "mate@example.com"


def test_standin_speaks_tailscaled_error_format(standin):
    """Raw HTTP: 404 body and content type as Go's http.Error writes them; bad Host refused."""

    class Conn(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(standin.socket_path)

    c = Conn("local-tailscaled.sock")
    c.request("GET", "/localapi/v0/whois?addr=100.99.0.1:80")
    r = c.getresponse()
    assert (r.status, r.read(), r.getheader("Content-Type")) == (
        404, b"no match for IP:port\n", "text/plain; charset=utf-8")
    c.request("GET", "/localapi/v0/whois?addr=not-an-ip")
    r = c.getresponse()
    assert (r.status, r.read()) == (400, b"invalid 'addr' parameter\n")
    c.request("GET", "/localapi/v0/status", headers={"Host": "evil.example.com"})
    r = c.getresponse()
    assert (r.status, r.read()) == (403, b"invalid localapi request\n")
