"""Plain views of ListModels / GetServerInfo answers."""

from __future__ import annotations

from dataclasses import dataclass

from lmlink.v1 import inference_pb2 as pb


@dataclass(frozen=True)
class ModelInfo:
    id: str
    aliases: tuple[str, ...]
    state: str
    context_length: int
    memory_bytes: int
    is_default: bool
    active_streams: int = 0
    idle_ttl_seconds: float = 0.0
    source: str = ""  # built-in, GGUF file, model dir or HF id

    @classmethod
    def from_wire(cls, m: pb.Model) -> "ModelInfo":
        return cls(m.id, tuple(m.aliases), m.state, m.context_length, m.memory_bytes, m.is_default,
                   m.active_streams, m.idle_ttl_seconds, m.source)


@dataclass(frozen=True)
class LoadProgress:
    """One step of a LoadModel call (stage: resolving, checking_memory, loading, starting, ready)."""

    stage: str
    message: str
    fraction: float
    estimated_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class UnloadResult:
    model: str
    cancelled_streams: int
    drained_streams: int
    freed_bytes: int

    @classmethod
    def from_wire(cls, r: pb.UnloadModelResponse) -> "UnloadResult":
        return cls(r.model, r.cancelled_streams, r.drained_streams, r.freed_bytes)


def decode_load_event(event: pb.LoadModelEvent) -> "LoadProgress | ModelInfo":
    if event.WhichOneof("event") == "loaded":
        return ModelInfo.from_wire(event.loaded)
    p = event.progress
    return LoadProgress(p.stage, p.message, p.fraction, p.estimated_bytes, p.available_bytes)


@dataclass(frozen=True)
class CallerInfo:
    login_name: str
    display_name: str
    node_name: str
    tags: tuple[str, ...]
    source: str
    is_owner: bool


@dataclass(frozen=True)
class RankInfo:
    """One rank of a cluster, as rank 0 last heard from it (its heartbeats)."""

    rank: int
    host: str
    address: str
    state: str
    message: str
    memory_bytes: int
    model_bytes: int
    tokens_per_second: float
    seconds_since_heartbeat: float

    @classmethod
    def from_wire(cls, r: pb.RankInfo) -> "RankInfo":
        return cls(r.rank, r.host, r.address, r.state, r.message, r.memory_bytes, r.model_bytes,
                   r.tokens_per_second, r.seconds_since_heartbeat)


@dataclass(frozen=True)
class ServerInfo:
    name: str
    version: str
    protocol_version: int
    listen_mode: str
    models: tuple[str, ...]
    active_streams: int
    queued_requests: int
    max_batch_size: int
    uptime_seconds: float
    platform: str
    generated_tokens: int
    recent_tokens_per_second: float
    caller: CallerInfo
    # cluster mode only (empty on a single node)
    ranks: tuple[RankInfo, ...] = ()
    cluster_backend: str = ""
    cluster_sharding: str = ""
    shortcut_url: str = ""  # what an iPhone Shortcut calls (tailnet modes)
    shortcut_needs_profile: bool = False

    @classmethod
    def from_wire(cls, s: pb.ServerInfo) -> "ServerInfo":
        c = s.caller
        return cls(
            s.name,
            s.version,
            s.protocol_version,
            s.listen_mode,
            tuple(s.models),
            s.active_streams,
            s.queued_requests,
            s.max_batch_size,
            s.uptime_seconds,
            s.platform,
            s.generated_tokens,
            s.recent_tokens_per_second,
            CallerInfo(
                c.login_name, c.display_name, c.node_name, tuple(c.tags), c.source, c.is_owner
            ),
            ranks=tuple(RankInfo.from_wire(r) for r in s.ranks),
            cluster_backend=s.cluster_backend,
            cluster_sharding=s.cluster_sharding,
            shortcut_url=s.shortcut_url,
            shortcut_needs_profile=s.shortcut_needs_profile,
        )
