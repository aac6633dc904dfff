"""Client side of tests/test_serve_tailnet.py: run inside the client namespace, print one JSON report.

Talks to a real `lmlink serve --listen tailscaled` through the real WireGuard tunnel using only
the product's public client (`lmlink.client.Client`, which pins the server certificate on first
use). To appear as different tailnet peers it switches the route's source address before each
fresh connection. The HTTP bridge is checked over
HTTPS with the standard library, verifying the certificate against the server's announced
fingerprint (no pin store involved).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from typing import Any

from lmlink.client import Client, Completed, LmlinkError, TokenDelta
from lmlink.client.security import TrustError
from lmlink.net.pinning import PinStore, server_key
from lmlink.net.tls import fingerprint

OPTS = [("grpc.use_local_subchannel_pool", 1)]  # a new Client = a new connection
TIMEOUT = 10.0


def use_source(cfg: dict, source: str) -> None:
    subprocess.run(["ip", "route", "replace", f"{cfg['server']}/32", "dev", cfg["wg_dev"],
                    "src", source], check=True, timeout=10)


def error(exc: LmlinkError) -> dict[str, Any]:
    return {"code": exc.code.name, "error": type(exc).__name__, "message": str(exc)}


def attempt(fn: Any) -> dict[str, Any]:
    try:
        return {"ok": fn()}
    except LmlinkError as exc:
        return error(exc)


def generate(client: Client, model: str) -> dict[str, Any]:
    deltas, done, t0 = 0, None, time.monotonic()
    for event in client.stream(prompt="Hello over the tailnet", model=model, max_tokens=16,
                               ignore_eos=True, timeout=30):
        if isinstance(event, TokenDelta):
            deltas += 1
        elif isinstance(event, Completed):
            done = event
    assert done is not None, "stream ended without Completed"
    return {"deltas": deltas, "completion_tokens": done.usage.completion_tokens,
            "finish_reason": done.finish_reason, "seconds": round(time.monotonic() - t0, 2)}


def as_peer(cfg: dict, source: str) -> dict[str, Any]:
    use_source(cfg, source)
    out: dict[str, Any] = {}
    try:
        client = Client(cfg["grpc"], timeout=TIMEOUT, options=OPTS)
    except LmlinkError as exc:  # refused before TLS: pinning cannot even fetch the cert
        out["connect"] = error(exc)
        return out
    with client:
        out["connect"] = {"ok": client.fingerprint}
        info = attempt(client.server_info)
        if "ok" in info:
            c = info["ok"].caller
            info["ok"] = {"login_name": c.login_name, "node_name": c.node_name,
                          "source": c.source, "is_owner": c.is_owner,
                          "listen_mode": info["ok"].listen_mode}
        out["info"] = info
        out["list"] = attempt(lambda: [m.id for m in client.list_models()])
        out["generate"] = attempt(lambda: generate(client, cfg["model"]))
    return out


def https_get(cfg: dict, path: str) -> dict[str, Any]:
    host, port = cfg["http"].rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # verified below against the announced fingerprint
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        der = conn.sock.getpeercert(binary_form=True)
        fp = fingerprint(ssl.DER_cert_to_PEM_cert(der).encode())
        if fp != cfg["fingerprint"]:
            return {"fingerprint_mismatch": fp}
        resp = conn.getresponse()
        return {"status": resp.status, "body": json.loads(resp.read() or b"null")}
    finally:
        conn.close()


def raw_connect(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=3):
            return "connected"
    except OSError as e:
        return type(e).__name__


def main(cfg: dict) -> dict[str, Any]:
    os.environ["LMLINK_CONFIG_DIR"] = cfg["config_dir"]
    report: dict[str, Any] = {"peers": {}}
    for name, source in cfg["sources"].items():
        report["peers"][name] = as_peer(cfg, source)
    report["pins"] = json.loads(
        (PinStore(os.path.join(cfg["config_dir"], "known_servers.json")).path).read_text())

    use_source(cfg, cfg["sources"]["owner"])
    report["http"] = {
        "owner_health": https_get(cfg, "/health"),
        "owner_models": https_get(cfg, "/v1/models"),
    }
    use_source(cfg, cfg["sources"]["other"])
    report["http"]["other_models"] = https_get(cfg, "/v1/models")

    # the veth (LAN, non-tailnet) address: nothing listens there
    use_source(cfg, cfg["sources"]["owner"])
    port = int(cfg["grpc"].rsplit(":", 1)[1])
    report["veth_raw"] = raw_connect(cfg["veth"], port)
    veth_config = os.path.join(cfg["config_dir"], "veth")
    os.environ["LMLINK_CONFIG_DIR"] = veth_config
    try:
        with Client(f"{cfg['veth']}:{port}", timeout=TIMEOUT, options=OPTS) as c:
            report["veth_client"] = {"ok": [m.id for m in c.list_models()]}
    except LmlinkError as exc:
        report["veth_client"] = error(exc)

    # a pin that does not match what the server presents
    wrong_dir = os.path.join(cfg["config_dir"], "wrong")
    host, _, p = cfg["grpc"].rpartition(":")
    PinStore(os.path.join(wrong_dir, "known_servers.json")).pin(
        server_key(host, int(p)), cfg["wrong_fingerprint"])
    os.environ["LMLINK_CONFIG_DIR"] = wrong_dir
    try:
        with Client(cfg["grpc"], timeout=TIMEOUT, options=OPTS) as c:
            c.list_models()
        report["wrong_pin"] = {"accepted": True}
    except TrustError as exc:
        report["wrong_pin"] = error(exc)
    except LmlinkError as exc:
        report["wrong_pin"] = {"other": error(exc)}
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("config", help="JSON: grpc, http, fingerprint, veth, wg_dev, server, sources, ...")
    with open(p.parse_args().config) as f:
        config = json.load(f)
    print(json.dumps(main(config)), flush=True)
    sys.exit(0)
