"""Closed-loop load: N concurrent streams, each sending its next request as soon as the last
one ends, until a time budget (and a per-stream request cap) runs out.

Both clients record the same thing per request, timed in this process as events arrive:
send time, arrival of the first generated token, arrival of the last, completion-token count.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Protocol

import httpx

from lmlink.client import AsyncClient
from lmlink.client.events import Completed, Started, TokenDelta


def _record(t0: float) -> dict:
    return {"t_send": t0, "t_first": None, "t_last": None, "t_done": None, "tokens": 0,
            "messages": 0, "finish": None, "prompt_tokens": 0, "cached_tokens": 0,
            "error": None}


class Target(Protocol):
    name: str

    async def request(self, prompt: str, max_tokens: int) -> dict: ...

    async def close(self) -> None: ...


class LmlinkTarget:
    """lmlink over gRPC through the real `lmlink.client.AsyncClient` (one shared channel)."""

    name = "lmlink"

    def __init__(self, address: str) -> None:
        self.client = AsyncClient(address, timeout=300.0)

    async def request(self, prompt: str, max_tokens: int) -> dict:
        rec = _record(time.perf_counter())
        try:
            async for ev in self.client.stream(prompt=prompt, max_tokens=max_tokens,
                                               temperature=0.0):
                now = time.perf_counter()
                rec["messages"] += 1
                if isinstance(ev, TokenDelta):
                    if ev.token_ids:
                        if rec["t_first"] is None:
                            rec["t_first"] = now
                        rec["t_last"] = now
                        rec["tokens"] += len(ev.token_ids)
                elif isinstance(ev, Started):
                    rec["prompt_tokens"] = ev.prompt_tokens
                    rec["cached_tokens"] = ev.cached_tokens
                elif isinstance(ev, Completed):
                    rec["finish"] = ev.finish_reason
                    rec["reported_tokens"] = ev.usage.completion_tokens
        except Exception as exc:  # noqa: BLE001 - recorded, the phase decides what to do
            rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["t_done"] = time.perf_counter()
        return rec

    async def close(self) -> None:
        await self.client.close()


class SseTarget:
    """An OpenAI-style streaming endpoint (`stream: true`, SSE) via httpx, for any server.

    Each `data:` line is parsed as it arrives. Connection resets before any answer byte are
    retried: mlx_lm.server listens with socketserver's default backlog of 5, so a burst of
    connects can be reset (as OpenAI clients do; the time lost stays in that request's TTFT).
    mlx_lm.server counts the end-of-sequence token in `usage.completion_tokens`, lmlink does
    not (`counts_eos`): the count recorded is generated tokens without it.
    """

    ATTEMPTS = 4

    def __init__(self, name: str, base_url: str, path: str, counts_eos: bool,
                 connections: int = 256, timeout: float = 300.0) -> None:
        self.name, self.counts_eos = name, counts_eos
        self.url = base_url + path
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits)

    async def send(self, body: dict, rec: dict) -> dict:
        """Stream one request into `rec` (see `_record`); retries resets before any answer."""
        rec.setdefault("retries", 0)
        for attempt in range(self.ATTEMPTS):
            try:
                await self._stream(body, rec)
                break
            except httpx.TransportError as exc:
                if rec["messages"] or attempt == self.ATTEMPTS - 1:
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                    break
                rec["retries"] += 1
                await asyncio.sleep(0.02 * (attempt + 1))
            except Exception as exc:  # noqa: BLE001 - recorded; the run decides what to do
                rec["error"] = f"{type(exc).__name__}: {exc}"
                break
        reported = rec.get("reported_tokens", 0)
        eos = self.counts_eos and rec["finish"] == "stop" and reported
        rec["tokens"] = reported - (1 if eos else 0)
        rec["t_done"] = time.perf_counter()
        return rec

    async def _stream(self, body: dict, rec: dict) -> None:
        async with self.http.stream("POST", self.url, json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and ": keepalive" comments
                now = time.perf_counter()
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                rec["messages"] += 1
                obj = json.loads(data)
                usage = obj.get("usage")
                if usage:
                    rec["reported_tokens"] = usage.get("completion_tokens") or 0
                    rec["prompt_tokens"] = usage.get("prompt_tokens") or 0
                    details = usage.get("prompt_tokens_details") or {}
                    if details.get("cached_tokens") is not None:
                        rec["cached_tokens"] = details["cached_tokens"]
                for choice in obj.get("choices") or ():
                    # /v1/completions streams `text`, /v1/chat/completions `delta.content`.
                    content = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if content:
                        if "text" in rec:
                            rec["text"] += content
                        if rec["t_first"] is None:
                            rec["t_first"] = now
                        rec["t_last"] = now
                    if choice.get("finish_reason"):
                        rec["finish"] = choice["finish_reason"]
                        if rec["t_first"] is not None:
                            rec["t_last"] = now

    async def close(self) -> None:
        await self.http.aclose()


class MlxLmTarget(SseTarget):
    """Raw completions (`/v1/completions`): mlx_lm.server, or lmlink's HTTP bridge with the
    very same client (`counts_eos=False`)."""

    def __init__(self, base_url: str, name: str = "mlx_lm.server",
                 counts_eos: bool = True) -> None:
        super().__init__(name, base_url, "/v1/completions", counts_eos)

    async def request(self, prompt: str, max_tokens: int) -> dict:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        return await self.send(body, _record(time.perf_counter()))


async def run_phase(target: Target, prompts: list[str], concurrency: int, duration: float,
                    max_tokens: int, base: int, max_per_stream: int,
                    hard_timeout: float, stagger: float = 0.0) -> dict:
    """Run `concurrency` closed-loop streams for about `duration` seconds.

    Stream w's k-th request uses prompts[(base + w + k * concurrency) % len(prompts)], so every
    server sees the same prompts in the same per-stream order. No request starts after the
    budget; requests in flight then run to completion (bounded by max_tokens).

    Stream w starts w/concurrency * `stagger` seconds late. With `stagger` about one request's
    duration, requests start and end spread out as independent users' would, instead of all
    streams arriving (and finishing) together in waves.
    """
    t_start = time.perf_counter()
    t_stop = t_start + duration
    records: list[dict] = []

    async def stream(w: int) -> None:
        if stagger > 0:
            await asyncio.sleep(stagger * w / concurrency)
        for k in range(max_per_stream):
            if k > 0 and time.perf_counter() >= t_stop:
                return
            index = (base + w + k * concurrency) % len(prompts)
            rec = await target.request(prompts[index], max_tokens)
            rec["stream"], rec["prompt_index"] = w, index
            records.append(rec)
            if rec["error"]:
                return

    await asyncio.wait_for(asyncio.gather(*(stream(w) for w in range(concurrency))),
                           timeout=hard_timeout)
    return {"t_start": t_start, "t_stop": t_stop, "t_end": time.perf_counter(),
            "window": (t_start + stagger, t_stop), "records": records}


async def warm_up(target: Target, prompts: list[str], levels: list[int],
                  max_tokens: int) -> dict[int, float]:
    """One full-length round at each concurrency level (new batch shapes get built).

    Returns each round's duration: about how long one request takes at that level.
    """
    took: dict[int, float] = {}
    for n in levels:
        t0 = time.perf_counter()
        recs = await asyncio.wait_for(
            asyncio.gather(*(target.request(prompts[i % len(prompts)], max_tokens)
                             for i in range(n))),
            timeout=300,
        )
        took[n] = time.perf_counter() - t0
        errors = [r["error"] for r in recs if r["error"]]
        if errors:
            raise RuntimeError(f"{target.name} warm-up failed: {errors[0]}")
    return took
