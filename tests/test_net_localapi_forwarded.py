"""WhoIs on a connection forwarded by userspace-networking tailscaled (loopback source).

tailscaled's proxy map can learn the forwarded address a moment after the connection arrives
(tailscale#1616), so lmlink retries a loopback 404 briefly; anything else unknown is answered
at once. The stand-in plays tailscaled (real HTTP over a unix socket); the end-to-end case
runs against real userspace tailscaled in tests/test_real_tailnet_userspace.py.
"""

from __future__ import annotations

import threading
import time

from lmlink.net.localapi import FORWARD_RETRY_S, LocalAPI
from support.localapi_standin import LocalAPIStandin, Node, Tailnet


def tailnet() -> Tailnet:
    me = Node("studio.tail1234.ts.net", ["100.87.0.1"], login_name="owner@example.com", user_id=1)
    return Tailnet(me, [Node("mate.tail1234.ts.net", ["100.87.0.2"], login_name="mate@example.com",
                             user_id=2)])


def test_unknown_local_process_is_refused_after_a_bounded_wait(tmp_path):
    with LocalAPIStandin(tmp_path / "ts.sock", tailnet()) as standin:
        api = LocalAPI(standin.socket_path)
        t0 = time.monotonic()
        assert api.whois("127.0.0.1", 40001) is None
        waited = time.monotonic() - t0
        assert FORWARD_RETRY_S <= waited < FORWARD_RETRY_S + 1.0
        asked = [r for r in standin.requests if "127.0.0.1%3A40001" in r or "127.0.0.1:40001" in r]
        assert len(asked) >= 3  # really retried, not one slow call
        t0 = time.monotonic()
        assert api.whois("100.87.0.9", 40001) is None  # a tailnet address: no retry
        assert time.monotonic() - t0 < FORWARD_RETRY_S


def test_forwarded_caller_found_once_the_proxy_map_catches_up(tmp_path):
    net = tailnet()
    with LocalAPIStandin(tmp_path / "ts.sock", net) as standin:
        api = LocalAPI(standin.socket_path)
        late = Node("mate.tail1234.ts.net", ["127.0.0.1"], login_name="mate@example.com", user_id=2)
        timer = threading.Timer(0.15, lambda: net.peers.append(late))
        timer.start()
        who = api.whois("127.0.0.1", 40002)
        timer.join()
        assert who is not None and who.login_name == "mate@example.com"
