"""Discovery pieces without a network: TXT codec, interface choice, paths, selection, settings."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from lmlink.client.discovery import (
    DiscoveryError,
    Endpoint,
    RelayedPathRefused,
    load_settings,
    rank,
    select_endpoint,
)
from lmlink.client.errors import LmlinkError
from lmlink.net import mdns
from lmlink.net.localapi import Peer
from lmlink.net.tailnet_discovery import lmlink_reason, path_for

FP = "sha256:" + "12" * 32


def test_txt_round_trip():
    ad = mdns.Advertisement(name="studio", node="studio.tail1234.ts.net", mode="tailscaled",
                            port=47470, hosts=("100.87.0.1", "fd7a:115c:a1e0::1"),
                            fingerprint=FP, http_port=47471, models=("lmlink-tiny", "qwen"),
                            state="ready", cluster_size=4, protocol=1)
    txt = ad.txt()
    assert txt["addr"] == "100.87.0.1:47470,[fd7a:115c:a1e0::1]:47470"
    assert all(len(k) + len(v.encode()) + 1 <= 255 for k, v in txt.items())
    wire = {k.encode(): v.encode() for k, v in txt.items()}
    got = mdns.parse_txt("studio._lmlink._tcp.local.", wire)
    assert got.name == "studio" and got.node == "studio.tail1234.ts.net"
    assert got.targets == ("100.87.0.1:47470", "[fd7a:115c:a1e0::1]:47470")
    assert got.fingerprint == FP and got.http_port == 47471 and got.cluster_size == 4
    assert got.models == ("lmlink-tiny", "qwen") and got.model_count == 2
    assert got.protocol == 1 and got.state == "ready" and got.mode == "tailscaled"
    assert not got.problems


def test_long_model_lists_are_hashed():
    models = tuple(f"org/model-number-{i:03d}-instruct-4bit" for i in range(40))
    txt = mdns.Advertisement("s", "n", "local", 1, ("127.0.0.1",), models=models).txt()
    assert "models" not in txt and txt["nmodels"] == "40"
    assert txt["mhash"] == mdns.models_digest(reversed(models))  # order-independent
    got = mdns.parse_txt("s._lmlink._tcp.local.", txt)
    assert got.models is None and got.model_count == 40 and got.models_hash == txt["mhash"]


def test_a_bare_answer_falls_back_to_srv_and_a_records():
    got = mdns.parse_txt("x._lmlink._tcp.local.", {}, 47470, ["100.87.0.3"])
    assert got.targets == ("100.87.0.3:47470",) and got.name == "x"
    assert "no protocol version advertised" in got.problems
    assert mdns.instance_label("a.b" * 40).count(".") == 0
    assert len(mdns.instance_label("é" * 80).encode()) <= 63


def test_interfaces_per_mode(monkeypatch):
    assert mdns.advertise_interfaces("local") == ["127.0.0.1"]
    ip = lambda a, p=24: SimpleNamespace(ip=a, network_prefix=p)  # noqa: E731
    adapters = [
        SimpleNamespace(name="lo", index=1, ips=[ip("127.0.0.1", 8)]),
        SimpleNamespace(name="en0", index=2, ips=[ip("192.168.1.20"), ip(("fe80::1", 0, 2), 64)]),
        SimpleNamespace(name="tailscale0", index=3, ips=[ip("100.87.0.1", 32)]),
        SimpleNamespace(name="wan", index=4, ips=[ip("81.2.69.160")]),
        SimpleNamespace(name="en1", index=5, ips=[ip("169.254.3.4", 16)]),
    ]
    import ifaddr

    monkeypatch.setattr(ifaddr, "get_adapters", lambda: adapters)
    monkeypatch.setattr(mdns, "iface_flags", lambda name: None)
    assert mdns.advertise_interfaces("tailscaled") == ["192.168.1.20", "169.254.3.4"]
    assert mdns.browse_interfaces() == ["127.0.0.1", "192.168.1.20", "169.254.3.4"]
    # a point-to-point or non-multicast interface is no LAN
    monkeypatch.setattr(mdns, "iface_flags", lambda name: 0x1011 if name == "en0" else 0x1003)
    assert mdns.advertise_interfaces("tsnet") == ["169.254.3.4"]


def test_receive_socket_is_held_to_loopback_in_local_mode():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        fake = SimpleNamespace(engine=SimpleNamespace(_listen_socket=sock))
        applied = mdns.restrict_receive(fake, ["127.0.0.1"])
        assert "multicast_all=0" in applied and any(a.startswith("device=") for a in applied)
        dev = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0")
        assert dev == socket.if_indextoname(1).encode()  # the loopback device
    finally:
        sock.close()


def test_tailnet_addresses():
    assert mdns.is_tailnet_ip("100.64.0.1") and mdns.is_tailnet_ip("100.127.255.254")
    assert mdns.is_tailnet_ip("fd7a:115c:a1e0::5") and mdns.is_tailnet_ip("[fd7a:115c:a1e0::5]")
    assert not mdns.is_tailnet_ip("100.128.0.1") and not mdns.is_tailnet_ip("192.168.1.2")
    assert not mdns.is_tailnet_ip("studio.local")


def peer(name, addrs, *, tags=(), path="direct", cur="192.168.1.9:41641", relay="fra"):
    return Peer(name=name, host_name=name.split(".")[0], addresses=tuple(addrs), tags=tuple(tags),
                login_name="", os="linux", online=True, path=path,
                cur_addr=cur if path == "direct" else "", relay=relay)


def test_convention_and_paths():
    assert lmlink_reason(peer("gpu.ts.net", ["100.64.0.2"], tags=["tag:lmlink"])) == "tag:lmlink"
    assert lmlink_reason(peer("lmlink.ts.net", ["100.64.0.3"])) == "name lmlink"
    assert lmlink_reason(peer("lmlink-studio.ts.net", ["100.64.0.4"])) == "name lmlink-studio"
    assert lmlink_reason(peer("lmlinkish.ts.net", ["100.64.0.5"])) is None
    assert lmlink_reason(peer("desk.ts.net", ["100.64.0.6"], tags=["tag:server"])) is None
    peers = [peer("a.ts.net", ["100.64.0.2"]), peer("b.ts.net", ["100.64.0.3"], path="relayed")]
    assert path_for("100.64.0.2", peers).describe() == "direct (192.168.1.9:41641)"
    assert path_for("100.64.0.3", peers).describe() == "relayed via DERP fra"
    assert path_for("b.ts.net", peers).kind == "relayed"
    assert path_for("127.0.0.1", None).kind == "loopback"
    assert path_for("100.64.0.9", peers).note == "not a peer of this tailnet"
    assert path_for("100.64.0.2", None, note="no LocalAPI").describe() == "unknown (no LocalAPI)"


def ep(target, origin, path, status="ok", **kw):
    return Endpoint(target, origin, origins=(origin,), path=path, status=status, **kw)


def test_selection_prefers_a_direct_lan_path():
    lan = ep("100.64.0.2:47470", "mdns", "direct", name="lan")
    tail = ep("100.64.0.3:47470", "tailnet", "direct", name="tail")
    relayed = ep("100.64.0.4:47470", "tailnet", "relayed", name="far", relay="fra")
    unknown = ep("100.64.0.5:47470", "configured", "unknown", name="cfg")
    rejected = ep("100.64.0.6:47470", "mdns", "direct", status="rejected", name="evil")
    assert [rank(e) for e in (lan, tail, unknown, relayed)] == [0, 1, 3, 4]
    assert select_endpoint([relayed, unknown, tail, lan, rejected]).name == "lan"
    assert select_endpoint([relayed, unknown, tail]).name == "tail"
    assert select_endpoint([relayed, unknown]).name == "cfg"
    assert select_endpoint([relayed]).name == "far"
    with pytest.raises(RelayedPathRefused, match="relayed via DERP fra"):
        select_endpoint([relayed], direct_only=True)
    with pytest.raises(RelayedPathRefused, match="direct-only needs a verified direct path"):
        select_endpoint([unknown], direct_only=True)
    with pytest.raises(DiscoveryError, match="evil .*rejected"):
        select_endpoint([rejected])
    loading = ep("127.0.0.1:47470", "mdns", "loopback", state="loading", name="loading")
    ready = ep("127.0.0.1:47480", "mdns", "loopback", state="ready", name="ready")
    assert select_endpoint([loading, ready]).name == "ready"
    has = ep("100.64.0.7:47470", "tailnet", "direct", models=("qwen",), name="qwen-box")
    assert select_endpoint([lan, has], model="qwen").name == "qwen-box"


def test_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("LMLINK_DIRECT_ONLY", raising=False)
    assert load_settings(tmp_path).direct_only is False
    (tmp_path / "config.toml").write_text(
        'direct_only = true\nservers = ["studio.tail1234.ts.net:47470"]\n'
        'discovery_timeout = 1.5\ntailnet_port = 47480\ntailnet_tag = "tag:llm"\n')
    s = load_settings(tmp_path)
    assert s.direct_only and s.servers == ("studio.tail1234.ts.net:47470",)
    assert s.discovery_timeout == 1.5 and s.tailnet_port == 47480 and s.tailnet_tag == "tag:llm"
    monkeypatch.setenv("LMLINK_DIRECT_ONLY", "0")
    assert load_settings(tmp_path).direct_only is False
    for bad, why in (("direct_only = 'yes'", "true or false"), ("servers = 'x'", "list"),
                     ("discovery_timeout = 0", "between"), ("tailnet_port = 70000", "port"),
                     ("direct_only = [", "cannot read")):
        (tmp_path / "config.toml").write_text(bad + "\n")
        with pytest.raises(LmlinkError, match=why):
            load_settings(tmp_path)


def test_merge_folds_a_slow_tailnet_check_into_the_confirmed_mdns_answer():
    from lmlink.client.discovery import Endpoint, merge_endpoints

    lan = Endpoint("100.87.0.1:47470", "mdns", origins=("mdns",), name="studio",
                   fingerprint="sha256:aa", status="ok")
    slow = Endpoint("100.87.0.1:47470", "tailnet", origins=("tailnet",), peer="studio.ts.net",
                    status="unreachable")
    other_cert = Endpoint("100.87.0.1:47470", "tailnet", origins=("tailnet",),
                          fingerprint="sha256:bb", status="ok")
    merged = merge_endpoints([lan, slow])
    assert len(merged) == 1 and merged[0].origins == ("mdns", "tailnet")
    assert merged[0].peer == "studio.ts.net"
    # a confirmed server with another certificate at that address is a conflict: keep both
    assert len(merge_endpoints([lan, other_cert])) == 2


def test_merge_confirms_a_slow_mdns_check_by_its_tailnet_twin():
    """The other order of the race above (a real flake in test_discovery_netns): the mDNS
    answer's own check did not finish, the tailnet entry at its address was presented exactly
    the advertised certificate. One server, one entry; a forged answer stays apart."""
    from lmlink.client.discovery import Endpoint, merge_endpoints

    def answer(status: str, advertised: str = "sha256:aa") -> Endpoint:
        return Endpoint("100.87.0.1:47470", "mdns", origins=("mdns",), name="studio",
                        advertised_fingerprint=advertised, http="100.87.0.1:47471", status=status)

    twin = Endpoint("100.87.0.1:47470", "tailnet", origins=("tailnet",), name="studio",
                    peer="studio.ts.net", fingerprint="sha256:aa", status="ok",
                    models=("lmlink-tiny",), model_count=1, protocol=1, mode="tailscaled")
    for status in ("unverified", "unreachable"):
        [one] = merge_endpoints([answer(status), twin])
        assert (one.origin, one.origins, one.status) == ("mdns", ("mdns", "tailnet"), "ok")
        assert one.fingerprint == "sha256:aa" and one.models == ("lmlink-tiny",)
        assert one.http == "100.87.0.1:47471" and one.peer == "studio.ts.net"
    # a spoofed answer naming the real address with another certificate: never confirmed
    for forged in (answer("rejected", "sha256:ee"), answer("unverified", "sha256:ee")):
        merged = merge_endpoints([forged, twin])
        assert len(merged) == 2 and forged.status != "ok"
    # nor by a twin that is not confirmed itself
    slow_twin = Endpoint("100.87.0.1:47470", "tailnet", origins=("tailnet",), status="unreachable")
    assert all(e.status != "ok" for e in merge_endpoints([answer("unverified"), slow_twin]))
