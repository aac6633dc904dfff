"""Server-side TLS material: end-to-end TLS on top of WireGuard, never plaintext off-box.

The server presents, in order of preference:
1. the node's tailnet certificate (LocalAPI cert pair for its `*.ts.net` name) when the tailnet
   provides one and tailscaled lets us fetch it;
2. otherwise a leaf issued by a project CA that lmlink creates with `cryptography` on first
   start in `<state_dir>/tls/` (dir 0700, keys 0600) and reuses on every restart.

The project CA also signs client certificates for devices enrolled with `lmlink enroll`, so the
server can ask for (or require) mutual TLS whatever its own certificate is.
Clients pin the presented leaf (see `lmlink.net.pinning`), so neither source needs public trust.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lmlink.net.files import private_dir, read_private, write_private

if TYPE_CHECKING:
    from lmlink.net.localapi import LocalAPI

log = logging.getLogger(__name__)

TLS_DIRNAME = "tls"
CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CA_DAYS, LEAF_DAYS, CLIENT_DAYS = 3650, 825, 365
RENEW_BEFORE = dt.timedelta(days=30)

CertSource = Literal["tailnet", "project-ca"]


class TLSMaterialError(Exception):
    """TLS files are unusable (unreadable, corrupt, wrong key); the message says which file."""


# -- small helpers ---------------------------------------------------------------------


def _first_cert_der(cert_pem: bytes | str) -> bytes:
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    if b"-----BEGIN" not in data:  # already DER
        return data
    return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)


def first_cert_pem(cert_pem: bytes | str) -> bytes:
    """The first certificate of a PEM chain (the leaf), re-encoded as PEM."""
    return x509.load_der_x509_certificate(_first_cert_der(cert_pem)).public_bytes(
        serialization.Encoding.PEM)


def fingerprint(cert_pem: bytes | str) -> str:
    """'sha256:<hex>' of the first certificate's DER: what clients pin and users compare."""
    return "sha256:" + hashlib.sha256(_first_cert_der(cert_pem)).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _read(path: Path, *, private: bool = False) -> bytes:
    return read_private(path) if private else path.read_bytes()


def _split_names(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Separate DNS names from IP literals, normalized, de-duplicated, order kept."""
    dns: list[str] = []
    ips: list[str] = []
    for n in names:
        n = n.strip().rstrip(".").strip("[]")
        if not n:
            continue
        try:
            ip = str(ipaddress.ip_address(n))
            if ip not in ips:
                ips.append(ip)
        except ValueError:
            if n.lower() not in dns:
                dns.append(n.lower())
    return dns, ips


def cert_names(cert: x509.Certificate) -> set[str]:
    """DNS and IP SANs of a certificate, normalized."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    dns = {d.lower() for d in san.get_values_for_type(x509.DNSName)}
    ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    return dns | ips


# -- the project CA --------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedCert:
    """A certificate and its private key, PEM; `fingerprint` is the cert's."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)


class ProjectCA:
    """lmlink's own CA for one server: signs its TLS leaf and enrolled clients' certificates."""

    def __init__(self, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
        self.directory = directory
        self.cert = cert
        self.key = key

    @property
    def cert_pem(self) -> bytes:
        return _pem(self.cert)

    @classmethod
    def load_or_create(cls, state_dir: str | os.PathLike[str], name: str = "lmlink") -> ProjectCA:
        """Load `<state_dir>/tls/ca.{pem,key}`, creating them (0600) on first start."""
        d = private_dir(Path(state_dir) / TLS_DIRNAME)
        cert_path, key_path = d / CA_CERT, d / CA_KEY
        if cert_path.exists() and key_path.exists():
            try:
                cert = x509.load_pem_x509_certificate(_read(cert_path))
                key = serialization.load_pem_private_key(_read(key_path, private=True), None)
            except (ValueError, TypeError, OSError) as e:
                raise TLSMaterialError(f"project CA in {d} is unusable: {e}") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
                raise TLSMaterialError(f"project CA key {key_path} does not match {cert_path}")
            return cls(d, cert, key)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lmlink"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} project CA"),
        ])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(key_path, _key_pem(key))
        write_private(cert_path, _pem(cert), mode=0o644)
        log.info("created project CA %s in %s", fingerprint(_pem(cert)), d)
        return cls(d, cert, key)

    def _leaf(
        self,
        common_name: str,
        key: ec.EllipticCurvePrivateKey,
        days: int,
        san: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> x509.Certificate:
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_server(self, names: Iterable[str], days: int = LEAF_DAYS) -> IssuedCert:
        """A server leaf whose SANs are exactly `names` (DNS names and IP literals)."""
        dns, ips = _split_names(names)
        if not dns and not ips:
            raise ValueError("a server certificate needs at least one hostname or IP")
        san: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        san += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._leaf((dns or ips)[0], key, days, san, ExtendedKeyUsageOID.SERVER_AUTH)
        return IssuedCert(_pem(cert), _key_pem(key))

    def issue_client(self, device: str, days: int = CLIENT_DAYS) -> IssuedCert:
        """A client certificate for an enrolled device; its CN is the device name."""
        if not device or any(c in device for c in "\n\r\0/"):
            raise ValueError(f"invalid device name {device!r}")
        key = ec.generate_private_key(ec.SECP256R1())
        san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"lmlink://device/{device}")]
        cert = self._leaf(device, key, days, san, ExtendedKeyUsageOID.CLIENT_AUTH)
        return IssuedCert(_pem(cert), _key_pem(key))


def issue_client_cert(state_dir: str | os.PathLike[str], device: str, days: int = CLIENT_DAYS) -> IssuedCert:
    """What `lmlink enroll` calls on the server: a client cert signed by the project CA."""
    return ProjectCA.load_or_create(state_dir).issue_client(device, days)


# -- what the server presents ----------------------------------------------------------


@dataclass(frozen=True)
class ServerTLS:
    """The material a TLS gRPC listener needs, plus what to tell clients about it."""

    cert_chain_pem: bytes  # leaf first
    key_pem: bytes
    source: CertSource
    client_ca_pem: bytes  # project CA: verifies enrolled clients' certificates

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the leaf: what clients pin, mDNS TXT records carry, status shows."""
        return fingerprint(self.cert_chain_pem)

    def ssl_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """The same material as an `ssl.SSLContext` (for the HTTP bridge), ALPN h2 + http/1.1."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        with tempfile.TemporaryDirectory() as d:  # ssl loads from files; keep them private
            cert, key = Path(d) / "cert.pem", Path(d) / "key.pem"
            write_private(cert, self.cert_chain_pem)
            write_private(key, self.key_pem)
            ctx.load_cert_chain(cert, key)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=self.client_ca_pem.decode())
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        return ctx

    def write_files(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write cert chain + key (0600, dir 0700) for servers that want paths (e.g. uvicorn)."""
        d = private_dir(Path(directory))
        cert, key = d / "active-cert.pem", d / "active-key.pem"
        write_private(key, self.key_pem)
        write_private(cert, self.cert_chain_pem)
        return cert, key


def _project_leaf(ca: ProjectCA, names: list[str]) -> IssuedCert:
    """Reuse `<tls>/server.{pem,key}` while it covers `names` and is not expiring; else reissue."""
    cert_path, key_path = ca.directory / SERVER_CERT, ca.directory / SERVER_KEY
    dns, ips = _split_names(names)
    wanted = set(dns) | set(ips)
    if cert_path.exists() and key_path.exists():
        try:
            cert_pem, key_pem = _read(cert_path), _read(key_path, private=True)
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, None)
            fresh = cert.not_valid_after_utc - _now() > RENEW_BEFORE
            ours = cert.issuer == ca.cert.subject and _signed_by(cert, ca.cert)
            if fresh and ours and wanted <= cert_names(cert) and key.public_key() == cert.public_key():
                return IssuedCert(cert_pem, key_pem)
            log.warning("reissuing server certificate (names, issuer or expiry changed); "
                        "clients that pinned the old one will refuse it until re-trusted")
        except (ValueError, TypeError, OSError) as e:
            log.warning("server certificate in %s unusable (%s); reissuing", ca.directory, e)
    issued = ca.issue_server([*dns, *ips])
    write_private(key_path, issued.key_pem)
    write_private(cert_path, issued.cert_pem, mode=0o644)
    return issued


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, Exception):  # InvalidSignature lives in another module
        return False


