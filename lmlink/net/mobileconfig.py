"""An iOS/iPadOS configuration profile that installs lmlink's project CA.

Where the tailnet offers no HTTPS certificates, the bridge presents a leaf signed by the
server's own CA. iOS trusts it only after the user installs this profile once and turns on
full trust for it (Settings > General > About > Certificate Trust Settings). The profile holds
the CA certificate only (public data, no key); its identifiers are derived from the CA's
fingerprint so re-downloading the same CA replaces rather than duplicates it.
"""

from __future__ import annotations

import plistlib
import uuid

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lmlink.net.tls import fingerprint

MIME_TYPE = "application/x-apple-aspen-config"
_NAMESPACE = uuid.UUID("6f0e0a53-5f7c-4d0e-9a55-6c6d6c696e6b")


def ca_profile(ca_pem: bytes, server_name: str) -> bytes:
    """The .mobileconfig (XML plist) carrying `ca_pem` as a trusted root payload."""
    cert = x509.load_pem_x509_certificate(ca_pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    fp = fingerprint(ca_pem)
    ident = f"dev.lmlink.ca.{fp.replace(':', '')[:16].lower()}"
    payload = {
        "PayloadType": "com.apple.security.root",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{ident}.root",
        "PayloadUUID": str(uuid.uuid5(_NAMESPACE, fp + "/root")).upper(),
        "PayloadDisplayName": f"lmlink CA for {server_name}",
        "PayloadDescription": "Lets this device verify the lmlink server's TLS certificate.",
        "PayloadCertificateFileName": "lmlink-ca.cer",
        "PayloadContent": der,
    }
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": ident,
        "PayloadUUID": str(uuid.uuid5(_NAMESPACE, fp)).upper(),
        "PayloadDisplayName": f"lmlink: {server_name}",
        "PayloadDescription": (f"Trust the lmlink server {server_name} on your tailnet. "
                               f"CA fingerprint (SHA-256): {fp}"),
        "PayloadOrganization": "lmlink",
        "PayloadRemovalDisallowed": False,
        "PayloadContent": [payload],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML)


def ca_from_profile(profile: bytes) -> bytes:
    """The CA certificate (PEM) a profile installs: what a phone would trust after install."""
    data = plistlib.loads(profile)
    roots = [p for p in data.get("PayloadContent", []) if p.get("PayloadType") == "com.apple.security.root"]
    if len(roots) != 1:
        raise ValueError("profile does not carry exactly one root certificate")
    cert = x509.load_der_x509_certificate(roots[0]["PayloadContent"])
    return cert.public_bytes(serialization.Encoding.PEM)
