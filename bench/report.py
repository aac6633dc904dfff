"""Turn per-request records into the numbers and the Markdown the README shows."""

from __future__ import annotations

import math
from collections import Counter

from common import median, percentile


def tokens_in_window(rec: dict, a: float, b: float) -> float:
    """How many of a request's tokens arrived in [a, b], spreading them evenly between the
    first and the last token's arrival (which is how a decoder emits them)."""
    if rec["error"] or rec["t_first"] is None or rec["tokens"] < 1:
        return 0.0
    n, t0, t1 = rec["tokens"], rec["t_first"], rec["t_last"]
    if n == 1 or t1 <= t0:
        return float(n) if a <= t0 <= b else 0.0
    dt = (t1 - t0) / (n - 1)
    lo = max(0, math.ceil((a - t0) / dt))
    hi = min(n - 1, math.floor((b - t0) / dt))
    return float(max(0, hi - lo + 1))


def window_tokens(records: list[dict], window: tuple[float, float]) -> float:
    return sum(tokens_in_window(r, *window) for r in records)


def summarize(records: list[dict], wall_s: float, window_tokens: float | None = None,
              window_s: float | None = None) -> dict:
    """Statistics over one configuration's requests (possibly from several phases).

    The aggregate rate is completion tokens / wall time over the steady-state window (all
    streams started, none stopped yet) when one is given, else over the whole wall time.
    """
    """Statistics over one configuration's requests (possibly from several phases)."""
    ok = [r for r in records if not r["error"] and r["t_first"] is not None]
    ttft = [(r["t_first"] - r["t_send"]) * 1000 for r in ok]
    decode = [
        (r["tokens"] - 1) / (r["t_last"] - r["t_first"])
        for r in ok
        if r["tokens"] > 1 and r["t_last"] > r["t_first"]
    ]
    end_to_end = [r["tokens"] / (r["t_last"] - r["t_send"]) for r in ok if r["t_last"] > r["t_send"]]
    tokens = [r["tokens"] for r in ok]
    total = sum(tokens)
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "retries": sum(r.get("retries", 0) for r in records),
        "first_error": next((r["error"] for r in records if r["error"]), None),
        "completion_tokens": total,
        "tokens_per_request_mean": total / len(ok) if ok else 0.0,
        "tokens_per_request_min": min(tokens) if tokens else 0,
        "finish_reasons": dict(Counter(str(r["finish"]) for r in ok)),
        "prompt_tokens_mean": sum(r["prompt_tokens"] for r in ok) / len(ok) if ok else 0.0,
        "cached_tokens_mean": sum(r["cached_tokens"] for r in ok) / len(ok) if ok else 0.0,
        "messages_per_request_mean": (
            sum(r.get("messages", 0) for r in ok) / len(ok) if ok else 0.0
        ),
        "ttft_ms_p50": percentile(ttft, 50),
        "ttft_ms_p95": percentile(ttft, 95),
        "decode_tps_p50": median(decode),
        "decode_tps_p5": percentile(decode, 5),
        # tokens / (last token - send): what one user sees, first-token wait included.
        "request_tps_p50": median(end_to_end),
        "aggregate_tps": (window_tokens / window_s if window_s
                          else total / wall_s if wall_s > 0 else 0.0),
        "aggregate_tps_whole_phase": total / wall_s if wall_s > 0 else 0.0,
        "wall_s": wall_s,
        "window_s": window_s or wall_s,
    }


def _f(x: float, digits: int = 0) -> str:
    if x != x:  # nan
        return "–"
    return f"{x:,.{digits}f}"


def ratio(a: float, b: float) -> float:
    return a / b if b and a == a and b == b else float("nan")


