"""Client side of tests/test_resume_netns.py, run inside the client namespace.

Talks to `lmlink serve --listen tailscaled` over a real WireGuard tunnel with lmlink's own
client. Asks the parent (one line on stdout, waits for one line on stdin) to take the tunnel's
underlay down and up again at the right moments; prints one JSON report as its last line.
"""

from __future__ import annotations

import json
import sys
import time

from lmlink.client import Client, TokenDelta

PROMPT = "Once upon a time"


def ask(what: str) -> None:
    print(what, flush=True)
    assert sys.stdin.readline().strip() == "ok"


def main() -> None:
    cfg = json.loads(open(sys.argv[1]).read())
    report: dict = {}
    # Short keepalive for the mid-stream cut, so the test is quick; the defaults for idle.
    quick = [("grpc.use_local_subchannel_pool", 1), ("grpc.keepalive_time_ms", 1000),
             ("grpc.keepalive_timeout_ms", 1000)]
    with Client(cfg["grpc"], expected_fingerprint=cfg["fingerprint"], timeout=120,
                options=quick) as c:
        reference = c.complete(PROMPT, max_tokens=cfg["tokens"], ignore_eos=True)
        stream = c.stream(prompt=PROMPT, max_tokens=cfg["tokens"], ignore_eos=True)
        text, deltas, up_at, first_after = [], 0, None, None
        for event in stream:
            if isinstance(event, TokenDelta):
                text.append(event.text)
                deltas += 1
                if deltas == 5:
                    ask("down")  # the parent takes the link down, waits, brings it back
                    up_at = time.monotonic()
                elif deltas > 5 and first_after is None:
                    first_after = time.monotonic() - up_at
        report["cut"] = {"equal": "".join(text) == reference.text, "resumed": stream.resumed,
                         "chars": len(reference.text),
                         "seconds_from_link_up_to_next_token": round(first_after or -1, 2)}
    with Client(cfg["grpc"], expected_fingerprint=cfg["fingerprint"], timeout=60,
                options=[("grpc.use_local_subchannel_pool", 1)]) as c:
        c.complete("Hello", max_tokens=4)  # connected, then idle with the link down
        ask("idle")
        t0 = time.monotonic()
        first = None
        for event in c.stream(prompt="Hello again", max_tokens=16):
            if isinstance(event, TokenDelta) and first is None:
                first = time.monotonic() - t0
        report["idle"] = {"seconds_to_first_token": round(first or -1, 2)}
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
