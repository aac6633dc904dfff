"""Decode throughput with and without an enforced JSON schema, at 1 and 8 concurrent streams.

Runs the engine in-process on a model (default: the built-in one) and reports aggregate
completion tokens per second. The schema allows long answers (an unbounded array of strings),
so constrained streams run about as long as free ones; all streams sample at temperature 1.

    python bench/structured_bench.py [--model builtin] [--tokens 128] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics

from lmlink.engine.engine import Engine
from lmlink.engine.loader import load_model
from lmlink.engine.types import (
    ChatTurn,
    Completed,
    Failed,
    GenerationRequest,
    ResponseFormat,
    SamplingOptions,
)

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "notes": {"type": "array", "items": {"type": "string"}}},
    "required": ["title", "notes"],
}


class Sink:
    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()

    def deliver(self, events) -> None:
        for e in events:
            self.q.put(e)

    def done(self) -> Completed:
        while True:
            e = self.q.get(timeout=600)
            if isinstance(e, Failed):
                raise RuntimeError(e.error)
            if isinstance(e, Completed):
                return e


def run(engine: Engine, streams: int, tokens: int, schema: bool, seed: int) -> float:
    """Aggregate decode rate: tokens after each stream's first, over the span from the
    earliest first token to the last stream's end (prefill and queueing excluded)."""
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMA)) if schema else None
    sinks = []
    for i in range(streams):
        req = GenerationRequest(
            "", messages=(ChatTurn("user", f"Write notes about topic {i}, take {seed} {schema}."),),
            # No speculation for either: constrained requests never speculate, and drafts
            # would change the free side's speed for reasons unrelated to the mask.
            sampling=SamplingOptions(temperature=1.0, seed=seed * 100 + i, max_tokens=tokens,
                                     ignore_eos=not schema, speculate=False),
            response_format=fmt,
        )
        sink = Sink()
        engine.submit(req, sink)
        sinks.append(sink)
    done = [s.done() for s in sinks]
    tokens_after_first = sum(max(d.completion_tokens - 1, 0) for d in done)
    span_ms = max(d.total_ms for d in done) - min(d.time_to_first_token_ms for d in done)
    return tokens_after_first / (span_ms / 1000)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    engine = Engine(load_model(args.model))
    engine.start()
    try:
        run(engine, 2, 16, True, 99)  # warm up (compiles, builds the llguidance tokenizer)
        print(f"model={engine.model_id} max_tokens={args.tokens} reps={args.reps} (median tok/s, all streams)")
        for streams in (1, 8):
            rates: dict[bool, list[float]] = {False: [], True: []}
            for rep in range(args.reps):  # alternate, so load drift hits both alike
                for schema in (False, True) if rep % 2 == 0 else (True, False):
                    rates[schema].append(run(engine, streams, args.tokens, schema, rep))
            row = {k: statistics.median(v) for k, v in rates.items()}
            print(f"streams={streams}: free {row[False]:7.1f} tok/s   json_schema {row[True]:7.1f} tok/s   "
                  f"ratio {row[True] / row[False]:.2f}")
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
