"""Prometheus metrics, built with prometheus-client on a registry of our own.

Counters and histograms are fed by `Telemetry` when a call ends or is refused (one update per
call, nothing per token); gauges are read from the server's status snapshot at scrape time, so
scraping costs nothing between scrapes. Principal labels are capped (`PRINCIPAL_LABELS`, then
"other") so a crowd of callers cannot blow up the series count.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lmlink.observe.telemetry import CallUsage

PRINCIPAL_LABELS = 50
OTHER = "other"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

StatusSource = Callable[[], dict[str, Any]]


class _Labels:
    """First come, first labelled; past the cap every new principal is "other"."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, principal: str) -> str:
        with self._lock:
            if principal in self._seen:
                return principal
            if len(self._seen) < self._cap:
                self._seen.add(principal)
                return principal
            return OTHER


class Metrics:
    """Owns the registry; `on_end`/`on_refusal` are Telemetry listener hooks."""

    def __init__(self, status: StatusSource, principal_cap: int = PRINCIPAL_LABELS) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._principal = _Labels(principal_cap)
        r = self.registry
        self.requests = Counter("lmlink_requests", "Calls by model, door and outcome.",
                                ["model", "door", "outcome"], registry=r)
        self.tokens = Counter("lmlink_tokens", "Tokens by model and kind (prompt, cached, completion).",
                              ["model", "kind"], registry=r)
        self.cache_hits = Counter("lmlink_prompt_cache_hits", "Calls that reused a cached prompt prefix.",
                                  ["model"], registry=r)
        self.ttft = Histogram("lmlink_time_to_first_token_seconds", "Time to first token.",
                              ["model", "door"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lmlink_inter_token_latency_seconds",
                             "Mean time between tokens, one observation per call.",
                             ["model"], buckets=_ITL_BUCKETS, registry=r)
        self.queue_wait = Histogram("lmlink_queue_wait_seconds", "Time a call waited before prefill.",
                                    ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.principal_tokens = Counter("lmlink_principal_tokens",
                                        "Prompt + completion tokens per principal (capped label set).",
                                        ["principal"], registry=r)
        self.refusals = Counter("lmlink_refusals", "Refused calls by reason and door.",
                                ["reason", "door"], registry=r)
        r.register(_StatusCollector(status))

    # -- Telemetry listener -------------------------------------------------------------
    def on_end(self, principal: str, model: str, door: str, outcome: str, usage: CallUsage | None) -> None:
        self.requests.labels(model, door, outcome).inc()
        if usage is None:
            return
        self.tokens.labels(model, "prompt").inc(usage.prompt_tokens)
        self.tokens.labels(model, "cached").inc(usage.cached_tokens)
        self.tokens.labels(model, "completion").inc(usage.completion_tokens)
        self.principal_tokens.labels(self._principal(principal)).inc(usage.prompt_tokens + usage.completion_tokens)
        if usage.cached_tokens:
            self.cache_hits.labels(model).inc()
        if usage.completion_tokens:
            self.ttft.labels(model, door).observe(usage.time_to_first_token_s)
            self.queue_wait.labels(model).observe(usage.queued_s)
        if usage.completion_tokens > 1:
            decode_s = max(usage.total_s - usage.time_to_first_token_s, 0.0)
            self.itl.labels(model).observe(decode_s / (usage.completion_tokens - 1))

    def on_refusal(self, reason: str, principal: str, model: str, door: str) -> None:
        self.refusals.labels(reason, door).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StatusCollector:
    """Gauges read from the status snapshot at scrape time."""

    def __init__(self, status: StatusSource) -> None:
        self._status = status

    def describe(self) -> list:
        return []  # families depend on the live snapshot; skip eager description

    def collect(self) -> Iterator[Any]:
        snap = self._status()
        state = GaugeMetricFamily("lmlink_model_state", "1 for the model's current state.", labels=["model", "state"])
        memory = GaugeMetricFamily("lmlink_model_memory_bytes", "Memory the model's weights use.", labels=["model"])
        active = GaugeMetricFamily("lmlink_active_streams", "Streams decoding now.", labels=["model"])
        queued = GaugeMetricFamily("lmlink_queue_depth", "Calls waiting for a batch slot.", labels=["model"])
        batch = GaugeMetricFamily("lmlink_batch_capacity", "Largest decode batch.", labels=["model"])
        tps = GaugeMetricFamily("lmlink_tokens_per_second", "Recent decode rate.", labels=["model"])
        cache = GaugeMetricFamily("lmlink_prompt_cache_bytes", "Memory the reusable prompt caches hold.", labels=["model"])
        for m in snap.get("models", []):
            name = m["name"]
            state.add_metric([name, m.get("state", "unknown")], 1)
            memory.add_metric([name], float(m.get("memory_bytes", 0)))
            active.add_metric([name], float(m.get("active", 0)))
            queued.add_metric([name], float(m.get("queued", 0)))
            batch.add_metric([name], float(m.get("max_batch", 0)))
            tps.add_metric([name], float(m.get("tokens_per_second", 0.0)))
            cache.add_metric([name], float(m.get("prompt_cache_bytes", 0)))
        yield from (state, memory, active, queued, batch, tps, cache)
        ranks = GaugeMetricFamily("lmlink_cluster_rank_up", "1 if the cluster rank is healthy.", labels=["rank", "host"])
        for rank in (snap.get("cluster") or {}).get("ranks", []):
            ranks.add_metric([str(rank["rank"]), rank.get("host", "")], 1.0 if rank.get("state") == "ok" else 0.0)
        yield ranks
        relay = snap.get("relay") or {}
        conns = CounterMetricFamily("lmlink_relay_connections", "Connections the tailnet relay accepted.")
        conns.add_metric([], float(relay.get("accepted", 0)))
        yield conns
        refused = CounterMetricFamily("lmlink_relay_refusals", "Connections the relay refused, by reason.", labels=["reason"])
        for reason, n in (relay.get("refused") or {}).items():
            refused.add_metric([reason], float(n))
        yield refused
