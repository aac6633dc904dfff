"""Run inside a test network namespace whose lo carries NODE (a stand-in tailnet address):
a real Relay on NODE in front of a real HTTP listener on the inner hop; another uid and this
uid dial NODE. Prints {"nobody": ..., "owner": ..., "asked": n, "refused": n}."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lmlink.access.identity import Identity
from lmlink.api.http_shell import HttpListener, peer_string
from lmlink.net.httpserver import uvicorn_options
from lmlink.net.inner import InnerHop
from lmlink.net.relay import PeerIdentities, Relay

NOBODY_DIAL = (
    "import os, socket, sys\n"
    "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
    "s = socket.socket(); s.settimeout(5); s.connect((sys.argv[1], int(sys.argv[2])))\n"
    "s.sendall(b'GET /whoami HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\n\\r\\n')\n"
    "try:\n    print('closed' if s.recv(4096) == b'' else 'served')\n"
    "except ConnectionResetError:\n    print('closed')\n"
)


async def main(node: str) -> None:
    ids = PeerIdentities()

    async def whoami(request: Request) -> JSONResponse:
        who = ids.lookup(peer_string(request.scope))
        return JSONResponse({"who": who.login_name if who else None})

    hop = InnerHop(Path(tempfile.mkdtemp()) / "inner")
    http = HttpListener(Starlette(routes=[Route("/whoami", whoami)]), hop.http_socket(), None,
                        uvicorn_options())
    await http.start()
    asked: list[str] = []

    async def resolve(ip: str, port: int) -> Identity | None:
        asked.append(ip)  # WhoIs of the node's own address names the node's user: the owner
        return Identity(login_name="owner@example.com", source="tailnet", is_owner=True)

    relay = Relay(hop.http_path, resolve, ids)
    [(_, port)] = await relay.listen([node], 0)
    try:
        res = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", NOBODY_DIAL, node,
                                                       str(port)], capture_output=True, text=True,
                                      timeout=30)
        nobody = res.stdout.strip() or res.stderr.strip()[-300:]
        async with httpx.AsyncClient() as c:
            owner = (await c.get(f"http://{node}:{port}/whoami")).json()
        print(json.dumps({"nobody": nobody, "owner": owner, "asked": len(asked),
                          "refused": relay.stats.refused}))
    finally:
        await relay.aclose()
        await http.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
