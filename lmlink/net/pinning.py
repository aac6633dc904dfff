"""Client side of end-to-end TLS: trust on first use, then only that exact certificate.

The first connection to a server fetches the leaf it presents, records its fingerprint in
`known_servers.json` (client config dir, 0600) and from then on gives gRPC exactly that leaf
as its only trust anchor. grpcio's BoringSSL accepts a trusted leaf without its issuer
(partial chain) and rejects anything else, even a sibling leaf from the same CA, so the
pin is enforced by the real handshake, not just by our probe. A changed certificate raises
`FingerprintMismatch` naming both fingerprints; it is never silently re-pinned.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import ipaddress
import json
import os
import socket
import ssl
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import grpc
from cryptography import x509

from lmlink import defaults
from lmlink.net import proxy
from lmlink.net.files import private_dir, write_private
from lmlink.net.tls import IssuedCert, fingerprint, first_cert_pem

CONFIG_ENV = defaults.ENV_CONFIG_DIR
KNOWN_SERVERS = "known_servers.json"

# How long fetching a server's certificate may take. The first connection to a tailnet peer
# often loses its first WireGuard handshake initiation (the peer's netmap does not list us yet,
# or its DERP connection is still coming up), and WireGuard retries only after REKEY_TIMEOUT,
# 5 s: a first contact then takes a little over 5 s, more on a loaded host. 12 s leaves room
# for that retry and one more, so a user never sees "timed out" against a server that just
# joined; an unreachable server still fails within it (refused connections fail at once).
FETCH_TIMEOUT = 12.0


class PinningError(Exception):
    """Fetching or checking a server certificate failed; one-line reason."""


class FingerprintMismatch(PinningError):
    """The server presented a different certificate than the one pinned for it."""

    def __init__(self, server: str, pinned: str, presented: str, store: Path) -> None:
        self.server, self.pinned, self.presented, self.store = server, pinned, presented, store
        super().__init__(
            f"SERVER CERTIFICATE CHANGED for {server}: pinned {pinned}, but it presented "
            f"{presented}. Refusing to connect: this may be an interception attempt. If the "
            f"server's certificate was deliberately replaced, verify the new fingerprint on the "
            f"server (`lmlink status` there) and remove the entry for {server} from {store}."
        )


def default_config_dir() -> Path:
    """$LMLINK_CONFIG_DIR, else $XDG_CONFIG_HOME/lmlink, else ~/.config/lmlink."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "lmlink"


def server_key(host: str, port: int) -> str:
    """The key a server is pinned under: 'host:port' ('[v6]:port'), host lowercased."""
    host = host.strip("[]").lower().rstrip(".")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PinStore:
    """`known_servers.json`: server key -> pinned fingerprint (and when it was first seen)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_config_dir() / KNOWN_SERVERS

    @contextmanager
    def _changing(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write under a lock: two first contacts at once (discovery confirms the
        mDNS and tailnet entries of one server in parallel) must not lose either pin. The
        thread lock orders this process's threads, flock other lmlink processes."""
        private_dir(self.path.parent)
        with _PIN_LOCK, open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            servers = self._load()
            yield servers
            self._save(servers)

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise PinningError(f"cannot read pinned servers from {self.path}: {e}") from None
        servers = data.get("servers") if isinstance(data, dict) else None
        if not isinstance(servers, dict):
            raise PinningError(f"{self.path} is not an lmlink known-servers file")
        return servers

    def _save(self, servers: dict[str, Any]) -> None:
        private_dir(self.path.parent)
        body = json.dumps({"version": 1, "servers": servers}, indent=2, sort_keys=True) + "\n"
        write_private(self.path, body.encode())

    def get(self, server: str) -> str | None:
        entry = self._load().get(server)
        return entry.get("fingerprint") if isinstance(entry, dict) else None

    def pin(self, server: str, fp: str) -> None:
        with self._changing() as servers:
            servers[server] = _entry(fp)

    def forget(self, server: str) -> bool:
        with self._changing() as servers:
            return servers.pop(server, None) is not None

    def verify(self, server: str, fp: str) -> bool:
        """Pin on first use (returns True), accept a match (False), raise on any change."""
        pinned = self.get(server)
        if pinned is None:
            with self._changing() as servers:  # look again: another thread may have pinned it
                entry = servers.get(server)
                pinned = entry.get("fingerprint") if isinstance(entry, dict) else None
                if pinned is None:
                    servers[server] = _entry(fp)
                    return True
        if pinned != fp:
            raise FingerprintMismatch(server, pinned, fp, self.path)
        return False


_PIN_LOCK = threading.Lock()


