#!/usr/bin/env python
"""The edit workload: "rewrite this text with small changes", one stream, three contenders.

    python bench/edit.py [--model builtin|PATH] [--reps 3] [--max-tokens 256]

mlx_lm.server (`/v1/chat/completions`, streamed), lmlink serve with speculation off and on
(the per-request `speculate` override on one server, through the real `lmlink` gRPC client).
Greedy, the same chat request for all; the answers copy most of their input, which is what
prompt-lookup drafts are for. Rounds alternate the contenders (A B C, C B A, ...) so load
drift on a shared machine hits all of them; the speed-up ratios are medians over rounds of
end-to-end tokens/s (completion tokens / request time). The lmlink tokens with and without
speculation are compared (they must be equal). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import eprint, machine_facts, median  # noqa: E402
from run import resolve_model, server_env  # noqa: E402
from servers import ServerSet  # noqa: E402

TEXT = (
    "The river runs to the sea. It passes the old mill, where the wheel still turns, and the "
    "fields of barley on both banks. In spring the water is high and brown; in summer it is "
    "slow and clear, and children swim near the bridge. In autumn the leaves of the willows "
    "fall on the water and drift down to the town, where the fishermen mend their nets."
)
EDIT = "Rewrite this text with small changes, keeping everything else the same:\n\n" + TEXT


async def mlx_lm_request(base: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": EDIT}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    tokens, first = 0, None
    async with httpx.AsyncClient(timeout=600) as http:
        async with http.stream("POST", base + "/v1/chat/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                obj = json.loads(line[5:])
                if obj.get("usage"):
                    tokens = obj["usage"].get("completion_tokens", tokens)
                for ch in obj.get("choices") or ():
                    if (ch.get("delta") or {}).get("content") and first is None:
                        first = time.perf_counter()
    return {"tokens": tokens, "s": time.perf_counter() - t0, "ttft": (first or t0) - t0}


async def lmlink_request(address: str, max_tokens: int, speculate: bool) -> dict:
    from lmlink.client import AsyncClient

    t0 = time.perf_counter()
    async with AsyncClient(address, timeout=600) as c:
        gen = await c.chat([{"role": "user", "content": EDIT}], max_tokens=max_tokens,
                           temperature=0.0, speculate=speculate)
    t = gen.completed.timings
    return {"tokens": gen.completed.usage.completion_tokens, "s": time.perf_counter() - t0,
            "ttft": t.time_to_first_token_ms / 1000, "ids": gen.token_ids,
            "acceptance": t.draft_acceptance_rate, "tokens_per_step": t.tokens_per_step}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--blas", default="auto", choices=("auto", "openblas", "bundled"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model_path = resolve_model(args.model)
    env, blas = server_env(args.blas, 1)
    names = ("mlx_lm.server", "lmlink (no speculation)", "lmlink (prompt lookup)")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with ServerSet(env) as servers:
        mlx = servers.start_mlx_lm(model_path, 32, 8, 512, 16)
        lm = servers.start_lmlink(model_path, 32)
        calls = {
            names[0]: lambda: mlx_lm_request(mlx.address, args.max_tokens),
            names[1]: lambda: lmlink_request(lm.address, args.max_tokens, False),
            names[2]: lambda: lmlink_request(lm.address, args.max_tokens, True),
        }
        for name in names:  # warm-up (and the prompt cache: every contender gets a hit)
            asyncio.run(calls[name]())
        for rep in range(args.reps):
            for name in (names if rep % 2 == 0 else names[::-1]):
                r = asyncio.run(calls[name]())
                r["tok_s"] = r["tokens"] / r["s"]
                runs[name].append(r)
                eprint(f"rep {rep} {name}: {r['tokens']} tokens in {r['s']:.2f} s "
                       f"({r['tok_s']:.1f} tok/s)")
    same = all(a["ids"] == b["ids"] for a, b in zip(runs[names[1]], runs[names[2]]))
    base = [r["tok_s"] for r in runs[names[0]]]
    report = {"machine": machine_facts(blas), "model": args.model, "max_tokens": args.max_tokens,
              "identical_tokens_with_and_without_speculation": same, "contenders": {}}
    print(f"edit workload, 1 stream, model {args.model}, {args.reps} rounds, "
          f"{report['machine']['cpu']} ({report['machine']['cores']} cores)")
    print(f"{'contender':26} {'tokens':>6} {'tok/s':>7} {'TTFT s':>7} {'vs mlx_lm':>9} extra")
    for name in names:
        rs = runs[name]
        ratio = median([r["tok_s"] / b for r, b in zip(rs, base)])
        extra = ""
        if "acceptance" in rs[0] and rs[0]["tokens_per_step"]:
            extra = (f"acceptance {median([r['acceptance'] for r in rs]):.2f}, "
                     f"{median([r['tokens_per_step'] for r in rs]):.2f} tokens/step")
        print(f"{name:26} {median([r['tokens'] for r in rs]):6.0f} "
              f"{median([r['tok_s'] for r in rs]):7.1f} {median([r['ttft'] for r in rs]):7.2f} "
              f"{ratio:8.2f}x {extra}")
        report["contenders"][name] = {"runs": [{k: v for k, v in r.items() if k != "ids"}
                                               for r in rs], "ratio_vs_mlx_lm": ratio}
    print(f"lmlink tokens identical with and without speculation: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
