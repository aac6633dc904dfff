"""Advertise forged `_lmlink._tcp` records (run inside a test namespace), for the discovery tests.

Uses the product's own advertiser (lmlink.net.mdns) with made-up facts, the way anyone on the
LAN could. Advertisements come from a JSON list on argv[1]:
  [{"name": "...", "mode": "tailscaled", "hosts": ["100.87.0.1"], "port": 47470,
    "fingerprint": "sha256:...", "interfaces": ["198.18.0.1"] | "local"}]
`"interfaces": "local"` uses the interfaces `lmlink serve` uses in local mode (loopback), and
the script then also browses loopback itself to prove that advertisement is really out there.
Prints {"registered": [...], "loopback_seen": [...]} once every record is announced, then
waits for SIGTERM and withdraws them.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from lmlink.client.discovery import MdnsBrowser
from lmlink.net.mdns import Advertisement, MdnsAdvertiser, advertise_interfaces


async def main(spec: list[dict]) -> None:
    advertisers = []
    for s in spec:
        ifaces = advertise_interfaces("local") if s["interfaces"] == "local" else s["interfaces"]
        ad = Advertisement(
            name=s["name"], node=s.get("node", "spoof"), mode=s.get("mode", "tailscaled"),
            port=s["port"], hosts=tuple(s["hosts"]), fingerprint=s.get("fingerprint", ""),
            models=tuple(s.get("models", ["lmlink-tiny"])), state="ready",
        )
        adv = MdnsAdvertiser(ad, ifaces)
        await adv.start()
        advertisers.append(adv)
    await asyncio.wait_for(asyncio.gather(*(a.registered.wait() for a in advertisers)), 10)
    seen: list[str] = []
    if any(s["interfaces"] == "local" for s in spec):
        async with MdnsBrowser(["127.0.0.1"]) as browser:
            for _ in range(20):
                ev = await browser.next_event(0.5)
                if ev is not None and ev.server is not None:
                    seen.append(ev.server.name)
                if all(s["name"] in seen for s in spec if s["interfaces"] == "local"):
                    break
    print(json.dumps({"registered": [a.instance for a in advertisers], "loopback_seen": seen}),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    for a in advertisers:
        await a.aclose()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
