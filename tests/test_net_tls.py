"""TLS material, TOFU pinning and mTLS, against real grpc servers on loopback."""

from __future__ import annotations

import json
import os
import stat
import threading

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lmlink.net.localapi import LocalAPI
from lmlink.net.pinning import (
    FingerprintMismatch,
    PinStore,
    load_client_cert,
    pin_server,
    pinned_credentials,
    save_client_cert,
)
from lmlink.net.tls import (
    ProjectCA,
    cert_names,
    enrolled_device,
    fingerprint,
    issue_client_cert,
    server_credentials,
    server_tls,
)
from support.localapi_standin import LocalAPIStandin, Node, Tailnet

NAMES = ["studio.tail1234.ts.net", "127.0.0.1"]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_project_ca_files_modes_and_reuse(tmp_path):
    tls1 = server_tls(tmp_path, NAMES)
    d = tmp_path / "tls"
    assert tls1.source == "project-ca"
    assert mode(d) == 0o700
    assert mode(d / "ca.key") == 0o600 and mode(d / "server.key") == 0o600
    leaf = x509.load_pem_x509_certificate(tls1.cert_chain_pem)
    assert cert_names(leaf) == {"studio.tail1234.ts.net", "127.0.0.1"}
    # restart: same CA, same leaf, same fingerprint
    tls2 = server_tls(tmp_path, NAMES)
    assert tls2.fingerprint == tls1.fingerprint
    assert tls2.client_ca_pem == tls1.client_ca_pem
    # a subset of names is still covered: no reissue
    assert server_tls(tmp_path, ["127.0.0.1"]).fingerprint == tls1.fingerprint
    # a new name forces a new leaf from the same CA
    tls3 = server_tls(tmp_path, [*NAMES, "100.87.0.1"])
    assert tls3.fingerprint != tls1.fingerprint and tls3.client_ca_pem == tls1.client_ca_pem
    assert "100.87.0.1" in cert_names(x509.load_pem_x509_certificate(tls3.cert_chain_pem))


def test_loose_key_permissions_are_tightened(tmp_path):
    server_tls(tmp_path, NAMES)
    os.chmod(tmp_path / "tls" / "ca.key", 0o644)
    ProjectCA.load_or_create(tmp_path)
    assert mode(tmp_path / "tls" / "ca.key") == 0o600


def test_fingerprint_format_and_stability(tmp_path):
    tls = server_tls(tmp_path, NAMES)
    fp = fingerprint(tls.cert_chain_pem)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    leaf_der = x509.load_pem_x509_certificate(tls.cert_chain_pem).public_bytes(Encoding.DER)
    assert fingerprint(leaf_der) == fp  # DER and PEM agree; chain -> first cert


def test_tailnet_cert_preferred_and_fallback(tmp_path):
    me = Node("studio.tail1234.ts.net", ["100.87.0.1"], login_name="o@x", user_id=1)
    net = Tailnet(me, [], cert_domains=["studio.tail1234.ts.net"])
    with LocalAPIStandin(tmp_path / "ts.sock", net) as s:
        tls = server_tls(tmp_path / "state", NAMES, localapi=LocalAPI(s.socket_path))
        assert tls.source == "tailnet"
        assert cert_names(x509.load_pem_x509_certificate(tls.cert_chain_pem)) == {"studio.tail1234.ts.net"}
        assert any(r.startswith("/localapi/v0/cert/studio.tail1234.ts.net?type=pair") for r in s.requests)
        net.permit_cert = False  # 403 -> project CA
        assert server_tls(tmp_path / "state", NAMES, localapi=LocalAPI(s.socket_path)).source == "project-ca"
        net.permit_cert, net.cert_domains = True, []  # HTTPS certs off -> project CA
        assert server_tls(tmp_path / "state", NAMES, localapi=LocalAPI(s.socket_path)).source == "project-ca"


async def start_health_server(creds: grpc.ServerCredentials, *, auth_seen: list | None = None):
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    if auth_seen is not None:
        class Recording(health.aio.HealthServicer):
            async def Check(self, request, context):  # noqa: N802
                auth_seen.append(context.auth_context())
                return await super().Check(request, context)
        servicer = Recording()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    return server, port


async def health_check(port: int, creds, options) -> int:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


async def test_tofu_pin_then_connect(tmp_path):
    tls = server_tls(tmp_path / "srv", NAMES)
    server, port = await start_health_server(server_credentials(tls))
    try:
        store = PinStore(tmp_path / "client" / "known_servers.json")
        first = pin_server("127.0.0.1", port, store=store)
        assert first.newly_pinned and first.fingerprint == tls.fingerprint
        assert mode(store.path) == 0o600 and mode(store.path.parent) == 0o700
        saved = json.loads(store.path.read_text())["servers"][f"127.0.0.1:{port}"]
        assert saved["fingerprint"] == tls.fingerprint
        again = pin_server("127.0.0.1", port, store=store)
        assert not again.newly_pinned
        status = await health_check(port, again.channel_credentials(), again.channel_options())
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)


