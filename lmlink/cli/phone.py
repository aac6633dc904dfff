"""`lmlink phone`: what to put in the iPhone Shortcut, and the CA profile when one is needed.

Runs on the server machine (it reads the server's state dir and asks the Tailscale daemon
about this node). See lmlink.net.phone for the URL/certificate decision.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from lmlink import defaults

from .common import EXIT_FAILURE, EXIT_OK, CliError, port


def add_parser(sub: argparse._SubParsersAction) -> None:
    phone = sub.add_parser(
        "phone",
        help="show the URL for the iPhone Shortcut (text + QR) and serve the CA profile if needed",
        description=(
            "Print the URL the iOS Shortcut calls and whether the phone must first install the "
            "server's CA profile (only when the tailnet issues no HTTPS certificates), as text "
            "and a terminal QR code. --device checks that a phone's tailnet identity may "
            "generate. --serve-profile serves the .mobileconfig once, over plain HTTP on this "
            "node's tailnet address only, for a few minutes."
        ),
    )
    phone.add_argument("--localapi-socket", default=os.environ.get(defaults.ENV_LOCALAPI_SOCKET),
                       help="Tailscale LocalAPI socket (default: the platform's own)")
    phone.add_argument("--state-dir", default=None, help="the server's state dir")
    phone.add_argument("--port", type=port, default=defaults.HTTP_PORT,
                       help=f"the HTTP bridge's port (default: {defaults.HTTP_PORT})")
    phone.add_argument("--device", default=None, metavar="NAME",
                       help="the phone's tailnet device name (or login): check it may generate")
    phone.add_argument("--model", default="", help="model for the --device check (default: any)")
    phone.add_argument("--serve-profile", action="store_true",
                       help="serve the CA profile (.mobileconfig) for one download")
    phone.add_argument("--profile-port", type=port, default=defaults.LINK_PORT + 1,
                       help=f"port for --serve-profile (default: {defaults.LINK_PORT + 1})")
    phone.add_argument("--minutes", type=float, default=5.0,
                       help="how long --serve-profile waits for the download (default: 5)")
    phone.add_argument("--profile-out", default=None, metavar="FILE",
                       help="also write the CA profile to FILE (to AirDrop or mail it instead)")
    phone.add_argument("--no-qr", action="store_true", help="text only")
    phone.add_argument("--json", action="store_true", help="print JSON")
    phone.set_defaults(run=run_phone)


def _qr(text: str) -> str:
    import io

    import segno

    out = io.StringIO()
    segno.make(text, error="m").terminal(out=out, compact=True, border=2)
    return out.getvalue()


def run_phone(args: argparse.Namespace) -> int:
    from lmlink.front_door import default_state_dir
    from lmlink.net.localapi import LocalAPI, LocalAPIError
    from lmlink.net.phone import ProfileServer, advise
    from lmlink.net.tls import server_tls

    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    api = LocalAPI(args.localapi_socket)
    try:
        me = api.self_node()
    except LocalAPIError as exc:
        raise CliError(f"cannot ask the Tailscale daemon about this node ({exc}); the phone "
                       "reaches the server over the tailnet, so it must be up") from None
    hosts = [*me.tailscale_ips, *([me.dns_name] if me.dns_name else [])]
    tls = server_tls(state_dir, hosts, localapi=api)
    advice = advise(tls.source, tls.cert_chain_pem, list(me.tailscale_ips), args.port)
    report: dict[str, Any] = {"url": advice.url, "host": advice.host,
                              "needs_profile": advice.needs_profile, "reason": advice.reason}
    if args.profile_out:
        from lmlink.net.mobileconfig import ca_profile

        Path(args.profile_out).write_bytes(ca_profile(tls.client_ca_pem, me.dns_name or "lmlink"))
        report["profile_file"] = args.profile_out
    if args.device:
        report["device"] = _check_device(api, state_dir, args.device, args.model)
    if not args.json:
        print(f"Shortcut URL:  {advice.url}")
        print(f"Certificate:   {advice.reason}")
        if advice.needs_profile:
            print("Profile:       needed once: lmlink phone --serve-profile, open the link on "
                  "the phone, then Settings > General > VPN & Device Management > install, and "
                  "Settings > General > About > Certificate Trust Settings > enable full trust")
        if "device" in report:
            d = report["device"]
            print(f"Device:        {d['name']}: " + ("may generate" if d["allowed"]
                                                      else f"may NOT generate ({d['reason']})"))
        if not args.no_qr:
            print(_qr(advice.url))
    if args.serve_profile:
        if not advice.needs_profile:
            print("no profile needed: the tailnet certificate is trusted by iOS", file=sys.stderr)
        else:
            v4 = [h for h in me.tailscale_ips if ":" not in h] or list(me.tailscale_ips)
            server = ProfileServer(v4[0], args.profile_port, tls.client_ca_pem,
                                   me.dns_name or "lmlink", lifetime=args.minutes * 60)
            report["profile_url"] = server.url
            if args.json:
                print(json.dumps(report), flush=True)
            else:
                print(f"Profile URL:   {server.url}  (open it in Safari on the phone; served "
                      f"once, for {args.minutes:g} minutes, on the tailnet address only)")
                if not args.no_qr:
                    print(_qr(server.url), flush=True)
            report["profile_downloads"] = downloads = server.serve()
            print("profile downloaded" if downloads else "nobody downloaded the profile",
                  file=sys.stderr)
            return EXIT_OK if downloads else EXIT_FAILURE
    if args.json:
        print(json.dumps(report))
    if "device" in report and not report["device"]["allowed"]:
        return EXIT_FAILURE
    return EXIT_OK


def _check_device(api: Any, state_dir: Path, name: str, model: str) -> dict[str, Any]:
    """Would the server let this tailnet device (by name or login) `generate`?"""
    from lmlink.api.limits import open_guard

    wanted = name.lower().rstrip(".")
    peer = next((p for p in api.peers() if wanted in (p.name.lower(), p.host_name.lower(),
                                                       p.name.lower().split(".")[0],
                                                       p.login_name.lower())), None)
    if peer is None or not peer.addresses:
        raise CliError(f"no tailnet device named {name!r} (see `tailscale status`)")
    identity = api.whois(peer.addresses[0])
    if identity is None:
        raise CliError(f"the Tailscale daemon does not know who {name!r} is")
    guard = open_guard(state_dir, lambda _peer: None, owner_login=identity.login_name
                       if identity.is_owner else "owner")
    try:
        verdict = guard.check(identity, "generate", model)
    finally:
        guard.close()
    return {"name": peer.name, "login": identity.login_name, "allowed": bool(verdict.allowed),
            "reason": getattr(verdict, "reason", "") or ""}
