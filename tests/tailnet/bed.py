"""A real tailnet on one offline machine, built in network namespaces and torn down after.

Layout (names carry pid + random, so parallel runs never collide):

    ns <tag>-ctl: bridge br0 10.213.<n>.1/24, headscale (HTTP :8080, embedded DERP on the same
                  port, STUN on :3478, sqlite + policy file in a temp dir)
    ns <tag>-<node>: eth0 10.213.<n>.x/24 (veth into the bridge), tailscaled (TUN or
                  userspace networking) with its own state dir and socket, joined with a
                  pre-auth key

No namespace has a default route, so nothing can be dialled outside them; headscale serves an
empty DERP map except its own embedded region, and the nodes run with Tailscale's
integration-test switches (no port mapping, no log upload, panic if the public control plane
is ever dialled). The DERP is plain HTTP (TS_DEBUG_USE_DERP_HTTP=1), as in headscale's tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tailnet.tools import tool

HS_PORT = 8080
STUN_PORT = 3478
WG_PORT = 41641
RUN_TIMEOUT = 30.0


def run(*cmd: str, timeout: float = RUN_TIMEOUT, check: bool = True, input: str | None = None) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res.stdout


def wait_for(what: str, fn, timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll fn() until it returns something truthy; raise naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last error
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def _subnet() -> int:
    """A /24 third octet for this bed: one bridge per bed, so any value works; vary for logs."""
    return 100 + secrets.randbelow(100)


@dataclass
class Node:
    """One tailnet device: a namespace with tailscaled."""

    role: str
    ns: str
    hostname: str
    underlay: str
    dir: Path
    userspace: bool = False
    proc: subprocess.Popen | None = None
    ips: tuple[str, ...] = ()
    node_id: int = 0
    user: str = ""
    tags: tuple[str, ...] = ()
    socks5: str = ""  # userspace: "127.0.0.1:1055" inside the node's namespace
    http_proxy: str = ""

    @property
    def socket(self) -> str:
        return str(self.dir / "tailscaled.sock")

    @property
    def ip(self) -> str:
        return self.ips[0]

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def tailscale(self, *args: str, timeout: float = RUN_TIMEOUT, check: bool = True) -> str:
        return run(*self.cmd(tool("tailscale"), "--socket", self.socket, *args),
                   timeout=timeout, check=check)

    def status(self) -> dict:
        return json.loads(self.tailscale("status", "--json"))

    def peer_status(self, other: "Node") -> dict | None:
        for peer in (self.status().get("Peer") or {}).values():
            if other.ip in (peer.get("TailscaleIPs") or []):
                return peer
        return None


@dataclass
class Bed:
    """The control namespace + headscale, and the nodes added to it."""

    tag: str
    root: Path
    net: int
    ctl_ns: str
    nodes: dict[str, Node] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)
    headscale_proc: subprocess.Popen | None = None
    _veths: int = 0
    _blocks: set[tuple[str, str]] = field(default_factory=set)

    @property
    def ctl_ip(self) -> str:
        return f"10.213.{self.net}.1"

    @property
    def url(self) -> str:
        return f"http://{self.ctl_ip}:{HS_PORT}"

    @property
    def config_path(self) -> Path:
        return self.root / "headscale" / "config.yaml"

    @property
    def policy_path(self) -> Path:
        return self.root / "headscale" / "policy.hujson"

    @property
    def headscale_log(self) -> Path:
        return self.root / "headscale" / "headscale.log"

    # -- control -----------------------------------------------------------------------

    def headscale(self, *args: str, json_out: bool = True) -> Any:
        """The headscale CLI (talks to the server over its unix socket)."""
        argv = [tool("headscale"), "-c", str(self.config_path), *args]
        if json_out:
            argv += ["-o", "json"]
        out = run(*argv)
        return json.loads(out) if json_out and out.strip() else out

    def _write_config(self) -> None:
        hs = self.root / "headscale"
        hs.mkdir(mode=0o700, parents=True)
        cfg = {
            "server_url": self.url,
            "listen_addr": f"{self.ctl_ip}:{HS_PORT}",
            "metrics_listen_addr": "127.0.0.1:9090",
            "grpc_listen_addr": "127.0.0.1:50443",
            "grpc_allow_insecure": False,
            "noise": {"private_key_path": str(hs / "noise_private.key")},
            "prefixes": {"v4": "100.64.0.0/10", "v6": "fd7a:115c:a1e0::/48", "allocation": "sequential"},
            "derp": {
                "server": {
                    "enabled": True, "region_id": 900, "region_code": "lmlinktest",
                    "region_name": "lmlink test DERP", "verify_clients": True,
                    "stun_listen_addr": f"{self.ctl_ip}:{STUN_PORT}",
                    "private_key_path": str(hs / "derp_server_private.key"),
                    "automatically_add_embedded_derp_region": True,
                    "ipv4": self.ctl_ip,
                },
                "urls": [], "paths": [], "auto_update_enabled": False,
            },
            "disable_check_updates": True,
            "node": {"expiry": 0},
            "database": {"type": "sqlite", "sqlite": {"path": str(hs / "db.sqlite"),
                                                      "write_ahead_log": True}},
            "log": {"level": "info", "format": "text"},
            "policy": {"mode": "file", "path": str(self.policy_path)},
            "dns": {"magic_dns": True, "base_domain": "tn.lmlink.test", "override_local_dns": False,
                    "nameservers": {"global": []}, "search_domains": [], "extra_records": []},
            "unix_socket": str(hs / "headscale.sock"),
            "unix_socket_permission": "0770",
            "logtail": {"enabled": False},
            "taildrop": {"enabled": False},
        }
        # JSON is YAML: no YAML writer needed.
        self.config_path.write_text(json.dumps(cfg, indent=2))

    def set_policy(self, text: str, *, reload: bool = True) -> None:
        """Write the policy file (HuJSON) and SIGHUP headscale, as an admin would."""
        self.policy_path.write_text(text)
        if reload and self.headscale_proc is not None:
            before = self.headscale_log.read_text().count("reloading ACL policy")
            self.headscale_proc.send_signal(signal.SIGHUP)
            wait_for("headscale to reload its policy",
                     lambda: self.headscale_log.read_text().count("reloading ACL policy") > before, 10)

    def create_user(self, name: str, email: str, display: str) -> int:
        user = self.headscale("users", "create", name, "--email", email, "--display-name", display)
        self.users[name] = int(user["id"])
        return self.users[name]

    def auth_key(self, user: str | None = None, tags: tuple[str, ...] = ()) -> str:
        args = ["preauthkeys", "create", "--expiration", "1h"]
        if user is not None:
            args += ["--user", str(self.users[user])]
        if tags:
            args += ["--tags", ",".join(tags)]
        return str(self.headscale(*args)["key"])

    def headscale_nodes(self) -> list[dict]:
        return list(self.headscale("nodes", "list") or [])

    # -- nodes -------------------------------------------------------------------------

    def add_node(self, role: str, *, user: str | None = None, tags: tuple[str, ...] = (),
                 hostname: str | None = None, userspace: bool = False) -> Node:
        """A namespace on the bridge with tailscaled, joined with a fresh pre-auth key."""
        node = self.add_host(role, user=user, tags=tags, hostname=hostname, userspace=userspace)
        self._start_tailscaled(node)
        key = self.auth_key(user, tags)
        node.tailscale("up", "--login-server", self.url, "--auth-key", key,
                       "--hostname", node.hostname, "--accept-dns=false", "--accept-routes=false",
                       *([] if userspace else ["--netfilter-mode=off"]), "--timeout", "60s",
                       timeout=90)
        st = node.status()
        node.ips = tuple(sorted(st["Self"]["TailscaleIPs"], key=lambda a: ":" in a))
        return node

    def add_host(self, role: str, *, user: str | None = None, tags: tuple[str, ...] = (),
                 hostname: str | None = None, userspace: bool = False) -> Node:
        """A namespace on the bridge, no tailscaled yet (e.g. for lmlink's own tsnet node)."""
        self._veths += 1
        i = self._veths
        node = Node(role=role, ns=f"{self.ctl_ns[:-4]}-{role}", hostname=hostname or role,
                    underlay=f"10.213.{self.net}.{10 + i}", dir=self.root / role,
                    userspace=userspace, user=user or "", tags=tags)
        node.dir.mkdir(mode=0o700, parents=True)
        host_end, node_end = f"tb{self.tag}{i}h", f"tb{self.tag}{i}n"
        run("ip", "netns", "add", node.ns)
        self.nodes[role] = node
        run("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
        run("ip", "link", "set", host_end, "netns", self.ctl_ns)
        run("ip", "-n", self.ctl_ns, "link", "set", host_end, "master", "br0", "up")
        run("ip", "link", "set", node_end, "netns", node.ns)
        run("ip", "-n", node.ns, "link", "set", node_end, "name", "eth0")
        run("ip", "-n", node.ns, "link", "set", "lo", "up")
        run("ip", "-n", node.ns, "addr", "add", f"{node.underlay}/24", "dev", "eth0")
        run("ip", "-n", node.ns, "link", "set", "eth0", "up")
        return node

    def _start_tailscaled(self, node: Node) -> None:
        env = {**os.environ, "TS_DEBUG_USE_DERP_HTTP": "1", "TS_DISABLE_PORTMAPPER": "1",
               "TS_DISABLE_UPNP": "true", "TS_PANIC_IF_HIT_MAIN_CONTROL": "1",
               "TS_NO_LOGS_NO_SUPPORT": "true", "TS_LOGS_DIR": str(node.dir)}
        argv = [tool("tailscaled"), "--statedir", str(node.dir / "state"), "--socket", node.socket,
                "--port", str(WG_PORT), "--no-logs-no-support", "--encrypt-state=false"]
        if node.userspace:
            node.socks5, node.http_proxy = "127.0.0.1:1055", "127.0.0.1:1056"
            argv += ["--tun=userspace-networking", f"--socks5-server={node.socks5}",
                     f"--outbound-http-proxy-listen={node.http_proxy}"]
        else:
            argv += [f"--tun=ts{self.tag}"[:15]]
        log = open(node.dir / "tailscaled.log", "w")
        node.proc = subprocess.Popen(node.cmd(*argv), env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        wait_for(f"tailscaled socket in {node.ns}",
                 lambda: node.proc.poll() is None and os.path.exists(node.socket), 20)
        if node.proc.poll() is not None:
            raise RuntimeError(f"tailscaled exited: {(node.dir / 'tailscaled.log').read_text()[-2000:]}")

    def headscale_id(self, node: Node) -> int:
        for n in self.headscale_nodes():
            if n.get("given_name") == node.hostname or n.get("name") == node.hostname:
                return int(n["id"])
        raise KeyError(node.hostname)

    # -- paths -------------------------------------------------------------------------

    def block_direct(self, a: Node, b: Node) -> None:
        """Drop UDP between two nodes' underlay addresses (nftables in both), so they use DERP."""
        for me, other in ((a, b), (b, a)):
            table = f"lmlink_block_{other.role}"
            script = (f"table inet {table} {{\n"
                      f"  chain input {{ type filter hook input priority 0; "
                      f"ip saddr {other.underlay} meta l4proto udp drop; }}\n"
                      f"  chain output {{ type filter hook output priority 0; "
                      f"ip daddr {other.underlay} meta l4proto udp drop; }}\n}}\n")
            run(*me.cmd("nft", "-f", "-"), input=script)
            self._blocks.add((me.role, table))

    def unblock_direct(self, a: Node, b: Node) -> None:
        for me, other in ((a, b), (b, a)):
            table = f"lmlink_block_{other.role}"
            if (me.role, table) in self._blocks:
                run(*me.cmd("nft", "delete", "table", "inet", table))
                self._blocks.discard((me.role, table))

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        procs = [n.proc for n in self.nodes.values()] + [self.headscale_proc]
        for p in procs:
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            if p is None:
                continue
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        for ns in [n.ns for n in self.nodes.values()] + [self.ctl_ns]:
            run("ip", "netns", "delete", ns, check=False)


def namespaces_left(prefix: str) -> list[str]:
    out = run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


@contextlib.contextmanager
def tailnet_bed() -> Iterator[Bed]:
    """Control namespace + headscale up, no nodes yet; everything deleted on exit."""
    for prog in ("ip", "nft"):
        if shutil.which(prog) is None:
            raise RuntimeError(f"missing {prog}: run scripts/install-system-deps.sh")
    tag = f"{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
    root = Path(tempfile.mkdtemp(prefix=f"lmlink-tailnet-{tag}-"))
    os.chmod(root, 0o700)
    bed = Bed(tag=tag, root=root, net=_subnet(), ctl_ns=f"lmtn{tag}-ctl")
    try:
        run("ip", "netns", "add", bed.ctl_ns)
        run("ip", "-n", bed.ctl_ns, "link", "set", "lo", "up")
        run("ip", "-n", bed.ctl_ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", bed.ctl_ns, "addr", "add", f"{bed.ctl_ip}/24", "dev", "br0")
        run("ip", "-n", bed.ctl_ns, "link", "set", "br0", "up")
        bed._write_config()
        if not bed.policy_path.exists():
            bed.policy_path.write_text('{"grants": []}\n')
        log = open(bed.headscale_log, "w")
        bed.headscale_proc = subprocess.Popen(
            ["ip", "netns", "exec", bed.ctl_ns, tool("headscale"), "-c", str(bed.config_path), "serve"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for("headscale to answer", lambda: bed.headscale_proc.poll() is None
                 and (bed.root / "headscale" / "headscale.sock").exists()
                 and (bed.headscale("users", "list") or True), 30)
        yield bed
    except Exception:
        if bed.headscale_log.exists():
            print("headscale log tail:\n" + bed.headscale_log.read_text()[-3000:])
        for n in bed.nodes.values():
            p = n.dir / "tailscaled.log"
            if p.exists():
                print(f"tailscaled {n.role} log tail:\n" + p.read_text()[-2000:])
        raise
    finally:
        bed.close()
        shutil.rmtree(root, ignore_errors=True)
