"""Numbers and names every part of lmlink agrees on: ports, environment variables, channel options.

One place, so the server, the client, the link and the command line cannot drift apart.
Only constants and one address parser live here: this module imports nothing from lmlink.
"""

from __future__ import annotations

import ipaddress
import re

GRPC_PORT = 47470  # `lmlink serve` gRPC; also the port dialled on tailnet peers
HTTP_PORT = 47471  # the HTTP bridge (OpenAI-compatible /v1, Shortcuts, /health)
LINK_PORT = 47472  # `lmlink link` on a laptop (use 1234 for tools preset for LM Studio)
LOCAL_SERVER = f"127.0.0.1:{GRPC_PORT}"

# Environment variables.
ENV_SERVER = "LMLINK_SERVER"  # HOST:PORT clients dial instead of discovering
ENV_TOKEN = "LMLINK_TOKEN"  # bearer token sent by admin commands
ENV_STATE_DIR = "LMLINK_STATE_DIR"  # server keys, certificates, state.db
ENV_CONFIG_DIR = "LMLINK_CONFIG_DIR"  # client config.toml, pins, link.toml
ENV_LOCALAPI_SOCKET = "LMLINK_LOCALAPI_SOCKET"  # the Tailscale daemon's LocalAPI socket
ENV_DIRECT_ONLY = "LMLINK_DIRECT_ONLY"  # refuse DERP-relayed tailnet paths
ENV_WEIGHTS_DIR = "LMLINK_WEIGHTS_DIR"  # where cluster ranks cache weights fetched from rank 0
ENV_CLUSTER_TOML = "LMLINK_CLUSTER_TOML"  # cluster file handed to every rank (base64)
ENV_CLUSTER_LINGER = "LMLINK_CLUSTER_LINGER"
ENV_ALLOWED_ORIGINS = "LMLINK_ALLOWED_ORIGINS"  # browser origins the HTTP bridge accepts

# gRPC channel options shared by the sync and async clients.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)

# Keepalive: a link that went silent (laptop asleep, phone off Wi-Fi, tunnel down) is noticed
# within KEEPALIVE_TIME + KEEPALIVE_TIMEOUT instead of the OS's TCP timeout (minutes), and a
# channel reconnects within RECONNECT_MAX after the path is back.
KEEPALIVE_TIME_MS = 15_000
KEEPALIVE_TIMEOUT_MS = 5_000
RECONNECT_MIN_MS = 250
RECONNECT_MAX_MS = 2_000
CLIENT_KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", RECONNECT_MIN_MS),
    ("grpc.min_reconnect_backoff_ms", RECONNECT_MIN_MS),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
)
# The server accepts those pings (its default would answer GOAWAY "too many pings") and pings
# silent clients itself, so a vanished client's stream is detached (resumable) promptly.
SERVER_KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
)
# Clients resume a dropped stream for this long (the server keeps one 60 s by default).
RESUME_WITHIN_S = 60.0

_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})?")


def parse_host_port(text: str, *, allow_zero: bool = False) -> tuple[str, int]:
    """Split `host:port` or `[v6]:port`; ValueError with a short reason for anything else.

    grpc would otherwise wrap an out-of-range port (99999 dials 34463) or treat junk as a
    DNS name and fail much later with a vaguer message.
    """
    text = (text or "").strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not HOST:PORT (e.g. [::1]:{GRPC_PORT})")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:{GRPC_PORT})")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{host!r} is not a host name or address")
    if not port.isdigit():
        raise ValueError(f"port {port!r} in {text!r} is not a number")
    number = int(port)
    if not (0 if allow_zero else 1) <= number <= 65535:
        raise ValueError(f"port {number} in {text!r} is out of range (1-65535)")
    return host, number