def markdown(result: dict) -> str:
    m = result["machine"]
    cfg = result["config"]
    lines: list[str] = []
    lines.append(f"### lmlink vs mlx_lm.server — model `{cfg['model_id']}` "
                 f"({cfg['parameters'] / 1e6:.2f} M parameters)")
    lines.append("")
    lines.append(
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}; Python {m['python']}, "
        f"mlx {m['mlx']}, mlx-lm {m['mlx_lm']}, grpcio {m['grpcio']}; BLAS: {m['blas']} "
        "(same for both servers)."
    )
    lines.append(
        f"Workload: raw-text prompts (~{cfg['prompt_tokens_mean']:.0f} tokens, a different one "
        f"per request, same list and order for both servers), max_tokens {cfg['max_tokens']}, "
        f"greedy; closed loop at each concurrency for {cfg['phase_seconds']:g} s × "
        f"{cfg['reps']} rep(s) per server ({cfg['order']} order), stream starts spread over "
        "about one request's duration, after a warm-up. "
        "Timed in the client as events arrive; rates use the tokens actually generated; "
        "aggregate = completion tokens / wall time while all streams run (steady state)."
    )
    lines.append("")
    for name, settings in cfg["settings"].items():
        lines.append(f"- {name}: `{settings}`")
    lines.append("- client: mlx_lm.server via httpx SSE (`/v1/completions`, `stream: true`); "
                 "lmlink via `lmlink.client.AsyncClient` (one gRPC channel); "
                 "lmlink HTTP: the same lmlink process through its OpenAI-compatible bridge, "
                 "with the same httpx SSE client as mlx_lm.server")
    lines.append("")
    lines.append("| streams | server | requests | tokens/req | TTFT p50 ms | TTFT p95 ms "
                 "| per-stream tok/s p50 | aggregate tok/s | server CPU (cores) "
                 "| client CPU (cores) |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for level in cfg["levels"]:
        for server in ("mlx_lm.server", "lmlink", "lmlink HTTP"):
            if server not in result["phases"]:
                continue
            s = result["phases"][server][str(level)]
            lines.append(
                f"| {level} | {server} | {s['requests']} | {_f(s['tokens_per_request_mean'], 1)} "
                f"| {_f(s['ttft_ms_p50'], 1)} | {_f(s['ttft_ms_p95'], 1)} "
                f"| {_f(s['decode_tps_p50'])} | {_f(s['aggregate_tps'])} "
                f"| {_f(s['server_cores'], 2)} | {_f(s['client_cores'], 2)} |"
            )
    if result.get("memory"):
        lines.append("")
        lines.append("| process (after the last phase) | RSS now (VmRSS) MB "
                     "| peak RSS (VmHWM) MB |")
        lines.append("|---|---:|---:|")
        for name, mem in result["memory"].items():
            label = "lmlink (gRPC and HTTP)" if name == "lmlink" else name
            lines.append(f"| {label} | {_f(mem['rss_mb'])} | {_f(mem['peak_rss_mb'])} |")
    lines.append("")
    lines.append("gRPC stream vs the engine in-process, 1 stream (same prompts, max_tokens, "
                 "greedy; the in-process runs alternate with the server runs):")
    lines.append("")
    lines.append("| path | requests | TTFT p50 ms | per-stream tok/s p50 (after 1st token) "
                 "| per-request tok/s p50 (incl. TTFT) | aggregate tok/s |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for label, s in (
        ("raw mlx-lm BatchGenerator (no engine; reference, timed once before the phases)",
         result["raw"]),
        ("lmlink Engine in-process (threading sink)", result["phases"]["in-process"]["1"]),
        ("lmlink over gRPC (AsyncClient)", result["phases"]["lmlink"]["1"]),
    ):
        lines.append(f"| {label} | {s['requests']} | {_f(s['ttft_ms_p50'], 2)} "
                     f"| {_f(s['decode_tps_p50'])} | {_f(s['request_tps_p50'])} "
                     f"| {_f(s['aggregate_tps'])} |")
    ov = result["ratios"]
    lines.append("")
    lines.append(f"gRPC overhead vs in-process at 1 stream: {_f(ov['grpc_overhead_pct_aggregate'], 1)} % "
                 f"(aggregate tok/s, the target's measure), "
                 f"{_f(ov['grpc_overhead_pct_request'], 1)} % (per-request tok/s incl. TTFT), "
                 f"{_f(ov['grpc_overhead_pct_decode'], 1)} % (per-stream tok/s after the first "
                 "token). Ratios are medians over reps of back-to-back pairs; the tables pool "
                 "all reps.")
    lines.append("")
    lines.append("| target (from the issue) | measured | status |")
    lines.append("|---|---|---|")
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'met' if t['met'] else '**missed**'} |")
    retries = {f"{srv} at {lv}": s["retries"] for srv, by in result["phases"].items()
               for lv, s in by.items() if s.get("retries")}
    if retries:
        lines.append("")
        lines.append("Connection resets retried by the client (mlx_lm.server's listen backlog "
                     "is socketserver's default of 5; TTFT includes the retry): "
                     + ", ".join(f"{k}: {v}" for k, v in retries.items()) + ".")
    if result.get("warnings"):
        lines.append("")
        for w in result["warnings"]:
            lines.append(f"> note: {w}")
    return "\n".join(lines)
