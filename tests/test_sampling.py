"""Sampling knobs change what comes out, through every door (engine, gRPC client, openai package).

Each test has a control that would fail if the knob were ignored: plain temperature 1.0 spreads
the first token over many seeds, so "top_k=1 equals greedy" or "min_p=0.5 keeps only greedy's
token" can only pass if the knob acts, and "many first tokens" can only pass if sampling is not
silently greedy. Requests of one draw run concurrently, so they share engine batches: a seed must
give its tokens whatever else is in the batch (the claim in lmlink/engine/sampling.py).
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Hashable, Iterator

import openai
import pytest

from lmlink.client import Client
from lmlink.engine.types import GenerationRequest, SamplingOptions
from support.collect import CollectingSink, completed, token_ids

PROMPT = "Once upon a time"
SEEDS = range(40)
# One draw: a list of sampling keyword sets -> one hashable output per set (token ids or text).
Draw = Callable[[list[dict[str, Any]], int], list[Hashable]]


def _engine_draw(engine) -> Draw:
    def draw(options: list[dict[str, Any]], n: int) -> list[Hashable]:
        sinks = []
        for kw in options:  # all submitted before any is read: they share batches
            sink = CollectingSink()
            sampling = SamplingOptions(max_tokens=n, ignore_eos=True, **kw)
            engine.submit(GenerationRequest("", prompt=PROMPT, sampling=sampling), sink)
            sinks.append(sink)
        out = []
        for sink in sinks:
            events = sink.wait()
            assert completed(events).completion_tokens == n
            out.append(tuple(token_ids(events)))
        return out

    return draw


def _grpc_draw(address: str) -> Draw:
    def draw(options: list[dict[str, Any]], n: int) -> list[Hashable]:
        with Client(address, timeout=60) as c, ThreadPoolExecutor(8) as pool:
            replies = pool.map(lambda kw: c.complete(PROMPT, max_tokens=n, ignore_eos=True, **kw),
                               options)
            return [tuple(r.token_ids) for r in replies]

    return draw


def _http_draw(url: str) -> Draw:
    """The official openai package; lmlink's extra knobs go in extra_body, as with vLLM."""
    extra = ("top_k", "min_p", "repetition_penalty")

    def one(oai: openai.OpenAI, kw: dict[str, Any], n: int) -> str:
        body = {k: v for k, v in kw.items() if k in extra}
        std = {k: v for k, v in kw.items() if k not in extra}
        reply = oai.completions.create(model="", prompt=PROMPT, max_tokens=n,
                                       extra_body={"ignore_eos": True, **body}, **std)
        assert reply.usage.completion_tokens == n
        return reply.choices[0].text

    def draw(options: list[dict[str, Any]], n: int) -> list[Hashable]:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           timeout=60) as oai, ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda kw: one(oai, kw, n), options))

    return draw


@pytest.fixture(params=["engine", "grpc", "http"])
def draw(request) -> Iterator[Draw]:
    if request.param == "engine":
        yield _engine_draw(request.getfixturevalue("engine"))
    else:
        server = request.getfixturevalue("server")
        yield _grpc_draw(server.address) if request.param == "grpc" else _http_draw(server.http_url)


def _greedy(draw: Draw, n: int) -> Hashable:
    return draw([{}], n)[0]


def test_temperature_spreads_first_tokens_and_a_seed_repeats(draw):
    greedy = _greedy(draw, 1)
    firsts = draw([{"temperature": 1.0, "seed": s} for s in SEEDS], 1)
    counts = Counter(firsts)
    # measured with the built-in model: 9-12 distinct first tokens, greedy's in about a quarter
    assert len(counts) >= 5, counts
    assert counts[greedy] <= len(SEEDS) // 2, counts
    # the same seeds again, in reverse order (so in other batches): the same tokens
    again = draw([{"temperature": 1.0, "seed": s} for s in reversed(SEEDS)], 1)
    assert again[::-1] == firsts
    # a near-zero temperature is greedy again
    assert set(draw([{"temperature": 0.01, "seed": s} for s in range(8)], 1)) == {greedy}


def test_top_k_one_and_tiny_top_p_are_greedy(draw):
    greedy = _greedy(draw, 12)
    seeds = range(12)
    plain = draw([{"temperature": 1.0, "seed": s} for s in seeds], 12)
    assert sum(p != greedy for p in plain) >= len(seeds) // 2  # the control: sampling wanders
    assert set(draw([{"temperature": 1.0, "top_k": 1, "seed": s} for s in seeds], 12)) == {greedy}
    assert set(draw([{"temperature": 1.0, "top_p": 0.01, "seed": s} for s in seeds], 12)) == {greedy}


def test_top_k_limits_the_choices(draw):
    firsts = Counter(draw([{"temperature": 1.0, "top_k": 3, "seed": s} for s in SEEDS], 1))
    assert 2 <= len(firsts) <= 3, firsts  # more than 3 means top_k was ignored; 1 means greedy


def test_min_p_drops_unlikely_tokens(draw):
    greedy = _greedy(draw, 1)
    # the greedy first token is the likeliest (built-in model: " of" 0.21, then "." 0.155, i.e.
    # 0.73 of it, then " to" 0.084): min_p=0.8 keeps only it ...
    strict = Counter(draw([{"temperature": 1.0, "min_p": 0.8, "seed": s} for s in SEEDS], 1))
    assert strict == Counter({greedy: len(SEEDS)}), strict
    # ... and a mild min_p keeps fewer than plain sampling but more than one
    mild = Counter(draw([{"temperature": 1.0, "min_p": 0.1, "seed": s} for s in SEEDS], 1))
    plain = Counter(draw([{"temperature": 1.0, "seed": s} for s in SEEDS], 1))
    assert 1 < len(mild) < len(plain), (mild, plain)


def test_repetition_penalty_changes_greedy_output(draw):
    plain, penalised = draw([{}, {"repetition_penalty": 1.5}], 60)
    assert penalised != plain
    if isinstance(plain, tuple):  # token ids: the penalty makes the text less repetitive
        assert len(set(penalised)) > len(set(plain)) + 4, (plain, penalised)


def test_a_seed_gives_its_tokens_whatever_else_is_in_the_batch(engine):
    draw = _engine_draw(engine)
    seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 4242}
    alone = draw([seeded], 24)[0]
    crowd: list[dict[str, Any]] = [{}, {"temperature": 1.0}, {"temperature": 1.3, "seed": 1},
                                   {"temperature": 1.0, "top_k": 5}, {"repetition_penalty": 1.3}]
    # submitted first, in the middle and last of a busy batch: always the same tokens
    for mix in ([seeded, *crowd], [*crowd[:2], seeded, *crowd[2:]], [*crowd, seeded]):
        assert draw(mix, 24)[mix.index(seeded)] == alone
