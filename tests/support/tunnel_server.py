"""A tailscaled-mode server assembled from lmlink.net/access, for `ip netns exec` tests.

Exactly the shape `lmlink serve --listen tailscaled` should have: bind addresses from LocalAPI
status, TLS material (tailnet cert if LocalAPI gives one), a TLS gRPC server on a private
loopback port, and the relay on the tailnet addresses resolving each peer with LocalAPI WhoIs.
Prints one JSON "ready" line on stdout, serves until SIGTERM, logs refusals to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

import grpc

from lmlink.access.policy import Policy
from lmlink.net.listeners import tailscaled_bind_hosts
from lmlink.net.localapi import LocalAPI
from lmlink.net.relay import PeerIdentities, Relay
from lmlink.net.tls import server_credentials, server_tls

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support.probe_service import Probe  # noqa: E402


async def main(args: argparse.Namespace) -> int:
    api = LocalAPI(args.localapi_socket)
    me = api.self_node()
    hosts = tailscaled_bind_hosts(api, ipv6=False)
    tls = server_tls(args.state_dir, [me.dns_name, *hosts], localapi=api)

    identities = PeerIdentities()
    server = grpc.aio.server()
    Probe(identities.lookup, Policy()).add_to(server)
    internal = server.add_secure_port("127.0.0.1:0", server_credentials(
        tls, require_client_cert=args.require_client_cert))
    await server.start()

    relay = Relay(("127.0.0.1", internal), api.awhois, identities)
    addresses = await relay.listen(hosts, args.port)
    print(json.dumps({"event": "ready", "pid": os.getpid(), "addresses": addresses,
                      "internal_port": internal, "fingerprint": tls.fingerprint,
                      "cert_source": tls.source}), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await relay.aclose()
    await server.stop(0.5)
    print(json.dumps({"event": "stopped", "accepted": relay.stats.accepted,
                      "refused": relay.stats.refused}), flush=True)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--localapi-socket", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--require-client-cert", action="store_true")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main(p.parse_args())))
