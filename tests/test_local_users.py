"""Issue 11 #10: in local mode only the server's own user is the owner.

A real `lmlink serve` (local mode, run by this uid) and the real lmlink client and HTTP calls
made from a process of another uid (nobody) on the same machine: it is not the owner, may not
generate, list or use the Admin service; the server's own user still is the owner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import start_server, stop_server

CALLER = r"""
import json, os, sys
import httpx
from lmlink.client import Client, LmlinkError
addr, http, drop = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
h = httpx.Client(timeout=20)  # import everything while root: nobody cannot read /root
c = Client(addr, timeout=20)  # (connections are opened lazily, after the uid change)
import lmlink.client.sync, lmlink.client.info, lmlink.client.errors, lmlink.client.events
import encodings.idna, socket; socket.getaddrinfo("127.0.0.1", 1)
if drop:  # become another local user *before* opening any connection
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
out = {}
with c:
    try:
        c_info = c.server_info().caller
        out["caller"] = [c_info.login_name, c_info.is_owner]
    except LmlinkError as e:
        out["caller"] = [type(e).__name__, str(e)]
    try:
        out["generate"] = len(c.complete("The", max_tokens=3, ignore_eos=True).token_ids)
    except LmlinkError as e:
        out["generate"] = type(e).__name__
r = h.post(f"http://{http}/v1/chat/completions", timeout=20, json={
    "model": "lmlink-tiny", "max_tokens": 3,
    "messages": [{"role": "user", "content": "hi"}]})
out["http"] = r.status_code
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def local_server():
    srv = start_server()
    yield srv
    stop_server(srv.process)


def _call(srv, drop: bool) -> dict:
    res = subprocess.run([sys.executable, "-c", CALLER, srv.address, srv.http, "1" if drop else "0"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_another_local_user_is_not_the_owner(local_server):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another local user")
    other = _call(local_server, drop=True)
    assert other["caller"][0] == "PermissionDenied" and "uid:65534" in other["caller"][1]
    assert other["generate"] == "PermissionDenied"
    assert other["http"] == 403
    me = _call(local_server, drop=False)
    assert me["caller"] == ["local", True]
    assert me["generate"] == 3 and me["http"] == 200
