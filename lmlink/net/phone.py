"""What an iPhone needs to call this server's HTTP bridge: the URL, and whether it must first
install the project CA profile. Also the one-shot listener that hands out that profile.

Decision (README "Phones and resuming"): where the tailnet issues HTTPS certificates (MagicDNS
+ HTTPS enabled), the bridge already presents the node's `NAME.TAILNET.ts.net` certificate,
which iOS trusts with no set-up; the Shortcut calls `https://NAME.TAILNET.ts.net:47471`.
Otherwise the bridge presents a leaf of the server's own CA, and the phone installs that CA
once as a configuration profile. There is no plain-HTTP door for generation: one profile
install is cheaper than a second, weaker door that every other device on the tailnet could
also reach. The profile itself is served over plain HTTP -- it holds only the public CA
certificate, the listener binds only the tailnet address (WireGuard encrypts and
authenticates the path), serves for a few minutes, and stops after the first download.
"""

from __future__ import annotations

import http.server
import ipaddress
import threading
import time
from dataclasses import dataclass

from cryptography import x509

from lmlink import defaults

from .mobileconfig import MIME_TYPE, ca_profile


@dataclass(frozen=True)
class PhoneAdvice:
    url: str  # what goes into the Shortcut's "Get Contents of URL" (…/v1/shortcuts/ask)
    host: str  # the name (or address) in it, which the certificate must carry
    needs_profile: bool  # the project CA must be installed (and fully trusted) first
    reason: str


def _dns_names(cert_pem: bytes) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.DNSName))


def advise(tls_source: str, cert_pem: bytes, public_hosts: list[str],
           port: int = defaults.HTTP_PORT) -> PhoneAdvice:
    """The Shortcut URL for a server whose bridge presents `cert_pem` (`tls_source` "tailnet"
    or "project-ca"); `public_hosts` are the tailnet addresses it listens on."""
    names = [n for n in _dns_names(cert_pem) if "*" not in n]
    if tls_source == "tailnet" and names:
        host = names[0]
        return PhoneAdvice(f"https://{host}:{port}/v1/shortcuts/ask", host, False,
                           "the tailnet issued this node an HTTPS certificate; iOS trusts it")
    ts_names = [n for n in names if n.endswith(".ts.net") or "." in n]
    v4 = [h for h in public_hosts if _is_v4(h)]
    host = ts_names[0] if ts_names else (v4[0] if v4 else (public_hosts or ["SERVER"])[0])
    return PhoneAdvice(f"https://{host}:{port}/v1/shortcuts/ask", host, True,
                       "the tailnet issues no HTTPS certificates (enable MagicDNS + HTTPS in "
                       "the admin console to skip this); install the lmlink CA profile once")


def _is_v4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


class ProfileServer:
    """Serves the CA profile on `http://HOST:PORT/lmlink-ca.mobileconfig` until it was
    downloaded `max_downloads` times or `lifetime` seconds passed; anything else is 404."""

    PATH = "/lmlink-ca.mobileconfig"

    def __init__(self, host: str, port: int, ca_pem: bytes, server_name: str, *,
                 lifetime: float = 300.0, max_downloads: int = 1) -> None:
        body = ca_profile(ca_pem, server_name)
        outer = self
        self.downloads = 0
        self.deadline = time.monotonic() + lifetime
        self.max_downloads = max_downloads

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                if self.path.split("?")[0] != outer.PATH:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", MIME_TYPE)
                self.send_header("Content-Disposition", 'attachment; filename="lmlink-ca.mobileconfig"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                outer.downloads += 1

            def log_message(self, *args: object) -> None:
                pass  # nothing about callers in the logs

        family_host = host.strip("[]")
        server_class = http.server.ThreadingHTTPServer
        if ":" in family_host:
            import socket

            class V6(http.server.ThreadingHTTPServer):
                address_family = socket.AF_INET6
            server_class = V6
        self._server = server_class((family_host, port), Handler)
        self.port = self._server.server_address[1]
        self.url = (f"http://[{family_host}]:{self.port}{self.PATH}" if ":" in family_host
                    else f"http://{family_host}:{self.port}{self.PATH}")

    def serve(self) -> int:
        """Block until done; returns how many downloads there were."""
        thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                  daemon=True)
        thread.start()
        try:
            while self.downloads < self.max_downloads and time.monotonic() < self.deadline:
                time.sleep(0.1)
        finally:
            self._server.shutdown()
            self._server.server_close()
        return self.downloads
