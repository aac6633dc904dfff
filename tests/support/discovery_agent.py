"""Client side of tests/test_discovery_netns.py: runs inside the client namespace.

Browses `_lmlink._tcp` from the start and prints every browse event as a JSON line (with the
wall-clock time it was seen), and answers JSON commands read from stdin, one per line:

  {"cmd": "discover", "timeout": 2, "direct_only": false}
      -> lmlink.client.discovery.adiscover, then select_endpoint and a streamed generation
         from the selected server with the real lmlink.client.Client (verifying the
         advertised fingerprint)
  {"cmd": "first_answer", "name": "lmlink-studio"}
      -> a new MdnsBrowser: seconds from its start to the answer naming that server
  {"cmd": "connect", "target": "...", "fingerprint": "..."}
      -> Client(target, expected_fingerprint=...).server_info(): ok or the error
  {"cmd": "quit"}

Only the product's public client API is used; the environment says where the client's own
LocalAPI stand-in and config dir are (LMLINK_LOCALAPI_SOCKET, LMLINK_CONFIG_DIR).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any

from lmlink.client import Client, Completed, LmlinkError, TokenDelta
from lmlink.client.discovery import DiscoveryError, MdnsBrowser, adiscover, select_endpoint


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def stream(target: str, fingerprint: str | None) -> dict[str, Any]:
    deltas, done, text = 0, None, []
    with Client(target, timeout=30, expected_fingerprint=fingerprint) as client:
        for event in client.stream(prompt="Found you by mDNS", max_tokens=16, ignore_eos=True):
            if isinstance(event, TokenDelta):
                deltas += 1
                text.append(event.text)
            elif isinstance(event, Completed):
                done = event
        presented = client.fingerprint
    assert done is not None
    return {"deltas": deltas, "completion_tokens": done.usage.completion_tokens,
            "finish_reason": done.finish_reason, "fingerprint": presented,
            "text_chars": len("".join(text))}


def connect(target: str, fingerprint: str) -> dict[str, Any]:
    try:
        with Client(target, timeout=10, expected_fingerprint=fingerprint) as client:
            return {"ok": client.server_info().name}
    except LmlinkError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}


async def handle(cmd: dict[str, Any]) -> dict[str, Any]:
    if cmd["cmd"] == "discover":
        found = await adiscover(cmd.get("timeout", 2.0), direct_only=cmd.get("direct_only", False))
        out: dict[str, Any] = {"type": "discover", "elapsed": found.elapsed,
                               "interfaces": found.interfaces, "notes": found.notes,
                               "endpoints": [e.to_dict() for e in found.endpoints]}
        try:
            chosen = select_endpoint(found, direct_only=cmd.get("direct_only", False))
        except DiscoveryError as exc:
            out["select_error"] = str(exc)
            return out
        out["selected"] = chosen.target, chosen.name, list(chosen.origins)
        out["stream"] = await asyncio.to_thread(
            stream, chosen.target, chosen.advertised_fingerprint or None
        )
        return out
    if cmd["cmd"] == "first_answer":  # a client that starts browsing now: how soon an answer
        t0 = time.monotonic()

        async def first() -> float:
            async with MdnsBrowser() as fresh:
                async for ev in fresh.events():
                    if ev.kind == "added" and ev.instance.startswith(cmd["name"] + "."):
                        return time.monotonic() - t0
            raise RuntimeError("browser ended")

        return {"type": "first_answer", "seconds": round(await asyncio.wait_for(first(), 10), 3)}
    if cmd["cmd"] == "connect":
        return {"type": "connect", **await asyncio.to_thread(connect, cmd["target"], cmd["fingerprint"])}
    return {"type": "error", "message": f"unknown command {cmd!r}"}


async def main() -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip():
                loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(commands.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True).start()
    async with MdnsBrowser() as browser:

        async def forward() -> None:
            async for ev in browser.events():
                server = ev.server
                emit({"type": "browse", "kind": ev.kind, "instance": ev.instance, "at": ev.at,
                      "name": server.name if server else None,
                      "state": server.state if server else None,
                      "targets": list(server.targets) if server else None,
                      "fingerprint": server.fingerprint if server else None,
                      "models": list(server.models or ()) if server else None})

        forwarder = asyncio.ensure_future(forward())
        emit({"type": "ready", "interfaces": browser.interfaces, "at": time.time()})
        while True:
            cmd = await commands.get()
            if cmd is None or cmd.get("cmd") == "quit":
                break
            try:
                emit(await handle(cmd))
            except Exception as exc:  # noqa: BLE001 - report, keep going
                emit({"type": "error", "message": f"{type(exc).__name__}: {exc}"})
        forwarder.cancel()


if __name__ == "__main__":
    asyncio.run(main())
