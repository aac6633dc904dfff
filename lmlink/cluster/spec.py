"""The cluster file: which hosts, how they are linked, how the model is split.

TOML, documented in cluster/README.md. Example (two Macs over Ethernet)::

    name = "two-macs"
    backend = "ring"          # ring | jaccl | mpi
    sharding = "pipeline"     # pipeline | tensor
    model = "mlx-community/Qwen3-30B-A3B-4bit"
    weights = "rank0"         # each | rank0 (only rank 0 downloads; others get files over the link)

    [[hosts]]
    name = "studio-a"         # label shown in status and errors
    ssh = "studio-a.local"    # how the launcher reaches it ("" = this machine)
    address = "10.0.0.1"      # its address on the cluster link (Thunderbolt bridge / Ethernet)
    memory_gb = 192           # optional: checked by `lmlink cluster check`

    [[hosts]]
    name = "studio-b"
    ssh = "studio-b.local"
    address = "10.0.0.2"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("ring", "jaccl", "mpi")
SHARDINGS = ("pipeline", "tensor")
WEIGHTS = ("each", "rank0")
LOCAL_NAMES = ("", "localhost", "127.0.0.1", "::1")


class ClusterFileError(ValueError):
    """The cluster file is missing, malformed or inconsistent; the message says where."""


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    ssh: str = ""
    slots: int = 1
    memory_gb: float | None = None
    rdma: tuple[str, ...] = ()  # jaccl: RDMA device per peer ("" for itself), in host order
    python: str = ""  # interpreter on that host (default: the launcher's)

    @property
    def local(self) -> bool:
        return self.ssh in LOCAL_NAMES


@dataclass(frozen=True)
class Rank:
    rank: int
    host: Host


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    backend: str
    sharding: str
    model: str
    hosts: tuple[Host, ...]
    weights: str = "each"
    control_port: int = 0  # rank 0's side channel on its cluster address; 0 = any free port
    heartbeat_timeout: float = 3.0
    path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def ranks(self) -> list[Rank]:
        out: list[Rank] = []
        for h in self.hosts:
            for _ in range(h.slots):
                out.append(Rank(len(out), h))
        return out

    @property
    def size(self) -> int:
        return sum(h.slots for h in self.hosts)

    @property
    def all_local(self) -> bool:
        return all(h.local for h in self.hosts)


def load_cluster(path: str | Path) -> ClusterSpec:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ClusterFileError(f"{p}: no such cluster file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ClusterFileError(f"{p}: not valid TOML: {exc}") from None
    return parse_cluster(data, p)


def parse_cluster(data: dict, path: Path | None = None) -> ClusterSpec:
    where = str(path) if path else "cluster file"

    def bad(msg: str) -> ClusterFileError:
        return ClusterFileError(f"{where}: {msg}")

    known = {"name", "backend", "sharding", "model", "weights", "control_port",
             "heartbeat_timeout", "hosts", "env"}
    unknown = set(data) - known
    if unknown:
        raise bad(f"unknown key(s) {', '.join(sorted(unknown))}")
    backend = data.get("backend", "ring")
    if backend not in BACKENDS:
        raise bad(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    sharding = data.get("sharding", "pipeline")
    if sharding not in SHARDINGS:
        raise bad(f"sharding must be one of {', '.join(SHARDINGS)}, got {sharding!r}")
    weights = data.get("weights", "each")
    if weights not in WEIGHTS:
        raise bad(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    raw_hosts = data.get("hosts")
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise bad("needs at least one [[hosts]] entry")
    hosts = []
    host_keys = {"name", "address", "ssh", "slots", "memory_gb", "rdma", "python"}
    for i, h in enumerate(raw_hosts):
        if not isinstance(h, dict):
            raise bad(f"hosts[{i}] must be a table")
        extra = set(h) - host_keys
        if extra:
            raise bad(f"hosts[{i}]: unknown key(s) {', '.join(sorted(extra))}")
        address = h.get("address")
        if not address or not isinstance(address, str):
            raise bad(f"hosts[{i}] needs an address (its IP on the cluster link)")
        slots = h.get("slots", 1)
        if not isinstance(slots, int) or slots < 1:
            raise bad(f"hosts[{i}]: slots must be a positive integer")
        hosts.append(Host(
            name=str(h.get("name") or address), address=address, ssh=str(h.get("ssh", "")),
            slots=slots, memory_gb=h.get("memory_gb"), rdma=tuple(h.get("rdma", ())),
            python=str(h.get("python", "")),
        ))
    spec = ClusterSpec(
        name=str(data.get("name") or (path.stem if path else "cluster")), backend=backend,
        sharding=sharding, model=str(data.get("model", "builtin")), hosts=tuple(hosts),
        weights=weights, control_port=int(data.get("control_port", 0)),
        heartbeat_timeout=float(data.get("heartbeat_timeout", 3.0)), path=path,
        env={str(k): str(v) for k, v in dict(data.get("env", {})).items()},
    )
    if spec.size < 2:
        raise bad("a cluster needs at least 2 ranks (use `lmlink serve` for one)")
    if backend == "jaccl":
        for h in hosts:
            if len(h.rdma) != len(hosts):
                raise bad(f"host {h.name}: jaccl needs rdma = one device per host ({len(hosts)})")
            if h.slots != 1:
                raise bad(f"host {h.name}: jaccl runs one rank per host")
    return spec
