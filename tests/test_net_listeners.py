"""Listen modes -> bind addresses; the /proc wildcard-listener check."""

from __future__ import annotations

import os
import socket

import pytest

from lmlink.net.listeners import (
    ListenError,
    assert_no_wildcard,
    assert_plaintext_allowed,
    bind_hosts,
    is_wildcard,
    listening_sockets,
    local_bind_hosts,
    tailscaled_bind_hosts,
    wildcard_listeners,
)
from lmlink.net.localapi import LocalAPI, LocalAPIUnavailable
from support.localapi_standin import LocalAPIStandin, Node, Tailnet


def test_local_mode_is_loopback_only():
    assert local_bind_hosts() == ["127.0.0.1"]
    assert local_bind_hosts(["localhost", "::1", "127.0.0.1"]) == ["127.0.0.1", "::1"]
    for bad in ("0.0.0.0", "::", "100.87.0.1", "192.168.1.5", "example.com"):
        with pytest.raises(ListenError, match="loopback only"):
            local_bind_hosts([bad])


def test_wildcard_detection():
    assert all(is_wildcard(h) for h in ("", "0.0.0.0", "::", "[::]", "*", "0:0::0"))
    assert not any(is_wildcard(h) for h in ("127.0.0.1", "100.87.0.1", "::1"))


def test_tailscaled_mode_binds_only_tailnet_ips(tmp_path):
    me = Node("studio.ts.net", ["100.87.0.1", "fd7a:115c:a1e0::1"], login_name="o@x", user_id=1)
    with LocalAPIStandin(tmp_path / "s.sock", Tailnet(me)) as s:
        api = LocalAPI(s.socket_path)
        assert tailscaled_bind_hosts(api) == ["100.87.0.1", "fd7a:115c:a1e0::1"]
        assert tailscaled_bind_hosts(api, ipv6=False) == ["100.87.0.1"]
        me.addresses = ["0.0.0.0"]  # a lying daemon still cannot make us bind a wildcard
        with pytest.raises(ListenError, match="wildcard"):
            tailscaled_bind_hosts(api)
        me.addresses = []
        with pytest.raises(ListenError, match="no tailnet address"):
            tailscaled_bind_hosts(api)


def test_tailscaled_mode_without_daemon_is_clear(tmp_path):
    with pytest.raises(LocalAPIUnavailable, match="is tailscaled"):
        tailscaled_bind_hosts(LocalAPI(str(tmp_path / "none.sock")))


def test_proc_listing_sees_real_sockets():
    loop = socket.socket()
    loop.bind(("127.0.0.1", 0))
    loop.listen()
    wild = socket.socket(socket.AF_INET6)
    wild.bind(("::", 0))
    wild.listen()
    try:
        lp, wp = loop.getsockname()[1], wild.getsockname()[1]
        mine = {(s.host, s.port) for s in listening_sockets()}
        assert ("127.0.0.1", lp) in mine and ("::", wp) in mine
        own = {(s.host, s.port) for s in listening_sockets(os.getpid())}
        assert ("127.0.0.1", lp) in own
        assert [s.port for s in wildcard_listeners(os.getpid())] == [wp]
        assert wildcard_listeners(ports=[lp]) == []
        with pytest.raises(ListenError, match=f":{wp}"):
            assert_no_wildcard(os.getpid())
    finally:
        loop.close()
        wild.close()
    assert_no_wildcard(os.getpid())


def test_bind_hosts_dispatch(tmp_path):
    assert bind_hosts("local") == ["127.0.0.1"]
    assert bind_hosts("tsnet") == []
    with pytest.raises(ListenError, match="picks its own"):
        bind_hosts("tailscaled", hosts=["0.0.0.0"])
    with pytest.raises(ListenError, match="unknown listen mode"):
        bind_hosts("public")
    me = Node("studio.ts.net", ["100.87.0.1"], login_name="o@x", user_id=1)
    with LocalAPIStandin(tmp_path / "s.sock", Tailnet(me)) as s:
        assert bind_hosts("tailscaled", localapi=LocalAPI(s.socket_path)) == ["100.87.0.1"]


def test_plaintext_only_on_local_loopback():
    assert_plaintext_allowed("local", ["127.0.0.1", "::1"])
    for mode, hosts in (("local", ["100.87.0.1"]), ("tailscaled", ["100.87.0.1"]),
                        ("tailscaled", ["127.0.0.1"]), ("tsnet", []), ("local", [])):
        with pytest.raises(ListenError, match="without TLS"):
            assert_plaintext_allowed(mode, hosts)