async def test_changed_certificate_fails_loudly(tmp_path):
    store = PinStore(tmp_path / "known_servers.json")
    tls = server_tls(tmp_path / "srv", NAMES)
    server, port = await start_health_server(server_credentials(tls))
    try:
        store.pin(f"127.0.0.1:{port}", "sha256:" + "0" * 64)
        with pytest.raises(FingerprintMismatch) as err:
            pin_server("127.0.0.1", port, store=store)
        msg = str(err.value)
        assert "SERVER CERTIFICATE CHANGED" in msg
        assert "sha256:" + "0" * 64 in msg and tls.fingerprint in msg and str(store.path) in msg
        assert store.get(f"127.0.0.1:{port}") == "sha256:" + "0" * 64  # never re-pinned silently
        with pytest.raises(FingerprintMismatch):  # an expected fingerprint is checked too
            pin_server("127.0.0.1", port, store=PinStore(tmp_path / "other.json"),
                       expected="sha256:" + "1" * 64)
    finally:
        await server.stop(None)


async def test_grpc_refuses_any_other_certificate_even_same_ca(tmp_path):
    """The pin is enforced by grpc's handshake: a sibling leaf from the same CA is rejected."""
    tls = server_tls(tmp_path / "srv", NAMES)
    ca = ProjectCA.load_or_create(tmp_path / "srv")
    sibling = ca.issue_server(NAMES)
    server, port = await start_health_server(server_credentials(tls))
    try:
        creds, opts = pinned_credentials(sibling.cert_pem)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_check(port, creds, opts)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # pinning from a full chain trusts only its leaf, not the CA behind it
        chain_creds, chain_opts = pinned_credentials(sibling.cert_pem + ca.cert_pem)
        with pytest.raises(grpc.aio.AioRpcError):
            await health_check(port, chain_creds, chain_opts)
        good_creds, good_opts = pinned_credentials(tls.cert_chain_pem)
        assert await health_check(port, good_creds, good_opts) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)


async def test_mtls_required_refuses_without_client_cert(tmp_path):
    state = tmp_path / "srv"
    tls = server_tls(state, NAMES)
    seen: list = []
    server, port = await start_health_server(server_credentials(tls, require_client_cert=True), auth_seen=seen)
    try:
        store = PinStore(tmp_path / "known.json")
        device = issue_client_cert(state, "alice-laptop")
        pinned = pin_server("127.0.0.1", port, store=store, client_cert=device)
        # no client certificate: the handshake is refused
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_check(port, pinned.channel_credentials(), pinned.channel_options())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not seen
        # a certificate from another CA: refused too
        stranger = issue_client_cert(tmp_path / "other-ca", "mallory")
        with pytest.raises(grpc.aio.AioRpcError):
            await health_check(port, pinned.channel_credentials(stranger), pinned.channel_options())
        # the enrolled device's certificate: accepted, and the servicer can name the device
        ok = await health_check(port, pinned.channel_credentials(device), pinned.channel_options())
        assert ok == health_pb2.HealthCheckResponse.SERVING
        assert enrolled_device(seen[-1]) == "alice-laptop"
    finally:
        await server.stop(None)


async def test_without_mtls_client_certs_are_not_requested(tmp_path):
    tls = server_tls(tmp_path / "srv", NAMES)
    seen: list = []
    server, port = await start_health_server(server_credentials(tls), auth_seen=seen)
    try:
        creds, opts = pinned_credentials(tls.cert_chain_pem, issue_client_cert(tmp_path / "srv", "phone"))
        assert await health_check(port, creds, opts) == health_pb2.HealthCheckResponse.SERVING
        assert enrolled_device(seen[-1]) is None
    finally:
        await server.stop(None)


def test_first_contacts_at_once_keep_every_pin(tmp_path):
    """Discovery confirms the mDNS and tailnet entries of one server in parallel threads, both
    pinning on first use. The temp file shared by same-process writers made one of them fail
    (FileNotFoundError from the rename, leaving that entry unconfirmed: the server listed twice
    by `discover`) and the read-modify-write lost pins; 8 threads at once show both."""
    store = PinStore(tmp_path / "cfg" / "known_servers.json")
    start = threading.Barrier(8)
    errors: list[str] = []

    def first_contact(i: int) -> None:
        start.wait()
        try:
            for server in (f"100.64.0.{i}:47470", "100.64.0.99:47470"):  # own server, then a shared one
                store.verify(server, "sha256:" + ("99" if server.startswith("100.64.0.99") else f"{i:02x}") * 32)
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            errors.append(repr(exc))

    threads = [threading.Thread(target=first_contact, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [store.get(f"100.64.0.{i}:47470") for i in range(8)] == ["sha256:" + f"{i:02x}" * 32 for i in range(8)]
    assert store.get("100.64.0.99:47470") == "sha256:" + "99" * 32
    assert mode(store.path) == 0o600
    assert [p.name for p in store.path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_client_cert_store_modes(tmp_path):
    device = issue_client_cert(tmp_path / "srv", "tablet")
    path = save_client_cert("studio.ts.net:47470", device, config_dir=tmp_path / "cfg")
    assert mode(path.with_suffix(".key")) == 0o600 and mode(path.parent) == 0o700
    loaded = load_client_cert("studio.ts.net:47470", config_dir=tmp_path / "cfg")
    assert loaded == device and loaded.fingerprint == device.fingerprint
    assert load_client_cert("elsewhere:1", config_dir=tmp_path / "cfg") is None


def test_http_bridge_tls_files_are_private(tmp_path):
    """The files uvicorn serves the HTTP bridge's TLS from (front_door writes them) are 0600 in a
    0700 directory. (Client certificates on the bridge: tests/test_http_abuse.py.)"""
    tls = server_tls(tmp_path / "srv", NAMES)
    paths = tls.write_files(tmp_path / "run")
    assert paths and all(mode(p) == 0o600 for p in paths) and mode(tmp_path / "run") == 0o700
