"""A stand-in for tailscaled's LocalAPI: real HTTP/1.1 over a unix socket, real wire format.

Paths, JSON field names and shapes, status codes and error bodies follow tailscaled's
`ipn/localapi` handlers (as of 2026):

- every request: 403 "invalid localapi request" if the Host header is not
  "local-tailscaled.sock" (or empty) or a Referer/Origin header is present;
- GET /localapi/v0/status[?peers=false]: ipnstate.Status (Self, Peer keyed by node key,
  User keyed by user ID, TailscaleIPs, CertDomains, ...); 403 "status access denied";
- GET /localapi/v0/whois?addr=IP|IP:port|[v6]:port: apitype.WhoIsResponse (Node,
  UserProfile, CapMap); 400 "missing 'addr' parameter" / "invalid 'addr' parameter";
  404 "no match for IP:port"; 403 "whois access denied";
- GET /localapi/v0/cert/<domain>?type=pair: key PEM then cert PEM, text/plain;
  403 "cert access denied"; 500 `invalid domain "x"; must be one of [...]`, or
  "your Tailscale account does not support getting TLS certs" when there are no cert domains.

Errors are written like Go's http.Error: text/plain body "message\n".
It is driven only through the product's own client (`lmlink.net.localapi.LocalAPI`).
Run as a script to serve a JSON config in another process:
`python -m tests.support.localapi_standin CONFIG.json SOCKET`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import socketserver
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LOCALAPI_HOST = "local-tailscaled.sock"
TAGGED_DEVICES_USER_ID = 2147455555  # tailscale's tagged-devices pseudo-user


@dataclass
class Node:
    """One node of the imaginary tailnet (this node or a peer)."""

    name: str  # FQDN without trailing dot, e.g. "laptop.tail1234.ts.net"
    addresses: list[str]  # tailnet IPs, e.g. ["100.87.0.2", "fd7a:115c:a1e0::2"]
    login_name: str = ""  # ignored for tagged nodes (they belong to tagged-devices)
    display_name: str = ""
    user_id: int = 0
    tags: list[str] = field(default_factory=list)
    # What this node is granted *toward the serving node* (WhoIs CapMap): cap -> [json values]
    cap_map: dict[str, list[Any]] = field(default_factory=dict)
    node_id: int = 0
    os: str = "linux"
    online: bool = True
    cur_addr: str = ""  # non-empty: direct path
    relay: str = "fra"  # DERP region code

    @property
    def host_name(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def effective_user(self) -> tuple[int, str, str]:
        if self.tags:
            return TAGGED_DEVICES_USER_ID, "tagged-devices", "tagged-devices"
        return self.user_id, self.login_name, self.display_name or self.login_name

    @property
    def node_key(self) -> str:
        return f"nodekey:{self.node_id:064x}"


def _prefixed(ip: str) -> str:
    return f"{ip}/{32 if ipaddress.ip_address(ip).version == 4 else 128}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Tailnet:
    """The stand-in's state: this node, its peers, cert domains and permissions. Mutable."""

    def __init__(self, self_node: Node, peers: list[Node] | None = None, *,
                 tailnet_name: str = "example.com", magic_dns_suffix: str = "tail1234.ts.net",
                 cert_domains: list[str] | None = None, permit_read: bool = True,
                 permit_cert: bool = True, backend_state: str = "Running") -> None:
        self.self_node = self_node
        self.peers = list(peers or [])
        self.tailnet_name = tailnet_name
        self.magic_dns_suffix = magic_dns_suffix
        self.cert_domains = list(cert_domains or [])
        self.permit_read = permit_read
        self.permit_cert = permit_cert
        self.backend_state = backend_state
        self._certs: dict[str, tuple[bytes, bytes]] = {}
        for i, n in enumerate([self_node, *self.peers], start=1):
            n.node_id = n.node_id or 1000 + i

    # -- lookups --------------------------------------------------------------------------

    def node_for_ip(self, ip: str) -> Node | None:
        for n in [self.self_node, *self.peers]:
            if ip in (str(ipaddress.ip_address(a)) for a in n.addresses):
                return n
        return None

    def cert_pair(self, domain: str) -> tuple[bytes, bytes]:
        """(key_pem, cert_pem) for a cert domain, minted once by a stand-in 'ACME' CA."""
        if domain not in self._certs:
            self._certs[domain] = _mint_tailnet_cert(domain)
        return self._certs[domain]

    # -- JSON shapes ----------------------------------------------------------------------

    def user_profile(self, n: Node) -> dict[str, Any]:
        uid, login, display = n.effective_user
        return {"ID": uid, "LoginName": login, "DisplayName": display}

    def peer_status(self, n: Node) -> dict[str, Any]:
        uid, _, _ = n.effective_user
        st: dict[str, Any] = {
            "ID": f"n{n.node_id}CNTRL",
            "PublicKey": n.node_key,
            "HostName": n.host_name,
            "DNSName": n.name + ".",
            "OS": n.os,
            "UserID": uid,
            "TailscaleIPs": list(n.addresses),
            "AllowedIPs": [_prefixed(a) for a in n.addresses],
            "Addrs": None,
            "CurAddr": n.cur_addr,
            "Relay": n.relay,
            "PeerRelay": "",
            "RxBytes": 0,
            "TxBytes": 0,
            "Created": "2026-01-01T00:00:00Z",
            "LastWrite": "0001-01-01T00:00:00Z",
            "LastSeen": "0001-01-01T00:00:00Z",
            "LastHandshake": "0001-01-01T00:00:00Z",
            "Online": n.online,
            "ExitNode": False,
            "ExitNodeOption": False,
            "Active": bool(n.cur_addr),
            "PeerAPIURL": [f"http://{n.addresses[0]}:41641"] if n.addresses else None,
            "InNetworkMap": True,
            "InMagicSock": True,
            "InEngine": True,
        }
        if n.tags:
            st["Tags"] = list(n.tags)
        return st

    def status(self, peers: bool = True) -> dict[str, Any]:
        nodes = [self.self_node, *(self.peers if peers else [])]
        users: dict[str, Any] = {}
        for n in nodes:
            users[str(n.effective_user[0])] = self.user_profile(n)
        return {
            "Version": "1.90.0-standin",
            "TUN": True,
            "BackendState": self.backend_state,
            "HaveNodeKey": True,
            "AuthURL": "",
            "TailscaleIPs": list(self.self_node.addresses),
            "Self": self.peer_status(self.self_node),
            "Health": [],
            "MagicDNSSuffix": self.magic_dns_suffix,
            "CurrentTailnet": {
                "Name": self.tailnet_name,
                "MagicDNSSuffix": self.magic_dns_suffix,
                "MagicDNSEnabled": True,
            },
            "CertDomains": list(self.cert_domains) or None,
            "Peer": {p.node_key: self.peer_status(p) for p in self.peers} if peers else None,
            "User": users,
            "ClientVersion": None,
        }

    def whois(self, n: Node) -> dict[str, Any]:
        uid, _, _ = n.effective_user
        node: dict[str, Any] = {
            "ID": n.node_id,
            "StableID": f"n{n.node_id}CNTRL",
            "Name": n.name + ".",
            "User": uid,
            "Key": n.node_key,
            "KeyExpiry": "0001-01-01T00:00:00Z",
            "Machine": f"mkey:{n.node_id:064x}",
            "DiscoKey": f"discokey:{n.node_id:064x}",
            "Addresses": [_prefixed(a) for a in n.addresses],
            "AllowedIPs": [_prefixed(a) for a in n.addresses],
            "Endpoints": None,
            "HomeDERP": 4,
            "Hostinfo": {"OS": n.os, "Hostname": n.host_name},
            "Created": "2026-01-01T00:00:00Z",
            "Cap": 130,
            "MachineAuthorized": True,
            "ComputedName": n.host_name,
            "ComputedNameWithHost": n.host_name,
        }
        if n.tags:
            node["Tags"] = list(n.tags)
        res: dict[str, Any] = {"Node": node, "UserProfile": self.user_profile(n)}
        if n.cap_map:
            res["CapMap"] = n.cap_map
        return res


