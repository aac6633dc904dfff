"""Telemetry bookkeeping and the Prometheus exposition it feeds (parsed by prometheus_client)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from lmlink.observe.metrics import OTHER, Metrics
from lmlink.observe.telemetry import CallUsage, Telemetry


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    text = metrics.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _status() -> dict:
    return {"models": [{"name": "m", "state": "ready", "memory_bytes": 1234, "active": 2, "queued": 1,
                        "max_batch": 8, "tokens_per_second": 5.5}],
            "cluster": {"ranks": [{"rank": 0, "host": "a", "state": "ok"}, {"rank": 1, "host": "b", "state": "down"}]},
            "relay": {"accepted": 7, "refused": {"unknown_peer": 3}}}


def test_calls_feed_views_and_metrics() -> None:
    clock = Clock()
    tel = Telemetry(clock=clock)
    metrics = Metrics(_status)
    tel.listeners.append(metrics)
    tel.call_started("a", "alice@x", "m", "grpc")
    tel.call_started("b", "bob@x", "m", "http")
    assert tel.active_by_principal() == {"alice@x": 1, "bob@x": 1}
    clock.now += 2
    tel.call_ended("a", "completed", CallUsage(prompt_tokens=10, completion_tokens=21, cached_tokens=4,
                                               time_to_first_token_s=0.2, total_s=2.2, queued_s=0.05))
    tel.call_refused("quota_exceeded", "carol@x", "m", "http")
    snap = tel.snapshot()
    assert [a["principal"] for a in snap["active"]] == ["bob@x"]
    assert snap["outcomes"] == {"completed": 1, "refused": 1}
    assert snap["recent_refusals"][0]["reason"] == "quota_exceeded"
    assert snap["tokens_per_second"] == []  # fed by sample_generated, not by call ends
    s = _samples(metrics)
    assert s[("lmlink_requests_total", (("door", "grpc"), ("model", "m"), ("outcome", "completed")))] == 1
    assert s[("lmlink_tokens_total", (("kind", "completion"), ("model", "m")))] == 21
    assert s[("lmlink_prompt_cache_hits_total", (("model", "m"),))] == 1
    assert s[("lmlink_principal_tokens_total", (("principal", "alice@x"),))] == 31
    assert s[("lmlink_refusals_total", (("door", "http"), ("reason", "quota_exceeded")))] == 1
    # mean inter-token latency: 2.0 s of decode over 20 gaps = 0.1 s
    assert s[("lmlink_inter_token_latency_seconds_sum", (("model", "m"),))] == 0.1
    assert s[("lmlink_model_memory_bytes", (("model", "m"),))] == 1234
    assert s[("lmlink_queue_depth", (("model", "m"),))] == 1
    assert s[("lmlink_cluster_rank_up", (("host", "b"), ("rank", "1")))] == 0
    assert s[("lmlink_relay_refusals_total", (("reason", "unknown_peer"),))] == 3


def test_principal_labels_are_capped() -> None:
    tel = Telemetry()
    metrics = Metrics(lambda: {}, principal_cap=3)
    tel.listeners.append(metrics)
    for i in range(10):
        tel.call_started(str(i), f"user{i}", "m", "grpc")
        tel.call_ended(str(i), "completed", CallUsage(prompt_tokens=1, completion_tokens=1))
    principals = {dict(k[1]).get("principal") for k in _samples(metrics) if k[0] == "lmlink_principal_tokens_total"}
    assert principals == {"user0", "user1", "user2", OTHER}


def test_history_spreads_samples_and_forgets_after_the_window() -> None:
    clock = Clock()
    clock.now = 1_000_000.0  # a bucket boundary
    tel = Telemetry(clock=clock)
    tel.sample_generated(1000)  # the first sample only sets the baseline
    assert tel.snapshot()["tokens_per_second"] == []
    clock.now += 30
    tel.sample_generated(1600)  # 600 tokens over 30 s: 20 tok/s in each of three buckets
    assert [p["tokens_per_second"] for p in tel.snapshot()["tokens_per_second"]] == [20.0] * 3
    clock.now += 3600
    tel.sample_generated(1600)
    assert tel.snapshot()["tokens_per_second"] == []