def _entry(fp: str) -> dict[str, str]:
    return {"fingerprint": fp, "first_seen": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def fetch_server_certificate(
    host: str, port: int, *, timeout: float = FETCH_TIMEOUT, client_cert: IssuedCert | None = None,
    source_address: tuple[str, int] | None = None,
) -> bytes:
    """The leaf certificate (PEM) the server presents; no verification (that is the pin's job).

    `timeout` bounds the whole fetch (connect, proxy CONNECT and TLS handshake together).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    if client_cert is not None:
        _load_client_cert(ctx, client_cert)
    sni = None if _is_ip(host) else host
    deadline = time.monotonic() + timeout
    try:
        # through tailscaled's CONNECT proxy on a userspace-networking device (env, as gRPC)
        with _connect(host.strip("[]"), port, deadline, source_address) as raw:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            raw.settimeout(left)  # the handshake's reads share what is left of the deadline
            with ctx.wrap_socket(raw, server_hostname=sni) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as e:
        raise PinningError(f"cannot fetch the TLS certificate of {server_key(host, port)}: {e}") from None
    if not der:
        raise PinningError(f"{server_key(host, port)} presented no certificate")
    return ssl.DER_cert_to_PEM_cert(der).encode()


# A tailnet peer that just joined is unroutable until this device's netmap lists it (the
# kernel answers "Network is unreachable" from the TUN routes): usually well under a second.
_NOT_ROUTED_YET = (errno.ENETUNREACH, errno.EHOSTUNREACH)


def _connect(host: str, port: int, deadline: float,
             source_address: tuple[str, int] | None) -> socket.socket:
    """Connect before `deadline`, trying again while the address is not routed yet."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        try:
            return proxy.create_connection((host, port), timeout=left, source_address=source_address)
        except OSError as e:
            if e.errno not in _NOT_ROUTED_YET or deadline - time.monotonic() < 0.25:
                raise
            time.sleep(0.25)


def _load_client_cert(ctx: ssl.SSLContext, cert: IssuedCert) -> None:
    # ssl wants files; a private temp dir keeps the key 0600 for the instant it exists.
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        c, k = Path(d) / "c.pem", Path(d) / "k.pem"
        write_private(c, cert.cert_pem)
        write_private(k, cert.key_pem)
        ctx.load_cert_chain(c, k)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def target_name(cert_pem: bytes) -> str:
    """A name the pinned certificate is valid for (grpc checks one; the pin is what matters)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for name in san.get_values_for_type(x509.DNSName):
            if not name.startswith("*"):
                return name
        for ip in san.get_values_for_type(x509.IPAddress):
            return str(ip)
    except x509.ExtensionNotFound:
        pass
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    if cn:
        return str(cn[0].value)
    raise PinningError("pinned certificate names no host (no SAN, no CN)")


@dataclass(frozen=True)
class PinnedServer:
    """A server whose certificate was fetched and matched its pin (or was just pinned)."""

    key: str
    cert_pem: bytes
    fingerprint: str
    newly_pinned: bool

    def channel_credentials(self, client_cert: IssuedCert | None = None) -> grpc.ChannelCredentials:
        """Credentials that trust exactly this certificate (plus a client cert for mTLS)."""
        if client_cert is None:
            return grpc.ssl_channel_credentials(root_certificates=self.cert_pem)
        return grpc.ssl_channel_credentials(
            root_certificates=self.cert_pem,
            private_key=client_cert.key_pem,
            certificate_chain=client_cert.cert_pem,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        """Check the hostname against the pinned cert's own name, so dialing by IP works."""
        return [("grpc.ssl_target_name_override", target_name(self.cert_pem))]


def pin_server(
    host: str, port: int, *, store: PinStore | None = None, timeout: float = FETCH_TIMEOUT,
    client_cert: IssuedCert | None = None, expected: str | None = None,
) -> PinnedServer:
    """Fetch the server's certificate and check it against its pin (TOFU on first contact).

    `expected` (e.g. a fingerprint from an mDNS TXT record or the user) must match the
    presented certificate even on first contact.
    """
    store = store or PinStore()
    key = server_key(host, port)
    pem = fetch_server_certificate(host, port, timeout=timeout, client_cert=client_cert)
    fp = fingerprint(pem)
    if expected is not None and expected != fp:
        raise FingerprintMismatch(key, expected, fp, store.path)
    newly = store.verify(key, fp)
    return PinnedServer(key, pem, fp, newly)


def pinned_credentials(
    pinned_pem: bytes, client_cert: IssuedCert | None = None
) -> tuple[grpc.ChannelCredentials, list[tuple[str, str]]]:
    """(credentials, options) trusting only the first (leaf) certificate of `pinned_pem`."""
    leaf = first_cert_pem(pinned_pem)
    p = PinnedServer("", leaf, fingerprint(leaf), False)
    return p.channel_credentials(client_cert), p.channel_options()


def _client_cert_paths(server: str, config_dir: Path | None) -> tuple[Path, Path]:
    d = (config_dir or default_config_dir()) / "client-certs"
    safe = server.replace("/", "_").replace(":", "_").replace("[", "").replace("]", "")
    return d / f"{safe}.pem", d / f"{safe}.key"


def save_client_cert(server: str, cert: IssuedCert, config_dir: Path | None = None) -> Path:
    """Keep an enrolled device's certificate for one server (key 0600, dir 0700)."""
    cert_path, key_path = _client_cert_paths(server, config_dir)
    private_dir(cert_path.parent)
    write_private(key_path, cert.key_pem)
    write_private(cert_path, cert.cert_pem)
    return cert_path


def load_client_cert(server: str, config_dir: Path | None = None) -> IssuedCert | None:
    """The certificate this device enrolled with for `server`, if any."""
    cert_path, key_path = _client_cert_paths(server, config_dir)
    if not (cert_path.exists() and key_path.exists()):
        return None
    return IssuedCert(cert_path.read_bytes(), key_path.read_bytes())
