"""In-process worker for bench/run.py (run as its own subprocess, never imported by the driver).

`screen`: runs candidate prompts through lmlink's Engine (greedy) and keeps those whose
completion runs to max_tokens without end-of-sequence, so every server generates the same
number of tokens per request (mlx_lm.server has no ignore-EOS option).

`serve`: keeps one warm Engine and, whenever the driver asks on stdin, measures it called
in-process at 1 stream (a plain threading sink, the consumer blocking on a queue) on the same
prompts, same max_tokens, greedy: the baseline for lmlink's gRPC overhead. Optionally also
the raw mlx-lm BatchGenerator at 1 stream (no engine, no detokenizer): the model's own
ceiling on this machine.

Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time

from common import eprint

from lmlink.engine.engine import Engine, EngineConfig
from lmlink.engine.loader import load_model
from lmlink.engine.types import (
    Completed,
    Failed,
    GenerationRequest,
    SamplingOptions,
    Started,
    TokenDelta,
)


class QueueSink:
    """The simplest thread-safe sink: the engine thread puts, the caller's thread gets."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()

    def deliver(self, events) -> None:  # noqa: ANN001 - engine EventSink protocol
        self.q.put(events)


def _stop(engine: Engine) -> None:
    """Stop the engine and let MLX finish the work it queued asynchronously: exiting with
    async evaluations pending aborts the process ("terminate called without an active
    exception") about one time in three."""
    import mlx.core as mx

    engine.stop()
    mx.synchronize()


def run_one(engine: Engine, prompt: str, max_tokens: int, timeout: float = 120.0) -> dict:
    sink = QueueSink()
    t0 = time.perf_counter()
    request = GenerationRequest(
        "", prompt=prompt, sampling=SamplingOptions(temperature=0.0, max_tokens=max_tokens)
    )
    engine.submit(request, sink)
    rec = {"t_send": t0, "t_first": None, "t_last": None, "tokens": 0, "finish": None,
           "prompt_tokens": 0, "cached_tokens": 0, "error": None}
    deadline = t0 + timeout
    while rec["finish"] is None and rec["error"] is None:
        events = sink.q.get(timeout=max(0.001, deadline - time.perf_counter()))
        now = time.perf_counter()
        for ev in events:
            if isinstance(ev, TokenDelta) and ev.token_ids:
                if rec["t_first"] is None:
                    rec["t_first"] = now
                rec["t_last"] = now
                rec["tokens"] += len(ev.token_ids)
            elif isinstance(ev, Started):
                rec["prompt_tokens"], rec["cached_tokens"] = ev.prompt_tokens, ev.cached_tokens
            elif isinstance(ev, Completed):
                rec["finish"] = ev.finish_reason
            elif isinstance(ev, Failed):
                rec["error"] = str(ev.error)
    rec["t_done"] = time.perf_counter()
    return rec


def screen(loaded, candidates: list[str], max_tokens: int, want: int, budget_s: float) -> dict:
    """Run candidates through the engine (batched, greedy); keep those that reach max_tokens."""
    engine = Engine(loaded, EngineConfig())
    engine.start()
    try:
        kept: list[str] = []
        lengths: list[int] = []
        tried = 0
        t_end = time.perf_counter() + budget_s
        chunk = 64
        for start in range(0, len(candidates), chunk):
            if len(kept) >= want or time.perf_counter() > t_end:
                break
            batch = candidates[start : start + chunk]
            sinks = []
            for prompt in batch:
                sink = QueueSink()
                engine.submit(
                    GenerationRequest(
                        "", prompt=prompt,
                        sampling=SamplingOptions(temperature=0.0, max_tokens=max_tokens),
                    ),
                    sink,
                )
                sinks.append((prompt, sink))
            for prompt, sink in sinks:
                done = None
                while done is None:
                    for ev in sink.q.get(timeout=300):
                        if isinstance(ev, (Completed, Failed)):
                            done = ev
                tried += 1
                if isinstance(done, Completed):
                    lengths.append(done.completion_tokens)
                    if done.finish_reason == "length" and done.completion_tokens == max_tokens:
                        kept.append(prompt)
        return {"prompts": kept[:want], "tried": tried, "kept": len(kept),
                "completion_tokens_when_screened": lengths}
    finally:
        _stop(engine)