def server_tls(
    state_dir: str | os.PathLike[str],
    names: Iterable[str],
    *,
    localapi: LocalAPI | None = None,
    tailnet_domain: str | None = None,
) -> ServerTLS:
    """Pick the server's TLS material: tailnet cert when available, else the project CA's leaf.

    `names` are the hostnames/IPs clients will dial (SANs of the project leaf). With `localapi`,
    the node's cert domain (or `tailnet_domain`) is tried first; any LocalAPI refusal (403
    without cert permission, 500 when HTTPS certs are off for the tailnet) falls back quietly
    to the project CA, with one log line saying why.
    """
    ca = ProjectCA.load_or_create(state_dir)
    if localapi is not None:
        from lmlink.net.localapi import LocalAPIError

        try:
            domain = tailnet_domain
            if domain is None:
                me = localapi.self_node()
                domains = me.cert_domains
                domain = me.dns_name if me.dns_name in domains else (domains[0] if domains else None)
            if domain:
                cert_pem, key_pem = localapi.cert_pair(domain)
                return ServerTLS(cert_pem, key_pem, "tailnet", ca.cert_pem)
            log.info("tailnet offers no certificate for this node; using the project CA")
        except LocalAPIError as e:
            log.info("tailnet certificate unavailable (%s); using the project CA", e)
    leaf = _project_leaf(ca, list(names))
    return ServerTLS(leaf.cert_pem + ca.cert_pem, leaf.key_pem, "project-ca", ca.cert_pem)


def server_credentials(tls: ServerTLS, *, require_client_cert: bool = False) -> grpc.ServerCredentials:
    """gRPC server credentials; with `require_client_cert`, only enrolled devices get in (mTLS).

    grpcio's Python API can either require and verify client certificates or not request
    them at all; "verify if presented" is not available, so mTLS is a server-wide switch.
    """
    if not require_client_cert:
        return grpc.ssl_server_credentials([(tls.key_pem, tls.cert_chain_pem)])
    return grpc.ssl_server_credentials(
        [(tls.key_pem, tls.cert_chain_pem)],
        root_certificates=tls.client_ca_pem,
        require_client_auth=True,
    )


def enrolled_device(auth_context: dict[str, list[bytes]]) -> str | None:
    """The enrolled device name from a verified client certificate (grpc `auth_context()`)."""
    if auth_context.get("transport_security_type") != [b"ssl"]:
        return None
    for uri in auth_context.get("x509_subject_alternative_name", []):
        text = uri.decode(errors="replace")
        if text.startswith("lmlink://device/"):
            return text.removeprefix("lmlink://device/")
    names = auth_context.get("x509_common_name")
    return names[0].decode(errors="replace") if names else None