def _mint_tailnet_cert(domain: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Stand-in ACME R1")])
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _parse_addr(v: str) -> str | None:
    """tailscaled accepts IP, IP:port and [v6]:port; returns the IP or None if invalid."""
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        pass
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return None
    if host.startswith("["):
        if not host.endswith("]"):
            return None
        host = host[1:-1]
    elif ":" in host:
        return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tailscaled-standin"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return None

    def address_string(self) -> str:
        return "unix"

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Tailscale-Cap", "130")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, msg: str) -> None:
        self._send(code, (msg + "\n").encode(), "text/plain; charset=utf-8")

    def _json(self, obj: Any) -> None:
        self._send(200, json.dumps(obj, indent="\t").encode() + b"\n", "application/json")

    def do_GET(self) -> None:  # noqa: N802
        net = self.server.tailnet
        self.server.requests.append(self.path)
        host = self.headers.get("Host", "")
        if self.headers.get("Referer") or self.headers.get("Origin") or host not in ("", LOCALAPI_HOST):
            return self._error(403, "invalid localapi request")
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        if path == "/":
            return self._send(200, b"tailscaled\n", "text/plain; charset=utf-8")
        if path == "/localapi/v0/status":
            if not net.permit_read:
                return self._error(403, "status access denied")
            return self._json(net.status(peers=q.get("peers", "true") not in ("false", "0")))
        if path == "/localapi/v0/whois":
            if not net.permit_read:
                return self._error(403, "whois access denied")
            addr = q.get("addr", "")
            if not addr:
                return self._error(400, "missing 'addr' parameter")
            ip = _parse_addr(addr)
            if ip is None:
                return self._error(400, "invalid 'addr' parameter")
            node = net.node_for_ip(ip) if net.backend_state == "Running" else None
            if node is None:
                return self._error(404, "no match for IP:port")
            return self._json(net.whois(node))
        if path.startswith("/localapi/v0/cert/"):
            if not net.permit_cert:
                return self._error(403, "cert access denied")
            domain = unquote(path.removeprefix("/localapi/v0/cert/"))
            if not net.cert_domains:
                return self._error(500, "your Tailscale account does not support getting TLS certs")
            if domain not in net.cert_domains:
                quoted = "[" + " ".join(json.dumps(d) for d in net.cert_domains) + "]"
                return self._error(500, f"invalid domain {json.dumps(domain)}; must be one of {quoted}")
            key_pem, cert_pem = net.cert_pair(domain)
            kind = q.get("type", "")
            if kind in ("", "crt", "cert"):
                return self._send(200, cert_pem, "text/plain")
            if kind == "key":
                return self._send(200, key_pem, "text/plain")
            if kind == "pair":
                return self._send(200, key_pem + cert_pem, "text/plain")
            return self._error(400, 'invalid type; want "cert" (default), "key", or "pair"')
        return self._error(404, "404 page not found")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, path: str, tailnet: Tailnet, requests: list[str]) -> None:
        self.tailnet = tailnet
        self.requests = requests
        super().__init__(path, _Handler)


