"""Choose channel security for a target: plaintext only to loopback, pinned TLS otherwise.

Off-box traffic is always TLS with the server's certificate pinned on first use (see
lmlink.net.pinning), and an enrolled device's client certificate is sent when one exists.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import grpc

from .errors import LmlinkError, Unavailable


class TrustError(LmlinkError):
    """The server's certificate does not match its pin (or could not be checked)."""

    code = grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True)
class ChannelSecurity:
    credentials: grpc.ChannelCredentials | None = None
    options: list[tuple[str, Any]] = field(default_factory=list)
    fingerprint: str = ""


def split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise LmlinkError(f"server address {target!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def channel_security(
    target: str, *, tls: bool | None = None, expected_fingerprint: str | None = None,
    timeout: float | None = None,
) -> ChannelSecurity:
    """Plaintext for loopback targets unless `tls=True`; pinned TLS for everything else.

    `timeout` bounds fetching the certificate (default: the pin module's first-contact bound).
    """
    host, port = split_target(target)
    if tls is False and not is_loopback_host(host):
        raise LmlinkError("plaintext is only allowed to loopback servers")
    if tls is None:
        tls = not is_loopback_host(host)
    if not tls:
        return ChannelSecurity()
    from lmlink.net.pinning import (
        FingerprintMismatch,
        PinningError,
        load_client_cert,
        pin_server,
        server_key,
    )

    client_cert = load_client_cert(server_key(host, port))
    try:
        pinned = pin_server(host, port, client_cert=client_cert, expected=expected_fingerprint,
                            **({} if timeout is None else {"timeout": timeout}))
    except FingerprintMismatch as exc:
        error = TrustError(str(exc))
        error.expected, error.presented = exc.pinned, exc.presented  # type: ignore[attr-defined]
        raise error from None
    except PinningError as exc:
        raise Unavailable(f"cannot reach lmlink server at {target} ({exc})") from None
    return ChannelSecurity(
        pinned.channel_credentials(client_cert), pinned.channel_options(), pinned.fingerprint
    )


def channel_settings(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    options: list[tuple[str, Any]],
    *,
    tls: bool | None,
    expected_fingerprint: str | None,
    timeout: float | None = None,
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]], str]:
    """(credentials, options, pinned fingerprint) for a client channel; shared by both clients.

    Explicit credentials are used as given; otherwise `channel_security` decides.
    """
    if credentials is not None:
        return credentials, options, ""
    security = channel_security(target, tls=tls, expected_fingerprint=expected_fingerprint,
                                timeout=timeout)
    return security.credentials, [*options, *security.options], security.fingerprint
