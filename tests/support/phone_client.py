"""The iPhone side of tests/test_phone_real_tailnet.py, run inside a client node's namespace.

Trusts only what a phone would: the system roots, plus (when given) the CA from the installed
profile; checks the certificate against the host name the Shortcut URL uses, while connecting
to the server's tailnet address (a phone resolves that name with MagicDNS). Replays the
recipe's requests verbatim (Host set to that name). Prints one JSON report.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import sys


class NamedConnection(http.client.HTTPSConnection):
    """HTTPS to `ip`, verifying the certificate for `host` (SNI and hostname check)."""

    def __init__(self, host: str, ip: str, port: int, context: ssl.SSLContext) -> None:
        super().__init__(host, port, context=context, timeout=60)
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def exchange(cfg: dict, host: str, cafile: str, method: str, path: str,
             headers: list, body: bytes) -> tuple[int, dict, bytes]:
    context = ssl.create_default_context(cafile=cafile)
    conn = NamedConnection(host, cfg["ip"], cfg["port"], context)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for name, value in headers:
        if name.lower() == "host":
            value = f"{host}:{cfg['port']}"
        elif name.lower() == "content-length":
            value = str(len(body))
        conn.putheader(name, value)
    conn.endheaders(body)
    response = conn.getresponse()
    out = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    conn.close()
    return out


def attempt(cfg: dict, host: str, cafile: str, request: list) -> dict:
    method, path, headers, body = request
    try:
        status, headers, raw = exchange(cfg, host, cafile, method, path, headers, body.encode())
    except ssl.SSLCertVerificationError as exc:
        return {"tls_error": exc.verify_message or str(exc)}
    return {"status": status, "headers": headers, "body": raw.decode(errors="replace")}


def main() -> None:
    cfg = json.loads(open(sys.argv[1]).read())
    first, follow_up, plain = cfg["requests"]
    report = {
        "system_roots_only": attempt(cfg, cfg["host"], cfg["system_roots"], first),
        "wrong_name": attempt(cfg, "elsewhere." + cfg["host"].split(".", 1)[1], cfg["bundle"], first),
        "first": attempt(cfg, cfg["host"], cfg["bundle"], first),
    }
    if report["first"].get("status") == 200:
        conversation = json.loads(report["first"]["body"])["conversation"]
        method, path, headers, body = follow_up
        follow_up = [method, path, headers, body.replace(cfg["conversation_placeholder"], conversation)]
        report["follow_up"] = attempt(cfg, cfg["host"], cfg["bundle"], follow_up)
        report["plain"] = attempt(cfg, cfg["host"], cfg["bundle"], plain)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
