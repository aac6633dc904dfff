"""Two network namespaces, a veth pair, and a real WireGuard tunnel (wireguard-go) between them.

Models two tailnet nodes: the veth addresses are the "LAN" underlay (not tailnet), the
WireGuard addresses are the tailnet addresses (100.87.0.0/24, inside Tailscale's CGNAT range).
The client side may carry several tunnel addresses, so one client namespace can act as several
tailnet peers (pick one with `use_source`).

Names are unique per run (pid + random), so parallel runs do not collide; everything is
deleted on exit, also when the test fails. Requires root; `require_root()` skips otherwise.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import pytest

WG_PORT = 51820
UNDERLAY = ("198.18.0.1", "198.18.0.2")  # RFC 2544 benchmarking range: never routed anywhere
TUNNEL_SERVER = "100.87.0.1"
RUN_TIMEOUT = 15.0


def require_root() -> None:
    """Skip (not fail) when not root: namespaces and TUN devices need CAP_NET_ADMIN."""
    if os.geteuid() != 0:
        pytest.skip("network-namespace tests need root")
    missing = [t for t in ("ip", "wg", "wireguard-go") if shutil.which(t) is None]
    if missing:  # as root the tools must be there (scripts/install-system-deps.sh)
        pytest.fail(f"missing tools {missing}: run scripts/install-system-deps.sh")


def run(*cmd: str, input: str | None = None, timeout: float = RUN_TIMEOUT) -> str:
    """Run a command, raising with its stderr on failure."""
    res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


@dataclass
class WgPair:
    """Handles to the two namespaces and their addresses."""

    ns_server: str
    ns_client: str
    veth_server: str
    veth_client: str
    wg_server: str
    wg_client: str
    client_tunnel_ips: tuple[str, ...]
    server_tunnel_ip: str = TUNNEL_SERVER
    server_veth_ip: str = UNDERLAY[0]
    client_veth_ip: str = UNDERLAY[1]
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def cmd(self, ns: str, *argv: str) -> list[str]:
        """argv prefixed to run inside namespace `ns`."""
        return ["ip", "netns", "exec", ns, *argv]

    def use_source(self, ip: str) -> None:
        """Make the client namespace reach the server from tunnel address `ip`."""
        run("ip", "-n", self.ns_client, "route", "replace", f"{self.server_tunnel_ip}/32",
            "dev", self.wg_client, "src", ip)

    def wg_transfer(self, ns: str, dev: str) -> tuple[int, int]:
        """(rx, tx) bytes through the WireGuard peer: proof that traffic used the tunnel."""
        out = run(*self.cmd(ns, "wg", "show", dev, "transfer")).split()
        return (int(out[1]), int(out[2])) if len(out) >= 3 else (0, 0)


def _start_wireguard(ns: str, dev: str, procs: list[subprocess.Popen]) -> None:
    env = {**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"}
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "wireguard-go", dev], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    sock = Path(f"/var/run/wireguard/{dev}.sock")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"wireguard-go {dev} exited: {proc.stderr.read() if proc.stderr else ''}")
        if sock.exists():
            return
        time.sleep(0.02)
    raise RuntimeError(f"wireguard-go {dev} did not come up")


@contextlib.contextmanager
def wireguard_pair(client_tunnel_ips: Sequence[str] = ("100.87.0.2",)) -> Iterator[WgPair]:
    """Build server/client namespaces joined by veth, with WireGuard over it; tear all down."""
    tag = f"{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
    pair = WgPair(
        ns_server=f"lmlink-{tag}-s", ns_client=f"lmlink-{tag}-c",
        veth_server=f"lv{tag}s", veth_client=f"lv{tag}c",
        wg_server=f"lw{tag}s", wg_client=f"lw{tag}c",
        client_tunnel_ips=tuple(client_tunnel_ips),
    )
    keydir = Path(tempfile.mkdtemp(prefix="lmlink-wg-"))
    os.chmod(keydir, 0o700)
    try:
        s, c = pair.ns_server, pair.ns_client
        run("ip", "netns", "add", s)
        run("ip", "netns", "add", c)
        run("ip", "link", "add", pair.veth_server, "type", "veth", "peer", "name", pair.veth_client)
        run("ip", "link", "set", pair.veth_server, "netns", s)
        run("ip", "link", "set", pair.veth_client, "netns", c)
        for ns, dev, ip in ((s, pair.veth_server, pair.server_veth_ip),
                            (c, pair.veth_client, pair.client_veth_ip)):
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")

        keys = {}
        for side in ("s", "c"):
            priv = run("wg", "genkey").strip()
            pub = run("wg", "pubkey", input=priv + "\n").strip()
            path = keydir / f"{side}.key"
            path.write_text(priv + "\n")
            os.chmod(path, 0o600)
            keys[side] = (path, pub)

        _start_wireguard(s, pair.wg_server, pair._procs)
        _start_wireguard(c, pair.wg_client, pair._procs)
        run(*pair.cmd(s, "wg", "set", pair.wg_server, "listen-port", str(WG_PORT),
                      "private-key", str(keys["s"][0]), "peer", keys["c"][1],
                      "allowed-ips", ",".join(f"{ip}/32" for ip in pair.client_tunnel_ips),
                      "endpoint", f"{pair.client_veth_ip}:{WG_PORT}"))
        run(*pair.cmd(c, "wg", "set", pair.wg_client, "listen-port", str(WG_PORT),
                      "private-key", str(keys["c"][0]), "peer", keys["s"][1],
                      "allowed-ips", f"{pair.server_tunnel_ip}/32",
                      "endpoint", f"{pair.server_veth_ip}:{WG_PORT}"))
        run("ip", "-n", s, "addr", "add", f"{pair.server_tunnel_ip}/32", "dev", pair.wg_server)
        run("ip", "-n", s, "link", "set", pair.wg_server, "up")
        for ip in pair.client_tunnel_ips:
            run("ip", "-n", s, "route", "add", f"{ip}/32", "dev", pair.wg_server)
            run("ip", "-n", c, "addr", "add", f"{ip}/32", "dev", pair.wg_client)
        run("ip", "-n", c, "link", "set", pair.wg_client, "up")
        run("ip", "-n", c, "route", "add", f"{pair.server_tunnel_ip}/32", "dev", pair.wg_client,
            "src", pair.client_tunnel_ips[0])
        yield pair
    finally:
        _teardown(pair, keydir)


def _teardown(pair: WgPair, keydir: Path) -> None:
    for proc in pair._procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in pair._procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for ns in (pair.ns_server, pair.ns_client):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=RUN_TIMEOUT)
    subprocess.run(["ip", "link", "del", pair.veth_server], capture_output=True, timeout=RUN_TIMEOUT)
    for dev in (pair.wg_server, pair.wg_client):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/var/run/wireguard/{dev}.sock")
    shutil.rmtree(keydir, ignore_errors=True)


def namespaces_left(prefix: str = "lmlink-") -> list[str]:
    """Namespaces with our prefix still present (for a leak check)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


# ----- the CLI in a namespace of its own ----------------------------------------------------


@contextlib.contextmanager
def isolated_namespace() -> Iterator[str]:
    name = f"lmlink-{os.getpid() % 10000:04d}{secrets.token_hex(2)}-d"
    run("ip", "netns", "add", name)
    try:
        run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=15)


def lmlink_in(ns: str, *args: str, env: dict[str, str], timeout: float = 30,
              input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "lmlink.cli", *args],
                          cwd=Path(__file__).resolve().parent.parent.parent, env=env, capture_output=True, text=True, timeout=timeout,
                          input=input)
