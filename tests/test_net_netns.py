"""The namespace harness itself (root only): WireGuard pairs are torn down on failure, and tests
needing root skip cleanly without it.

Access over a real WireGuard tunnel through lmlink's real servicer is tested with
`lmlink serve --listen tailscaled` in tests/test_serve_tailnet.py (identity per peer, grants,
pinning, the LAN address refused) and tests/test_sharing_tailnet.py (shares, quotas, tokens).
"""

from __future__ import annotations

import os

import pytest

from support.netns import namespaces_left, require_root, wireguard_pair

pytestmark = pytest.mark.timeout(120)


def test_namespaces_torn_down_on_failure():
    require_root()
    names = []
    with pytest.raises(RuntimeError, match="boom"):
        with wireguard_pair() as pair:
            names = [pair.ns_server, pair.ns_client]
            assert set(names) <= set(namespaces_left())
            raise RuntimeError("boom")
    assert names and not set(names) & set(namespaces_left())
    assert not os.path.exists(f"/var/run/wireguard/{pair.wg_client}.sock")


def test_require_root_skips_for_non_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="need root"):
        require_root()
