"""Client side of the namespace test: run inside the client namespace, print one JSON report.

For each tunnel source address it switches the route's source (so the server sees a different
tailnet peer), opens a fresh pinned TLS channel, and records what WhoAmI, ListModels and
Generate return. Then it tries the server's veth (non-tailnet) address and a wrong pin.
Only the product's client-side pieces are used: lmlink.net.pinning.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
from typing import Any

import grpc

from lmlink.net.pinning import FingerprintMismatch, PinningError, PinStore, pin_server

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support.probe_service import call  # noqa: E402

OPTS = [("grpc.use_local_subchannel_pool", 1)]  # a new channel = a new connection


async def attempt(ch: grpc.aio.Channel, method: str, body: dict | None = None) -> dict[str, Any]:
    try:
        return {"ok": await call(ch, method, body, timeout=5)}
    except grpc.aio.AioRpcError as e:
        return {"code": e.code().name, "details": e.details()}


async def as_peer(cfg: dict, source: str, pinned) -> dict[str, Any]:
    subprocess.run(["ip", "route", "replace", f"{cfg['server']}/32", "dev", cfg["wg_dev"],
                    "src", source], check=True, timeout=10)
    target = f"{cfg['server']}:{cfg['port']}"
    out: dict[str, Any] = {}
    async with grpc.aio.secure_channel(target, pinned.channel_credentials(),
                                       options=pinned.channel_options() + OPTS) as ch:
        out["whoami"] = await attempt(ch, "WhoAmI")
        out["list"] = await attempt(ch, "ListModels")
        out["generate"] = {m: await attempt(ch, "Generate", {"model": m}) for m in cfg["models"]}
    return out


def raw_connect(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=3):
            return "connected"
    except OSError as e:
        return type(e).__name__


async def main(cfg: dict) -> dict[str, Any]:
    report: dict[str, Any] = {}
    first = cfg["sources"][0]
    subprocess.run(["ip", "route", "replace", f"{cfg['server']}/32", "dev", cfg["wg_dev"],
                    "src", first], check=True, timeout=10)
    store = PinStore(cfg["pin_store"])
    pinned = pin_server(cfg["server"], cfg["port"], store=store)  # TOFU over the tunnel
    report["pin"] = {"fingerprint": pinned.fingerprint, "new": pinned.newly_pinned,
                     "again_new": pin_server(cfg["server"], cfg["port"], store=store).newly_pinned}
    report["peers"] = {src: await as_peer(cfg, src, pinned) for src in cfg["sources"]}

    # Back to a known peer for the negative checks that must not depend on identity.
    subprocess.run(["ip", "route", "replace", f"{cfg['server']}/32", "dev", cfg["wg_dev"],
                    "src", first], check=True, timeout=10)
    report["veth_raw"] = raw_connect(cfg["veth"], cfg["port"])
    async with grpc.aio.secure_channel(f"{cfg['veth']}:{cfg['port']}", pinned.channel_credentials(),
                                       options=pinned.channel_options() + OPTS) as ch:
        report["veth_grpc"] = await attempt(ch, "WhoAmI")
    wrong = PinStore(cfg["pin_store"] + ".wrong")
    wrong.pin(f"{cfg['server']}:{cfg['port']}", "sha256:" + "ab" * 32)
    try:
        pin_server(cfg["server"], cfg["port"], store=wrong)
        report["wrong_pin"] = "accepted"
    except FingerprintMismatch as e:
        report["wrong_pin"] = str(e)
    except PinningError as e:
        report["wrong_pin"] = f"other error: {e}"
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("config", help="JSON: server, port, veth, wg_dev, pin_store, sources, models")
    with open(p.parse_args().config) as f:
        config = json.load(f)
    print(json.dumps(asyncio.run(main(config))), flush=True)
