"""The iOS profile carries exactly the server's CA, and trusting only it verifies the server by name."""

from __future__ import annotations

import plistlib
import socket
import ssl
import threading
from pathlib import Path

import pytest

from lmlink.net.mobileconfig import ca_from_profile, ca_profile
from lmlink.net.tls import ProjectCA, server_tls

NAME = "mac-studio.tail1234.ts.net"


def _serve_once(ctx: ssl.SSLContext) -> tuple[int, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return port, t


def _phone_handshake(port: int, trusted_pem: bytes, hostname: str) -> bytes:
    """A client trusting only what the phone trusts after installing the profile."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=trusted_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=hostname) as tls:
            return tls.recv(2)


def test_profile_is_a_valid_configuration_with_the_ca(tmp_path: Path) -> None:
    ca = ProjectCA.load_or_create(tmp_path)
    profile = ca_profile(ca.cert_pem, NAME)
    data = plistlib.loads(profile)
    assert data["PayloadType"] == "Configuration"
    assert [p["PayloadType"] for p in data["PayloadContent"]] == ["com.apple.security.root"]
    assert ca_from_profile(profile) == ca.cert_pem
    # the same CA gives the same identifiers: a re-download replaces the profile
    again = plistlib.loads(ca_profile(ca.cert_pem, NAME))
    assert again["PayloadUUID"] == data["PayloadUUID"]
    other = plistlib.loads(ca_profile(ProjectCA.load_or_create(tmp_path / "other").cert_pem, NAME))
    assert other["PayloadUUID"] != data["PayloadUUID"]
    assert b"PRIVATE KEY" not in profile


def test_phone_trusting_the_profile_verifies_the_server_by_name(tmp_path: Path) -> None:
    tls = server_tls(tmp_path, [NAME, "100.64.0.7"])
    trusted = ca_from_profile(ca_profile(tls.client_ca_pem, NAME))
    port, t = _serve_once(tls.ssl_context())
    assert _phone_handshake(port, trusted, NAME) == b"ok"
    t.join(5)


def test_phone_refuses_wrong_name_or_without_the_profile(tmp_path: Path) -> None:
    tls = server_tls(tmp_path, [NAME])
    port, t = _serve_once(tls.ssl_context())
    with pytest.raises(ssl.SSLCertVerificationError):
        _phone_handshake(port, ca_from_profile(ca_profile(tls.client_ca_pem, NAME)), "evil.example.com")
    t.join(5)
    stranger = ProjectCA.load_or_create(tmp_path / "stranger").cert_pem
    port, t = _serve_once(tls.ssl_context())
    with pytest.raises(ssl.SSLCertVerificationError):
        _phone_handshake(port, stranger, NAME)
    t.join(5)


def test_leaf_meets_apples_tls_certificate_rules(tmp_path: Path) -> None:
    """iOS rejects trusted-CA leaves over 825 days, without a SAN or serverAuth EKU, or SHA-1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    leaf = x509.load_pem_x509_certificate(server_tls(tmp_path, [NAME]).cert_chain_pem)
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days <= 825
    assert NAME in leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert ExtendedKeyUsageOID.SERVER_AUTH in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
