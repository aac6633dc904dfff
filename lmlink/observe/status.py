"""One status snapshot for the status page, `lmlink top` and the Prometheus gauges.

Built from what the server already tracks (the model manager's entries and engine stats, the
Guard's slots, the cluster's heartbeats, the Telemetry record); nothing here keeps state.
"""

from __future__ import annotations

import time
from typing import Any

from lmlink.observe.telemetry import Telemetry


def server_status(core: Any, telemetry: Telemetry, *, name: str = "", draining: bool = False) -> dict[str, Any]:
    """A JSON-ready dict: server, models, active streams, history, ranks, refusals."""
    guard_slots = core.guard.stats().get("slots", {})
    models = []
    for entry in core.models.entries():
        engine = entry.engine
        row: dict[str, Any] = {"name": entry.id, "state": entry.state, "source": entry.spec,
                               "memory_bytes": entry.memory_bytes, "active": 0, "queued": 0,
                               "max_batch": 0, "tokens_per_second": 0.0,
                               "prompt_cache_bytes": 0}
        if engine is not None:
            stats = engine.stats()
            waiting = guard_slots.get(id(engine), {}).get("queued", 0)
            row.update(active=stats.active, queued=stats.queued + waiting,
                       max_batch=stats.max_batch_size,
                       tokens_per_second=round(stats.recent_tokens_per_second, 2),
                       prompt_cache_bytes=stats.prompt_cache_bytes)
        models.append(row)
    telemetry.sample_generated(sum(e.stats().generated_tokens for e in core.models.engines()))
    snap = telemetry.snapshot()
    snap.update(server=name, at=time.time(), draining=draining, models=models,
                cluster=_cluster(core))
    return snap


def _cluster(core: Any) -> dict[str, Any] | None:
    for engine in core.models.engines():
        facts = getattr(engine, "cluster", None)
        if facts is None:
            continue
        now = time.monotonic()
        ranks = [{"rank": r.rank, "host": r.host, "state": r.state,
                  "memory_bytes": r.memory_bytes,
                  "seconds_since_heartbeat": 0.0 if r.rank == 0 else round(max(0.0, now - r.last_seen), 1)}
                 for r in facts.ranks()]
        return {"backend": facts.backend, "sharding": facts.sharding, "ranks": ranks}
    return None
