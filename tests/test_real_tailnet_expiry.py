"""Key expiry against a real tailnet, on a lab of its own.

Own lab because on this bed (headscale 0.29.3, tailscaled 1.101-pre) the server's tailscaled
received only the first peer removal of a lab's life: after bob's deletion (test_real_tailnet.py)
an expiry never reached the server (peer still Online, no `Expired`, 30 s later), and after an
expiry a deletion never did. Each destructive check therefore starts from a fresh lab.
"""

from __future__ import annotations

import time

import pytest

from tailnet.bed import wait_for
from tailnet.lab import lmlink, running_lab

pytestmark = [pytest.mark.real_tailnet, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def lab():
    with running_lab() as lab:
        yield lab


def _expired(peer: dict | None) -> bool:
    """The server's tailscaled no longer trusts this peer's node key."""
    return peer is None or bool(peer.get("Expired"))


def test_expired_node_loses_access(lab):
    """A laptop of its own (alice's second device): the long-lived laptops' control sessions
    are left in whatever state the earlier tests put them (seen: headscale marking alice
    offline and delivering her nothing, so she never learns of her own expiry). """
    tablet = lab.bed.add_node("tablet", user="alice", hostname="alice-tablet")
    wait_for("the server to see the new laptop online",
             lambda: (lab.server.peer_status(tablet) or {}).get("Online"), 30, interval=0.2)
    res = lmlink(tablet, "status", "--server", lab.target(), "--json")
    assert res.returncode == 0, res.stderr
    node_id = lab.bed.headscale_id(tablet)
    lab.bed.headscale("nodes", "expire", "--identifier", str(node_id), json_out=False)
    t0 = time.monotonic()
    # headscale pushes the new key expiry to every peer (a PeerChange patch on their map
    # stream); the server's tailscaled then marks the peer Expired and drops it from WireGuard.
    # Wait for that signal itself, not for a failing client (a slow machine fails those too).
    wait_for("the server's tailscaled to mark the laptop's key expired",
             lambda: _expired(lab.server.peer_status(tablet)), 30, interval=0.2)
    print(f"expiry reached the server within {time.monotonic() - t0:.1f} s")
    # ... and from then on the laptop cannot reach it (the client's deadline is generous: a
    # failure here is the tailnet refusing it, not a slow machine)
    res = lmlink(tablet, "status", "--server", lab.target(), "--timeout", "8")
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr and "cannot reach" in res.stderr, res.stderr
    assert _expired(lab.server.peer_status(tablet))
