"""Run inside a node's namespace: link-hop latency over the real tailnet (prints one JSON line).

Same measurement as tests/test_link_latency.py (openai package, streamed, medians), but the
"direct" side is the server's HTTP bridge at its tailnet address over HTTPS (project CA) and
the "link" side is `lmlink link` on this node, which reaches the server by gRPC over the tailnet.
"""

from __future__ import annotations

import json
import statistics
import sys

import httpx
import openai

from test_link_latency import measure


def main(bridge: str, ca: str, link: str, model: str, rounds: int) -> None:
    direct = openai.OpenAI(base_url=f"{bridge}/v1", api_key="x", max_retries=0, timeout=60,
                           http_client=httpx.Client(verify=ca))
    linked = openai.OpenAI(base_url=link, api_key="x", max_retries=0, timeout=60)
    rows: dict[str, list[tuple[float, float]]] = {"direct": [], "link": []}
    for client in (direct, linked):
        measure(client, model)
    for _ in range(rounds):
        rows["direct"].append(measure(direct, model))
        rows["link"].append(measure(linked, model))
    out = {name: {"ttft_ms": round(statistics.median(r[0] for r in rs), 2),
                  "per_token_ms": round(statistics.median(r[1] for r in rs), 3)}
           for name, rs in rows.items()}
    out["added"] = {k: round(out["link"][k] - out["direct"][k], 3) for k in ("ttft_ms", "per_token_ms")}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