class LocalAPIStandin:
    """Serve a `Tailnet` on a unix socket in a background thread (context manager)."""

    def __init__(self, socket_path: str | os.PathLike[str], tailnet: Tailnet) -> None:
        self.socket_path = str(socket_path)
        self.tailnet = tailnet
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[str] = []  # request paths served (kept after stop)

    def start(self) -> LocalAPIStandin:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self._server = _Server(self.socket_path, self.tailnet, self.requests)
        os.chmod(self.socket_path, 0o666)  # like tailscaled's socket
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True,
                                        name="localapi-standin")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    def __enter__(self) -> LocalAPIStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tailnet_from_json(cfg: dict[str, Any]) -> Tailnet:
    """Build a Tailnet from a JSON-able dict: {"self": {...Node}, "peers": [...], ...}."""
    nodes = lambda xs: [Node(**x) for x in xs]  # noqa: E731
    opts = {k: v for k, v in cfg.items() if k not in ("self", "peers")}
    return Tailnet(Node(**cfg["self"]), nodes(cfg.get("peers", [])), **opts)


def main(argv: list[str]) -> int:
    """Serve a JSON config until killed (for use from other processes / namespaces)."""
    import signal

    config_path, socket_path = argv[1], argv[2]
    with open(config_path) as f:
        tailnet = tailnet_from_json(json.load(f))
    standin = LocalAPIStandin(socket_path, tailnet).start()
    print("READY", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
