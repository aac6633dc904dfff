#!/usr/bin/env python
"""Kept-quantized vs dequantized GGUF on this machine: load time, memory, decode tok/s.

    python bench/gguf_speed.py [--model smollm2|FILE.gguf] [--tokens 64] [--reps 3]

Each variant loads in its own subprocess (so load time and peak RSS are its own), then
decodes greedily at one stream; the variants alternate (ABAB...) so background load hits
both. This is how `lmlink serve` chooses float32 on Linux CPUs (see README).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def child(spec: str, dequantize: bool, tokens: int) -> dict:
    os.environ["LMLINK_GGUF_DEQUANTIZE"] = "1" if dequantize else "0"
    from mlx_lm.generate import generate_step

    import mlx.core as mx
    from lmlink.engine.loader import load_model

    t0 = time.perf_counter()
    loaded = load_model(spec)
    load_s = time.perf_counter() - t0
    tok = loaded.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me about rivers."}],
                                     add_generation_prompt=True)
    prompt = mx.array(prompt)
    for _ in zip(range(8), generate_step(prompt, loaded.model, max_tokens=8)):
        pass  # warm-up
    t0 = time.perf_counter()
    n = 0
    for n, _ in zip(range(1, tokens + 1), generate_step(prompt, loaded.model, max_tokens=tokens)):
        pass
    decode_s = time.perf_counter() - t0
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"load_s": load_s, "tok_s": n / decode_s, "peak_rss_mb": rss_kb / 1024,
            "weights_mb": loaded.memory_bytes / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", choices=("q", "f"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child == "f", args.tokens)))
        return 0
    runs: dict[str, list[dict]] = {"quantized": [], "float32": []}
    for rep in range(args.reps):
        for name, flag in (("quantized", "q"), ("float32", "f"))[:: 1 if rep % 2 == 0 else -1]:
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--tokens",
                                  str(args.tokens), "--child", flag],
                                 capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(name, runs[name][-1], file=sys.stderr)
    print("| variant | decode tok/s (median) | load s (median) | weights MB | peak RSS MB |")
    print("|---|---|---|---|---|")
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"| {name} | {med['tok_s']:.1f} | {med['load_s']:.1f} | "
              f"{med['weights_mb']:.0f} | {med['peak_rss_mb']:.0f} |")
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
