"""Run inside a namespace: start `lmlink link` for the given servers, wait until it has probed
each, ask one chat completion with the `openai` package, print one JSON line with the outcome.

Used by tests/test_link_denied_netns.py: the link must live where the test's client is, and a
link only serves its own machine's loopback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support.link import ASK, start_link  # noqa: E402


def main(model: str, *servers: str) -> None:
    link, url = start_link(*servers, refresh=2.0)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # every server probed once (up, down or refused)
            status = httpx.get(url.rsplit("/v1", 1)[0] + "/status", timeout=10).json()
            if all(s["up"] or s["error"] != "not checked yet" for s in status["servers"]):
                break
            time.sleep(0.2)
        oai = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        try:
            raw = oai.chat.completions.with_raw_response.create(model=model, messages=ASK, max_tokens=4)
            out = {"status": raw.http_response.status_code, "server": raw.headers.get("x-lmlink-server"),
                   "text": raw.parse().choices[0].message.content}
        except openai.APIStatusError as exc:
            error = exc.body if isinstance(exc.body, dict) else {}
            out = {"status": exc.status_code, "exception": type(exc).__name__,
                   "message": error.get("message", str(exc)), "code": error.get("code"),
                   "servers": status["servers"]}
        print(json.dumps(out), flush=True)
    finally:
        link.terminate()
        link.wait(10)


if __name__ == "__main__":
    main(*sys.argv[1:])
