"""Engine-thread -> asyncio hand-off: one wake per step, pacing that coalesces text."""

from __future__ import annotations

import asyncio
import threading
import time

from lmlink.api.streams import StreamHub
from lmlink.engine.types import Completed, TokenDelta

DONE = Completed("length", 1, 20, 0, 1.0, 1.0, 1.0, 1.0, 0.0)


def fake_engine(hub: StreamHub, queue, n: int, every: float) -> threading.Thread:
    def run() -> None:
        for i in range(n):
            queue.deliver([TokenDelta(f"t{i} ", [i])])
            hub.on_step()
            time.sleep(every)
        queue.deliver([DONE])
        hub.on_step()

    return threading.Thread(target=run)


async def consume(pace: float, n: int = 40, every: float = 0.002):
    hub = StreamHub(asyncio.get_running_loop(), pace=pace)
    queue = hub.open()
    engine = fake_engine(hub, queue, n, every)
    start = time.monotonic()
    engine.start()
    batches, first_at = [], None
    while True:
        events = await queue.drain()
        if first_at is None:
            first_at = time.monotonic() - start
        batches.append(events)
        if isinstance(events[-1], Completed):
            break
    engine.join()
    return batches, first_at


async def test_every_event_arrives_in_order_whatever_the_pace():
    for pace in (0.0, 0.02):
        batches, _ = await consume(pace)
        ids = [t for b in batches for e in b if isinstance(e, TokenDelta) for t in e.token_ids]
        assert ids == list(range(40))
        assert isinstance(batches[-1][-1], Completed)


async def test_pacing_coalesces_text_but_not_the_first_token():
    unpaced, _ = await consume(0.0)
    paced, first_at = await consume(0.03)
    assert first_at < 0.03, "the first token must not wait for the pace"
    assert len(paced) < len(unpaced) / 2, (len(paced), len(unpaced))
    sizes = [len(b) for b in paced]
    assert max(sizes) > 2, sizes


async def test_final_event_is_not_held_back():
    hub = StreamHub(asyncio.get_running_loop(), pace=5.0)
    queue = hub.open()
    queue.deliver([TokenDelta("a", [1])])
    hub.on_step()
    assert [e.text for e in await queue.drain()] == ["a"]
    queue.deliver([TokenDelta("b", [2]), DONE])
    hub.on_step()
    start = time.monotonic()
    events = await asyncio.wait_for(queue.drain(), 1.0)
    assert time.monotonic() - start < 0.5
    assert isinstance(events[-1], Completed)
