#!/usr/bin/env python
"""lmlink vs mlx_lm.server, same model, same machine, same run.

    python bench/run.py [--model builtin|PATH | --real] [--quick] [--json out.json]

Serves the model with `mlx_lm.server` (OpenAI-style HTTP, SSE streaming) and with
`lmlink serve` (gRPC, real `lmlink.client.AsyncClient`), both as subprocesses on loopback,
and drives both with the same closed-loop load at 1, 8 and 32 concurrent streams. At 1
stream, lmlink's Engine called in-process (a separate worker process, no network) is a
third contender. Prints a Markdown table (README-ready) with the targets from the issue
marked met/missed.

A benchmark, not a test: it never fails on a missed target (exit 0), only on a broken run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    eprint,
    find_openblas,
    machine_busy_seconds,
    machine_facts,
    process_cpu_seconds,
    process_memory,
    publish,
)
from prompts import make_prompts  # noqa: E402
from report import markdown, ratio, summarize, window_tokens  # noqa: E402

LEVELS = [1, 8, 32]
SERVERS = ("mlx_lm.server", "lmlink", "lmlink HTTP")
# "lmlink HTTP" is the same lmlink process driven through its OpenAI-compatible HTTP bridge
# with the very client used for mlx_lm.server, so the two HTTP APIs compare like for like.
INPROC = "in-process"
# Best fair settings: both decode up to 32 streams together and prefill up to 8 prompts
# at once, with the same prefill chunk and the same prompt-cache entry count.
MAX_BATCH, PREFILL_BATCH, PREFILL_STEP, CACHE_ENTRIES = 32, 8, 512, 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin",
                    help="'builtin' (default), or a local MLX model directory")
    ap.add_argument("--quick", action="store_true", help="short phases (about a minute)")
    ap.add_argument("--json", metavar="PATH", help="also write every number as JSON here")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 128")
    ap.add_argument("--phase-seconds", type=float, default=None,
                    help="seconds per contender per concurrency per rep (default 6, quick 3)")
    ap.add_argument("--reps", type=int, default=None,
                    help="alternating repetitions per level (default 4, quick 1)")
    ap.add_argument("--levels", default=None,
                    help="concurrency levels (default 1,8,32; 1 is always run: the "
                         "gRPC-vs-in-process comparison needs it)")
    ap.add_argument("--blas", choices=("auto", "openblas", "bundled"), default="auto",
                    help="auto: LD_PRELOAD Debian's OpenBLAS for every MLX process when "
                         "installed (Linux), else mlx's bundled BLAS")
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="OPENBLAS_NUM_THREADS for every MLX process (default 1: on 2 cores a "
                         "second BLAS thread only competes with the servers' own threads; "
                         "0 = OpenBLAS's default)")
    ap.add_argument("--real", action="store_true",
                    help="SmolLM2-135M-Instruct (the packaged GGUF, converted once to a cached "
                         "MLX dir both servers load); defaults --max-tokens 32 "
                         "--phase-seconds 20 --reps 2 --levels 1,8 (see real_model.py)")
    args = ap.parse_args(argv)
    # Defaults are None and filled in here, so a value given on the command line always
    # wins, even one equal to the plain default (e.g. --real --levels 1,8,32).
    defaults = {"max_tokens": 128, "levels": ",".join(map(str, LEVELS)),
                "phase_seconds": 3.0 if args.quick else 6.0, "reps": 1 if args.quick else 4}
    if args.real:
        from real_model import REAL_DEFAULTS

        defaults.update(REAL_DEFAULTS)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.levels = sorted({int(x) for x in args.levels.split(",") if x.strip()} | {1})
    return args


def resolve_model(spec: str) -> str:
    from lmlink.engine.loader import ModelLoadError, resolve_model_path

    try:
        _, _, path = resolve_model_path(spec)
    except ModelLoadError as exc:
        raise SystemExit(f"bench: {exc} (pass --model PATH to a local MLX model directory)")
    return str(path)


def server_env(blas: str, threads: int) -> tuple[dict[str, str], str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    lib = find_openblas() if blas in ("auto", "openblas") and sys.platform == "linux" else None
    if blas == "openblas" and lib is None:
        raise SystemExit("bench: --blas openblas but no libopenblas0-pthread library found")
    if lib:
        env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
        if threads > 0:
            env["OPENBLAS_NUM_THREADS"] = str(threads)
            return env, f"OpenBLAS ({threads} thread{'s' * (threads > 1)}) via LD_PRELOAD={lib}"
        env.pop("OPENBLAS_NUM_THREADS", None)
        return env, f"OpenBLAS (default threads) via LD_PRELOAD={lib}"
    return env, "mlx's bundled BLAS" if sys.platform == "linux" else "platform default"


def _worker_cmd(mode: str, model_path: str, prompts_file: str, max_tokens: int,
                *extra: str) -> list[str]:
    return [sys.executable, str(HERE / "inproc.py"), mode, "--model", model_path,
            "--prompts-json", prompts_file, "--max-tokens", str(max_tokens), *extra]


def _temp_json(data: object) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(data, f)
        return f.name


def screen_prompts(args: argparse.Namespace, model_path: str, env: dict[str, str],
                   candidates: list[str], warmup: list[str], want: int) -> dict:
    """Keep prompts whose greedy completion runs to max_tokens (see inproc.py)."""
    path = _temp_json({"candidates": candidates, "warmup": warmup})
    cmd = _worker_cmd("screen", model_path, path, args.max_tokens, "--want", str(want),
                      "--screen-budget", "30" if args.quick else "60")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, start_new_session=True,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except BaseException:
        os.killpg(proc.pid, 9)
        proc.wait()
        raise
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        raise SystemExit(f"bench: prompt screening failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


class InprocWorker:
    """The warm in-process Engine (bench/inproc.py serve), asked for runs over a pipe."""

    def __init__(self, server) -> None:  # noqa: ANN001 - servers.Server
        self.server = server

    def _line(self, timeout: float) -> dict:
        import select

        out = self.server.proc.stdout
        deadline = time.monotonic() + timeout
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not self.server.alive():
                raise RuntimeError(f"in-process worker stopped answering:\n{self.server.log_tail()}")
            ready, _, _ = select.select([out], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(out.fileno(), 1 << 20)
                if not chunk:
                    raise RuntimeError(f"in-process worker exited:\n{self.server.log_tail()}")
                buf += chunk
        return json.loads(buf)

    async def ready(self, timeout: float) -> dict:
        return await asyncio.to_thread(self._line, timeout)

    async def run(self, base: int, duration: float) -> list[dict]:
        self.server.proc.stdin.write(json.dumps({"base": base, "duration": duration}).encode()
                                     + b"\n")
        self.server.proc.stdin.flush()
        return (await asyncio.to_thread(self._line, duration + 300))["engine"]


def _new_slot() -> dict:
    return {"records": [], "wall": 0.0, "server_cpu": 0.0, "client_cpu": 0.0,
            "other_cpu": 0.0, "win_tokens": 0.0, "win_s": 0.0, "per_rep": []}


async def drive(args: argparse.Namespace, servers: dict, worker: InprocWorker,
                prompts: list[str], warmup: list[str]) -> dict:
    from loadgen import LmlinkTarget, MlxLmTarget, run_phase, warm_up

    targets = {"mlx_lm.server": MlxLmTarget(servers["mlx_lm.server"].address),
               "lmlink": LmlinkTarget(servers["lmlink"].address),
               "lmlink HTTP": MlxLmTarget("http://" + servers["lmlink"].extra["http"],
                                          "lmlink HTTP", counts_eos=False)}
    try:
        raw = (await worker.ready(timeout=300))["raw"]
        took = {}
        for name in SERVERS:
            t0 = time.perf_counter()
            took[name] = await warm_up(targets[name], warmup, args.levels, args.max_tokens)
            eprint(f"  warmed up {name} ({time.perf_counter() - t0:.1f} s)")
        # Spread each level's stream starts over about one request's duration (the same
        # spread for both servers), so arrivals look like independent users, not waves.
        stagger = {lv: 0.0 if lv == 1 else sum(took[n][lv] for n in SERVERS) / len(SERVERS)
                   for lv in args.levels}
        collected: dict = {n: {lv: _new_slot() for lv in args.levels} for n in SERVERS}
        collected[INPROC] = {1: _new_slot()}
        collected["raw"] = raw
        stride = max(1, len(prompts) // (len(args.levels) * args.reps))
        pids = sorted({s.pid for s in (*servers.values(), worker.server)})
        pid_of = {**{n: servers[n].pid for n in SERVERS}, INPROC: worker.server.pid}
        for li, level in enumerate(args.levels):
            contenders = [*SERVERS, INPROC] if level == 1 else list(SERVERS)
            for rep in range(args.reps):
                # Alternate the order (ABBA...) so background drift hits every contender.
                order = contenders if rep % 2 == 0 else contenders[::-1]
                base = (li * args.reps + rep) * stride
                for name in order:
                    cpu0 = {p: process_cpu_seconds(p) for p in pids}
                    me0, busy0 = time.process_time(), machine_busy_seconds()
                    t0 = time.perf_counter()
                    if name == INPROC:
                        records = await worker.run(base, args.phase_seconds)
                        # Its own clock: time from its first request to its last answer.
                        window = (records[0]["t_send"], records[-1]["t_done"]) if records else (0, 0)
                        wall = window[1] - window[0]
                    else:
                        phase = await run_phase(
                            targets[name], prompts, level, args.phase_seconds, args.max_tokens,
                            base, max_per_stream=10_000, hard_timeout=args.phase_seconds + 300,
                            stagger=stagger[level],
                        )
                        records, window = phase["records"], phase["window"]
                        wall = phase["t_end"] - phase["t_start"]
                    elapsed = time.perf_counter() - t0
                    me = time.process_time() - me0
                    cpu = {p: process_cpu_seconds(p) - cpu0[p] for p in pids}
                    busy = machine_busy_seconds() - busy0
                    c = collected[name][level]
                    c["records"] += records
                    c["wall"] += wall
                    win_tokens = window_tokens(records, window)
                    c["win_tokens"] += win_tokens
                    c["win_s"] += window[1] - window[0]
                    c["server_cpu"] += cpu[pid_of[name]]
                    c["client_cpu"] += 0.0 if name == INPROC else me
                    c["other_cpu"] += max(0.0, busy - sum(cpu.values()) - me) * (
                        wall / elapsed if elapsed else 1.0)
                    s = summarize(records, wall, win_tokens, window[1] - window[0])
                    c["per_rep"].append(s)
                    eprint(f"  {level:>2} streams, rep {rep + 1}, {name:<13}: "
                           f"{s['requests']:>4} req, {s['aggregate_tps']:>8,.0f} tok/s agg, "
                           f"TTFT p50 {s['ttft_ms_p50']:7.1f} ms, "
                           f"decode p50 {s['decode_tps_p50']:7,.0f} tok/s"
                           + (f", {s['retries']} connect retries" if s["retries"] else "")
                           + (f", {s['errors']} errors: {s['first_error']}" if s["errors"] else ""))
        collected["stagger"] = stagger
        return collected
    finally:
        for t in targets.values():
            await t.close()


def paired(a: list[dict], b: list[dict], stat: str) -> float:
    """Median over reps of a/b, each rep's two runs back to back: robust to background load
    that comes and goes between reps."""
    values = [ratio(x[stat], y[stat]) for x, y in zip(a, b)]
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def evaluate(result: dict, levels: list[int], per_rep: dict) -> None:
    ph = result["phases"]
    lm, mx = ph["lmlink"], ph["mlx_lm.server"]
    r: dict[str, float] = {}
    for lv in levels:
        a, b = per_rep["lmlink"][lv], per_rep["mlx_lm.server"][lv]
        r[f"aggregate_{lv}"] = paired(a, b, "aggregate_tps")
        r[f"aggregate_{lv}_pooled"] = ratio(lm[str(lv)]["aggregate_tps"],
                                            mx[str(lv)]["aggregate_tps"])
        r[f"ttft_p50_{lv}"] = paired(a, b, "ttft_ms_p50")
        r[f"ttft_p50_{lv}_pooled"] = ratio(lm[str(lv)]["ttft_ms_p50"], mx[str(lv)]["ttft_ms_p50"])
        r[f"decode_{lv}"] = ratio(lm[str(lv)]["decode_tps_p50"], mx[str(lv)]["decode_tps_p50"])
    grpc, inp = per_rep["lmlink"][1], per_rep[INPROC][1]
    for key, stat in (("decode", "decode_tps_p50"), ("aggregate", "aggregate_tps"),
                      ("request", "request_tps_p50")):
        r[f"grpc_vs_inprocess_{key}"] = paired(grpc, inp, stat)
        r[f"grpc_overhead_pct_{key}"] = (1 - r[f"grpc_vs_inprocess_{key}"]) * 100
    r["grpc_overhead_pct_aggregate_pooled"] = (
        1 - ratio(lm["1"]["aggregate_tps"], ph[INPROC]["1"]["aggregate_tps"])) * 100
    result["ratios"] = r
    targets = []
    for lv in (8, 32):
        if lv in levels:
            v = r[f"aggregate_{lv}"]
            targets.append({"target": f"aggregate tok/s at {lv} streams ≥ 1.25× mlx_lm.server",
                            "measured": f"{v:.3f}× (pooled {r[f'aggregate_{lv}_pooled']:.3f}×)",
                            "met": v >= 1.25})
    ttft = {lv: r[f"ttft_p50_{lv}"] for lv in levels}
    targets.append({
        "target": "TTFT p50 no worse than mlx_lm.server (lmlink/mlx_lm ≤ 1.00)",
        "measured": ", ".join(f"{v:.2f}× at {lv}" for lv, v in ttft.items()),
        "met": all(v <= 1.0 for v in ttft.values()),
    })
    # Judged on end-to-end tok/s (all tokens / wall): the after-first-token rate alone
    # would reward a late first token followed by a bunched burst.
    d = r["grpc_overhead_pct_aggregate"]
    targets.append({
        "target": "gRPC within 3 % of in-process tok/s at 1 stream",
        "measured": f"{d:.1f} % slower (pooled {r['grpc_overhead_pct_aggregate_pooled']:.1f} %)",
        "met": d <= 3.0,
    })
    mem = result["memory"]
    extra = mem["lmlink"]["peak_rss_mb"] - mem["mlx_lm.server"]["peak_rss_mb"]
    r["peak_rss_mb_over_mlx_lm"] = extra
    targets.append({
        "target": "RSS ≤ mlx_lm.server's + 150 MB (peak, VmHWM)",
        "measured": f"{extra:+,.0f} MB ({mem['lmlink']['peak_rss_mb']:,.0f} vs "
                    f"{mem['mlx_lm.server']['peak_rss_mb']:,.0f} MB)",
        "met": extra <= 150.0,
    })
    result["targets"] = targets


def build_result(args: argparse.Namespace, machine: dict, model_path: str, screened: dict,
                 collected: dict, settings: dict, warnings: list[str]) -> dict:
    stagger = collected.pop("stagger")
    raw = collected.pop("raw")
    per_rep = {name: {lv: c["per_rep"] for lv, c in by.items()} for name, by in collected.items()}
    phases: dict[str, dict[str, dict]] = {}
    for name, by_level in collected.items():
        phases[name] = {}
        for lv, c in by_level.items():
            s = summarize(c["records"], c["wall"], c["win_tokens"], c["win_s"])
            s["server_cores"] = c["server_cpu"] / c["wall"] if c["wall"] else 0.0
            s["client_cores"] = c["client_cpu"] / c["wall"] if c["wall"] else 0.0
            s["other_cores"] = c["other_cpu"] / c["wall"] if c["wall"] else 0.0
            s["server_cpu_ms_per_1k_tokens"] = (
                c["server_cpu"] * 1e6 / s["completion_tokens"] if s["completion_tokens"] else 0.0)
            phases[name][str(lv)] = s
            if s["errors"]:
                warnings.append(f"{name} at {lv} streams: {s['errors']} failed requests "
                                f"(first: {s['first_error']})")
            if s["other_cores"] > 0.25:
                warnings.append(f"other processes used {s['other_cores']:.2f} cores while "
                                f"{name} ran at {lv} stream(s): numbers are noisy")
    raw_wall = raw[-1]["t_done"] - raw[0]["t_send"] if raw else 0.0
    # Every contender must see the same token ids: compare prompt lengths prompt by prompt.
    expected = dict(enumerate(screened["prompt_tokens"]))
    for name, by_level in collected.items():
        seen = {r["prompt_index"]: r["prompt_tokens"] for c in by_level.values()
                for r in c["records"] if not r["error"] and "prompt_index" in r}
        bad = [i for i, n in seen.items() if expected.get(i) != n]
        if bad:
            warnings.append(f"{name} tokenized {len(bad)} prompts differently from lmlink's "
                            f"engine (e.g. prompt {bad[0]}: {seen[bad[0]]} vs "
                            f"{expected.get(bad[0])} tokens)")
    n_prompts = len(screened["prompts"])
    return {
        "machine": machine,
        "config": {
            "model": args.model, "model_path": model_path, "model_id": screened["model_id"],
            "parameters": screened["parameters"], "max_tokens": args.max_tokens,
            "levels": args.levels, "phase_seconds": args.phase_seconds, "reps": args.reps,
            "order": "alternating" if args.reps > 1 else "single pass",
            "quick": args.quick, "settings": settings, "stagger_s": stagger,
            "screen": screened["screen"], "prompts": n_prompts,
            "prompt_tokens_mean": sum(screened["prompt_tokens"]) / max(1, n_prompts),
        },
        "phases": phases,
        "raw": summarize(raw, raw_wall),
        "per_rep": per_rep,
        "warnings": warnings,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    t_begin = time.perf_counter()
    if args.real:
        from real_model import prepare

        args.model = prepare(eprint)
    model_path = resolve_model(args.model)
    env, blas = server_env(args.blas, args.blas_threads)
    machine = machine_facts(blas)
    eprint(f"bench: model {args.model} ({model_path}); {blas}; "
           f"load average {machine['loadavg_at_start']:.2f}")

    # Enough distinct prompts that none recurs while a 16-entry prompt cache could hold it;
    # candidates to spare, since a trained model ends many completions early.
    want = 64 if args.quick else 96
    pool = make_prompts(want * 4 + 40)
    warmup, candidates = pool[:40], pool[40:]
    eprint("bench: screening prompts in-process ...")
    screened = screen_prompts(args, model_path, env, candidates, warmup, want)
    prompts = screened["prompts"]
    warnings: list[str] = []
    if screened["screen"]["kept"] < want:
        warnings.append(
            f"only {screened['screen']['kept']} of {screened['screen']['tried']} screened "
            "prompts run to max_tokens without EOS; counts per request vary (rates use "
            "actual counts)")

    from servers import ServerSet, describe_failure

    with ServerSet(env) as fleet:
        eprint("bench: starting mlx_lm.server and lmlink serve ...")
        servers = {}
        try:
            servers["mlx_lm.server"] = fleet.start_mlx_lm(
                model_path, MAX_BATCH, PREFILL_BATCH, PREFILL_STEP, CACHE_ENTRIES)
            servers["lmlink"] = fleet.start_lmlink(model_path, MAX_BATCH)
            servers["lmlink HTTP"] = servers["lmlink"]
            prompts_file = _temp_json({"prompts": prompts, "warmup": warmup})
            worker = InprocWorker(fleet.start_worker(INPROC, _worker_cmd(
                "serve", model_path, prompts_file, args.max_tokens,
                "--raw-seconds", str(args.phase_seconds))))
            try:
                collected = asyncio.run(drive(args, servers, worker, prompts, warmup))
            finally:
                os.unlink(prompts_file)
        except BaseException:
            for s in fleet.servers:
                if not s.alive() or isinstance(sys.exc_info()[1], RuntimeError):
                    describe_failure(s)
            raise
        settings = {name: servers[name].settings for name in SERVERS}
        # After the last phase, servers still up: resident memory now and its peak
        # ("lmlink HTTP" is the same process as "lmlink").
        memory = {name: process_memory(servers[name].pid) for name in ("mlx_lm.server", "lmlink")}
        memory[INPROC] = process_memory(worker.server.pid)

    result = build_result(args, machine, model_path, screened, collected, settings, warnings)
    result["memory"] = memory
    evaluate(result, args.levels, result["per_rep"])
    publish(result, markdown(result), args.json, "bench", t_begin)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        eprint("bench: interrupted; servers stopped")
        raise SystemExit(130)
