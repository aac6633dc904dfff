"""Cluster benchmark: per-token latency and aggregate tokens/s, lmlink cluster vs plain mlx-lm.

    python bench/cluster_bench.py [--ranks 1 2 4] [--sharding pipeline] [--tokens 128] [--streams 8]

For each rank count: (a) plain mlx-lm distributed generation (mpirun + sharded_load +
stream_generate, one stream) and (b) `lmlink cluster up` on loopback driven by the gRPC client
(1 stream, then --streams concurrent streams). 1 rank = `lmlink serve` vs mlx-lm in one process.
Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

PLAIN = r'''
import sys, time, json, mlx.core as mx
from mlx_lm.utils import sharded_load, load
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_logits_processors
path, sharding, n, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
g = mx.distributed.init()
if g.size() > 1:
    model, tok = sharded_load(path, **({"pipeline_group": g} if sharding == "pipeline" else {"tensor_group": g}))
else:
    model, tok = load(path)
tok.eos_token_ids = set()  # like lmlink's ignore_eos: always generate n tokens
prompt = tok.encode("Once upon a time")
runs = []
for _ in range(reps + 1):  # the first run warms up
    times = []
    for r in stream_generate(model, tok, prompt, max_tokens=n):
        times.append(time.perf_counter())
    # skip the first gap (it can include the last prefill chunk)
    runs.append(1000 * (times[-1] - times[1]) / (len(times) - 2))
if g.rank() == 0:
    print(json.dumps({"tokens": len(times), "runs_ms_per_token": runs[1:]}), flush=True)
mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))
'''


def plain(ranks: int, sharding: str, tokens: int, reps: int = 1) -> dict:
    from lmlink.engine.loader import BUILTIN_MODEL_DIR

    script = Path(tempfile.mkdtemp()) / "plain.py"
    script.write_text(PLAIN)
    env = {**os.environ, "MLX_MPI_LIBNAME": "libmpi.so.40", "OMPI_MCA_mpi_yield_when_idle": "1"}
    cmd = [sys.executable, str(script), str(BUILTIN_MODEL_DIR), sharding, str(tokens), str(reps)]
    if ranks > 1:
        mpirun = str(Path(sys.executable).parent / "mpirun")
        cmd = [mpirun, "--oversubscribe", "--allow-run-as-root", "-n", str(ranks), "-x",
               "MLX_MPI_LIBNAME", "-x", "OMPI_MCA_mpi_yield_when_idle", "-x", "LD_PRELOAD",
               "-x", "HF_HUB_OFFLINE"] + cmd
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                         start_new_session=True).stdout
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def lmlink(ranks: int, sharding: str, tokens: int, streams: int, reps: int = 1) -> dict:
    from conftest import start_server, stop_server
    from lmlink.client import AsyncClient, Client
    from lmlink.client.events import Completed

    if ranks == 1:
        srv = start_server("--no-mdns")
        address, stop = srv.address, lambda: stop_server(srv.process)
    else:
        from test_cluster import down, up

        name = f"local-{ranks}-mpi{'-tensor' if sharding == 'tensor' else ''}.toml"
        c = up(name, timeout=120)
        address, stop = c.address, lambda: down(c)
    try:
        with Client(address, timeout=300) as client:
            client.complete("warm up", max_tokens=8, ignore_eos=True)
            # Per-token latency from the server's own timings (first token -> last token over
            # the tokens after the first): the client's receive times are not usable on a loaded
            # machine (a descheduled client reads a burst of buffered messages at once), and
            # the server paces messages (10 ms), so one message can carry several tokens.
            runs = []
            for _ in range(reps):
                done = None
                for ev in client.stream(prompt="Once upon a time", max_tokens=tokens,
                                        ignore_eos=True):
                    if isinstance(ev, Completed):
                        done = ev
                t, n = done.timings, done.usage.completion_tokens
                runs.append((t.total_ms - t.time_to_first_token_ms) / max(n - 1, 1))

        async def many() -> float:
            async with AsyncClient(address, timeout=300) as ac:
                t0 = time.perf_counter()
                got = await asyncio.gather(*(ac.complete(f"Story {i}:", max_tokens=tokens,
                                                         ignore_eos=True) for i in range(streams)))
                return sum(len(g.token_ids) for g in got) / (time.perf_counter() - t0)

        aggs = [asyncio.run(many()) for _ in range(reps)]
    finally:
        stop()
    return {"runs_ms_per_token": runs, "aggregate_tps": aggs}


def main() -> None:
    import statistics

    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--sharding", default="pipeline", choices=("pipeline", "tensor"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5,
                    help="runs per configuration (min and median reported: shared machines are noisy)")
    a = ap.parse_args()
    for n in a.ranks:
        load0 = os.getloadavg()[0]
        p = plain(n, a.sharding, a.tokens, a.repeat)
        l = lmlink(n, a.sharding, a.tokens, a.streams, a.repeat)
        pm, lm = p["runs_ms_per_token"], l["runs_ms_per_token"]
        print(json.dumps({
            "ranks": n, "sharding": a.sharding, "tokens": a.tokens, "repeat": a.repeat,
            "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "mlx_lm_ms_per_token_min": round(min(pm), 3),
            "mlx_lm_ms_per_token_median": round(statistics.median(pm), 3),
            "mlx_lm_tps_1_stream_best": round(1000 / min(pm), 1),
            "lmlink_ms_per_token_min": round(min(lm), 3),
            "lmlink_ms_per_token_median": round(statistics.median(lm), 3),
            "lmlink_tps_1_stream_best": round(1000 / min(lm), 1),
            "overhead_pct_min": round(100 * (min(lm) / min(pm) - 1), 1),
            "overhead_pct_median": round(100 * (statistics.median(lm) / statistics.median(pm) - 1), 1),
            f"lmlink_aggregate_tps_{a.streams}_streams_best": round(max(l["aggregate_tps"]), 1),
            f"lmlink_aggregate_tps_{a.streams}_streams_median":
                round(statistics.median(l["aggregate_tps"]), 1),
        }), flush=True)


if __name__ == "__main__":
    main()