def bench_raw(loaded, prompts: list[str], max_tokens: int, duration: float,
              max_requests: int) -> list[dict]:
    """mlx-lm's BatchGenerator alone, one prompt at a time: no engine, no detokenizer."""
    from mlx_lm.generate import BatchGenerator

    tok = loaded.tokenizer
    gen = BatchGenerator(
        loaded.model, max_tokens=max_tokens,
        stop_tokens=[[t] for t in sorted(set(tok.eos_token_ids or ()))],
        completion_batch_size=32, prefill_batch_size=8, prefill_step_size=512,
    )
    records = []
    t_end = time.perf_counter() + duration
    for i in range(max_requests + 2):
        if i >= 2 and time.perf_counter() >= t_end:
            break
        ids = list(tok.encode(prompts[i % len(prompts)], add_special_tokens=False))
        t0 = time.perf_counter()
        (uid,) = gen.insert([ids], max_tokens=[max_tokens])
        rec = {"t_send": t0, "t_first": None, "t_last": None, "tokens": 0, "finish": None,
               "prompt_tokens": len(ids), "cached_tokens": 0, "error": None}
        for _ in range(max_tokens * 4 + 64):  # bounded: prefill steps + one token per step
            _, responses = gen.next()
            now = time.perf_counter()
            for r in responses:
                if r.uid != uid:
                    continue
                if r.finish_reason != "stop":
                    rec["tokens"] += 1
                    if rec["t_first"] is None:
                        rec["t_first"] = now
                    rec["t_last"] = now
                if r.finish_reason is not None:
                    rec["finish"] = r.finish_reason
            if rec["finish"] is not None:
                break
        rec["t_done"] = time.perf_counter()
        if i >= 2:  # first two are warm-up
            records.append(rec)
    return records


def serve(loaded, prompts: list[str], warmup: list[str], max_tokens: int,
          max_requests: int, raw_seconds: float) -> None:
    """Time the raw BatchGenerator first (its records come in the "ready" line), then keep
    one warm Engine and answer runs asked for on stdin, one JSON line each:
    {"base": first prompt index, "duration": s} -> {"engine": [...]}. Ends at end of input."""
    raw = bench_raw(loaded, prompts, max_tokens, raw_seconds, max_requests) if raw_seconds else []
    engine = Engine(loaded, EngineConfig())  # MLX work stays on the engine thread from here
    engine.start()
    try:
        for p in warmup[:3]:
            run_one(engine, p, max_tokens)
        sys.stdout.write(json.dumps({"ready": True, "raw": raw}) + "\n")
        sys.stdout.flush()
        for line in sys.stdin:
            ask = json.loads(line)
            base = ask["base"] % len(prompts)
            rotated = prompts[base:] + prompts[:base]
            records = []
            t_end = time.perf_counter() + ask["duration"]
            for i in range(max_requests):
                if time.perf_counter() >= t_end:
                    break
                rec = run_one(engine, rotated[i % len(rotated)], max_tokens)
                rec["prompt_index"] = (base + i) % len(prompts)
                records.append(rec)
            sys.stdout.write(json.dumps({"engine": records}) + "\n")
            sys.stdout.flush()
    finally:
        _stop(engine)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("screen", "serve"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts-json", required=True,
                    help="screen: {candidates, warmup}; serve: {prompts, warmup}")
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--want", type=int, default=96, help="screen: prompts to keep")
    ap.add_argument("--screen-budget", type=float, default=60.0)
    ap.add_argument("--max-requests", type=int, default=1000)
    ap.add_argument("--raw-seconds", type=float, default=0.0,
                    help="serve: first time the raw BatchGenerator for this long")
    args = ap.parse_args()
    with open(args.prompts_json) as f:
        given = json.load(f)

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if args.mode == "screen":
        params = sum(v.size for _, v in tree_flatten(loaded.model.parameters()))
        eprint(f"  in-process: loaded {loaded.id} ({params / 1e6:.2f} M parameters) "
               f"in {time.perf_counter() - t0:.1f} s")
        t1 = time.perf_counter()
        screened = screen(loaded, given["candidates"], args.max_tokens, args.want,
                          args.screen_budget)
        eprint(f"  in-process: screened {screened['tried']} prompts, {screened['kept']} run to "
               f"max_tokens without EOS ({time.perf_counter() - t1:.1f} s)")
        prompts = screened["prompts"]
        if not prompts:
            # Nothing runs to max_tokens: use the candidates; rates use actual counts.
            prompts = given["candidates"][: args.want]
        out = {
            "model_id": loaded.id,
            "model_path": str(loaded.path),
            "parameters": params,
            "eos_token_ids": sorted(set(loaded.tokenizer.eos_token_ids or ())),
            "default_device": str(mx.default_device()),
            "screen": {k: v for k, v in screened.items() if k != "prompts"},
            "prompts": prompts,
            "prompt_tokens": [len(loaded.tokenizer.encode(p, add_special_tokens=False))
                              for p in prompts],
        }
    else:
        serve(loaded, given["prompts"], given["warmup"], args.max_tokens, args.max_requests,
              args.raw_seconds)
        return 0
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
