"""The standard lab: headscale with the policy from deploy/tailscale-policy.md, four nodes, lmlink.

Nodes (all real tailscaled, TUN mode unless asked otherwise):
- `server`: tagged `tag:lmlink` (no owner: everyone needs a grant), runs `lmlink serve`
- `alice`: alice@example.com's laptop, in group:lmlink-admins (the admin grant)
- `bob`: bob@example.com's laptop, in group:ml-team (the team grant + groups capability)
- `eve`: eve@example.com's laptop, a member with only an `ip` grant (reaches the ports,
  holds no lmlink capability)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from support.netns import require_root
from tailnet.bed import Bed, Node, namespaces_left, run, tailnet_bed, wait_for

REPO = Path(__file__).resolve().parents[2]
POLICY_DOC = REPO / "deploy" / "tailscale-policy.md"
MODEL = "lmlink-tiny"
EVE_DENIED = "eve@example.com (tailnet) has no valid lmlink.dev/cap/inference grant"
GRPC_PORT, HTTP_PORT = 47470, 47471
USERS = {"alice": ("alice@example.com", "Alice Admin"), "bob": ("bob@example.com", "Bob Team"),
         "eve": ("eve@example.com", "Eve Stranger")}
# Test-only addition: eve may reach the ports but holds no lmlink capability.
EVE_IP_ONLY = ('    {"src": ["eve@example.com"], "dst": ["tag:lmlink"], '
               '"ip": ["tcp:47470", "tcp:47471"]},\n')


def doc_policy() -> str:
    """The ```hujson block admins are told to paste, verbatim."""
    text = POLICY_DOC.read_text()
    m = re.search(r"```hujson\n(.*?)```", text, re.S)
    assert m, f"no ```hujson block in {POLICY_DOC}"
    return m.group(1)


def lab_policy(doc: str | None = None, extra: str = EVE_IP_ONLY) -> str:
    """The doc's policy plus test-only grants inserted at the top of "grants"."""
    doc = doc if doc is not None else doc_policy()
    head, sep, tail = doc.partition('"grants": [\n')
    assert sep, "policy block has no grants list"
    return head + sep + extra + tail


def lmlink_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmlink.cli", *args]


def node_env(node: Node, **extra: str) -> dict[str, str]:
    """Environment for lmlink commands on a node: its own config dir, its LocalAPI socket."""
    env = {**os.environ, "LMLINK_CONFIG_DIR": str(node.dir / "lmlink-config"),
           "LMLINK_STATE_DIR": str(node.dir / "lmlink-state"),
           "LMLINK_LOCALAPI_SOCKET": node.socket, "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    for k in ("LMLINK_SERVER", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY",
              "grpc_proxy", "all_proxy", "ALL_PROXY"):
        env.pop(k, None)
    env.update(extra)
    return env


def lmlink(node: Node, *args: str, timeout: float = 60.0, **env: str) -> subprocess.CompletedProcess:
    """Run the real lmlink CLI inside a node's namespace."""
    return subprocess.run(node.cmd(*lmlink_argv(*args)), cwd=REPO, env=node_env(node, **env),
                          capture_output=True, text=True, timeout=timeout)


@dataclass
class Serving:
    """`lmlink serve` running on a node."""

    node: Node
    proc: subprocess.Popen
    ready: dict[str, Any]
    state_dir: Path
    err_path: Path

    @property
    def grpc(self) -> str:
        return self.ready["grpc"]

    @property
    def fingerprint(self) -> str:
        return self.ready["tls_fingerprint"]

    def stderr(self) -> str:
        return self.err_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_serve(node: Node, *extra: str, name: str = "studio", timeout: float = 90.0) -> Serving:
    """`lmlink serve --listen tailscaled` (default) on `node`, returning once it is ready."""
    state = node.dir / f"serve-{name}"
    err_path = node.dir / f"serve-{name}.log"
    args = list(extra) or ["--listen", "tailscaled", "--localapi-socket", node.socket]
    err = open(err_path, "w")
    proc = subprocess.Popen(
        node.cmd(*lmlink_argv("serve", *args, "--state-dir", str(state), "--name", name,
                              "--json", "--log-level", "info")),
        cwd=REPO, env=node_env(node), stdout=subprocess.PIPE, stderr=err, text=True)
    err.close()
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"lmlink serve exited: {err_path.read_text()[-3000:]}")
        try:
            ready = json.loads(line)
        except json.JSONDecodeError:
            continue
        if ready.get("event") == "ready":
            return Serving(node, proc, ready, state, err_path)
    proc.kill()
    raise RuntimeError(f"lmlink serve not ready in {timeout} s: {err_path.read_text()[-3000:]}")


@dataclass
class Lab:
    bed: Bed
    server: Node
    alice: Node
    bob: Node
    eve: Node
    serving: Serving | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def clients(self) -> dict[str, Node]:
        return {"alice": self.alice, "bob": self.bob, "eve": self.eve}

    def target(self, port: int = GRPC_PORT) -> str:
        return f"{self.server.ip}:{port}"


def build_lab(bed: Bed, *, userspace: tuple[str, ...] = (), serve: bool = True) -> Lab:
    """Users, the doc's policy, four nodes, and (by default) lmlink serving on the server node.

    Roles named in `userspace` run `tailscaled --tun=userspace-networking` (with its SOCKS5 and
    HTTP proxies) instead of a TUN device.
    """
    t0 = time.monotonic()
    for name, (email, display) in USERS.items():
        bed.create_user(name, email, display)
    bed.set_policy(lab_policy())
    server = bed.add_node("server", user="alice", tags=("tag:lmlink",), hostname="studio",
                          userspace="server" in userspace)
    alice, bob, eve = (bed.add_node(who, user=who, hostname=f"{who}-laptop",
                                    userspace=who in userspace) for who in ("alice", "bob", "eve"))
    lab = Lab(bed, server, alice, bob, eve)
    lab.timings["tailnet_up_s"] = time.monotonic() - t0
    # every client must see the server as a peer before tests start
    for c in lab.clients.values():
        wait_for(f"{c.role} to see the server", lambda c=c: c.peer_status(server), 30)
    if serve:
        t1 = time.monotonic()
        lab.serving = start_serve(server)
        lab.timings["serve_ready_s"] = time.monotonic() - t1
    return lab


def tailscale_ping(a: Node, b: Node, *, count: int = 10) -> str:
    """`tailscale ping` (disco): prints 'via DERP(...)' or 'via IP:port'."""
    return a.tailscale("ping", "--c", str(count), "--timeout", "5s", b.ip, timeout=60, check=False)


__all__ = ["Lab", "Serving", "build_lab", "lmlink", "start_serve", "tailscale_ping", "run"]


@contextlib.contextmanager
def running_lab(policy: str | None = None) -> Iterator[Lab]:
    """A fresh bed with the lab on it (and `policy`, if given), for one test module; after it
    the server is stopped, its log tail printed, and no namespace is left behind."""
    require_root()
    with tailnet_bed() as bed:
        lab = build_lab(bed)
        if policy is not None:
            bed.set_policy(policy)
        print(f"lab timings: {lab.timings}")
        try:
            yield lab
        finally:
            assert lab.serving is not None
            lab.serving.stop()
            print("serve log tail:\n" + lab.serving.stderr()[-1500:])
    assert not namespaces_left(bed.ctl_ns[:-4])
