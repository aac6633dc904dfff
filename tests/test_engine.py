"""The batching engine in-process: determinism, batching, stops, cancellation, caching, errors."""

from __future__ import annotations

import threading
import time

import pytest

from lmlink.engine.types import (
    ChatTurn,
    Completed,
    DuplicateRequestId,
    GenerationRequest,
    InvalidRequest,
    PromptProgress,
    SamplingOptions,
    Started,
    TokenDelta,
)
from support.collect import CollectingSink, completed, text, token_ids


def chat(content: str, rid: str = "", **sampling) -> GenerationRequest:
    return GenerationRequest(
        rid, messages=(ChatTurn("user", content),), sampling=SamplingOptions(**sampling)
    )


def run(engine, request: GenerationRequest):
    sink = CollectingSink()
    engine.submit(request, sink)
    return sink.wait()


def test_event_order_and_usage(engine):
    events = run(engine, chat("Tell me about rivers.", max_tokens=12))
    assert isinstance(events[0], Started)
    assert isinstance(events[-1], Completed)
    assert all(isinstance(e, (TokenDelta, PromptProgress)) for e in events[1:-1])
    done = completed(events)
    assert done.completion_tokens == len(token_ids(events))
    assert done.prompt_tokens == events[0].prompt_tokens > 0
    assert done.finish_reason in ("stop", "length")
    assert done.completion_tokens <= 12


def test_max_tokens_is_respected(engine):
    events = run(engine, GenerationRequest("", prompt="The", sampling=SamplingOptions(max_tokens=7, ignore_eos=True)))
    done = completed(events)
    assert done.finish_reason == "length"
    assert done.completion_tokens == len(token_ids(events)) == 7


def test_eos_ends_generation_unless_ignored(engine):
    # A chat turn: the built-in model is trained to end those with <|im_end|> (greedy: after
    # 13-14 tokens for short questions); plain text it may continue for hundreds of tokens.
    natural = completed(run(engine, chat("Hello!", max_tokens=200)))
    assert natural.finish_reason == "stop" and natural.completion_tokens < 200
    forced = completed(run(engine, chat("Hello!", max_tokens=200, ignore_eos=True)))
    assert forced.finish_reason == "length" and forced.completion_tokens == 200


def test_greedy_is_deterministic(engine):
    a = run(engine, chat("What is a library?", max_tokens=24))
    b = run(engine, chat("What is a library?", max_tokens=24))
    assert token_ids(a) == token_ids(b)
    assert text(a) == text(b)


def test_seeded_sampling_reproduces(engine):
    kw = dict(max_tokens=20, temperature=1.0, top_p=0.95, seed=1234)
    a = run(engine, chat("Describe the sea.", **kw))
    b = run(engine, chat("Describe the sea.", **kw))
    assert token_ids(a) == token_ids(b)


def test_batched_equals_alone(engine):
    prompts = [f"Question {i}: what is item number {i}?" for i in range(8)]
    alone = [token_ids(run(engine, chat(p, max_tokens=16))) for p in prompts]
    sinks = []
    for p in prompts:
        s = CollectingSink()
        engine.submit(chat(p, max_tokens=16), s)
        sinks.append(s)
    together = [token_ids(s.wait()) for s in sinks]
    assert together == alone


def test_stop_string_cuts_output(engine):
    base = text(run(engine, GenerationRequest("", prompt="The", sampling=SamplingOptions(max_tokens=40, ignore_eos=True))))
    assert len(base) > 6, base
    stop = base[3:6]
    events = run(
        engine, GenerationRequest("", prompt="The", sampling=SamplingOptions(max_tokens=40, stop=(stop,), ignore_eos=True))
    )
    out = text(events)
    assert stop not in out
    assert base.startswith(out)
    assert completed(events).finish_reason == "stop"


def test_repeated_prompt_uses_prompt_cache(engine):
    long_question = "Please summarise the following. " + "The river runs to the sea. " * 20
    first = run(engine, chat(long_question, max_tokens=8))
    second = run(engine, chat(long_question, max_tokens=8))
    assert completed(second).cached_tokens > completed(first).cached_tokens
    assert completed(second).cached_tokens >= completed(second).prompt_tokens // 2
    assert token_ids(first) == token_ids(second)


def test_cancel_frees_the_slot(engine):
    sink = CollectingSink()
    rid = engine.submit(
        GenerationRequest("to-cancel", prompt="Once", sampling=SamplingOptions(max_tokens=1500, ignore_eos=True)), sink
    )
    first = sink.events.get(timeout=30)
    assert isinstance(first, Started)
    assert engine.cancel(rid)
    events = [first, *sink.wait()]
    assert completed(events).finish_reason == "cancelled"
    assert completed(events).completion_tokens < 1500
    deadline = time.monotonic() + 5
    while engine.stats().active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().active == 0
    assert not engine.cancel(rid), "a finished request cannot be cancelled again"


def test_cancel_checks_owner(engine):
    sink = CollectingSink()
    req = GenerationRequest("owned", prompt="Once", sampling=SamplingOptions(max_tokens=400, ignore_eos=True), owner="alice")
    engine.submit(req, sink)
    assert not engine.cancel("owned", owner="mallory")
    assert engine.cancel("owned", owner="alice")
    assert completed(sink.wait()).finish_reason == "cancelled"


def test_duplicate_request_id_is_refused(engine):
    sink = CollectingSink()
    engine.submit(GenerationRequest("dup", prompt="Once", sampling=SamplingOptions(max_tokens=300, ignore_eos=True)), sink)
    with pytest.raises(DuplicateRequestId):
        engine.submit(GenerationRequest("dup", prompt="x", sampling=SamplingOptions(max_tokens=3)), CollectingSink())
    engine.cancel("dup")
    sink.wait()


@pytest.mark.parametrize(
    "request_kwargs, message",
    [
        (dict(messages=()), "messages is empty"),
        (dict(messages=(ChatTurn("robot", "hi"),)), "role"),
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt="hi", sampling=SamplingOptions(max_tokens=0)), "max_tokens"),
        (dict(prompt="hi", sampling=SamplingOptions(max_tokens=-5)), "max_tokens"),
        (dict(prompt="hi", sampling=SamplingOptions(max_tokens=10**9)), "does not fit"),
        (dict(prompt="hi", sampling=SamplingOptions(temperature=float("nan"))), "finite"),
        (dict(prompt="hi", sampling=SamplingOptions(temperature=-1)), "temperature"),
        (dict(prompt="hi", sampling=SamplingOptions(top_p=0)), "top_p"),
        (dict(prompt="hi", sampling=SamplingOptions(stop=("",))), "stop"),
        (dict(prompt="word " * 5000), "context"),
    ],
)
def test_invalid_requests_are_refused_up_front(engine, request_kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        engine.submit(GenerationRequest("", **request_kwargs), CollectingSink())


def test_bad_request_does_not_disturb_running_streams(engine):
    sink = CollectingSink()
    engine.submit(GenerationRequest("", prompt="Once", sampling=SamplingOptions(max_tokens=60, ignore_eos=True)), sink)
    for _ in range(20):
        with pytest.raises(InvalidRequest):
            engine.submit(GenerationRequest("", prompt=""), CollectingSink())
    assert completed(sink.wait()).finish_reason in ("stop", "length")


def test_long_prompt_reports_progress(engine):
    prompt = "The river runs to the sea and the sea " * 100  # several prefill chunks
    events = run(engine, GenerationRequest("", prompt=prompt, sampling=SamplingOptions(max_tokens=2)))
    progress = [e for e in events if isinstance(e, PromptProgress)]
    assert progress, "expected prompt-progress events for a multi-chunk prompt"
    assert progress[-1].processed_tokens <= progress[-1].total_tokens
    assert isinstance(events[-1], Completed)


def test_concurrent_submitters(engine):
    results: dict[int, list[int]] = {}

    def worker(i: int) -> None:
        results[i] = token_ids(run(engine, chat(f"thread {i % 2}", max_tokens=10)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6
    assert results[0] == results[2] == results[4]
    assert results[1] == results[3] == results[5]


@pytest.mark.parametrize(
    "sampling, message",
    [
        (dict(temperature=1.0, top_k=5000), "vocabulary"),
        (dict(temperature=1.0, top_k=2048), "vocabulary"),  # the builtin model's vocabulary
        (dict(temperature=1.0, seed=-1), "seed"),
        (dict(temperature=1.0, seed=1 << 64), "seed"),
        (dict(repetition_penalty=float("inf")), "finite"),
        (dict(repetition_penalty=1e9), "repetition_penalty"),
        (dict(top_k=2.5), "integer"),
        (dict(max_tokens=3.0), "integer"),
    ],
)
def test_sampling_values_are_checked_against_the_model(engine, sampling, message):
    with pytest.raises(InvalidRequest, match=message):
        engine.submit(GenerationRequest("", prompt="hi", sampling=SamplingOptions(**sampling)), CollectingSink())


def test_largest_valid_top_k_generates(engine):
    events = run(engine, GenerationRequest("", prompt="hi", sampling=SamplingOptions(temperature=1.0, top_k=2047, seed=3, max_tokens=4)))
    assert completed(events).completion_tokens >= 1


def test_step_time_failure_fails_only_its_request(engine, monkeypatch):
    """A sampler that raises inside the shared step (injected for one request) must fail that
    request alone: the other streams in the same batch finish with their solo tokens."""
    import lmlink.engine.sampling as sampling_mod
    from lmlink.engine.types import Failed

    victims = [chat(f"Victim {i} asks about rivers.", max_tokens=30, ignore_eos=True) for i in range(3)]
    solo = [token_ids(run(engine, v)) for v in victims]
    real = sampling_mod.apply_top_p
    calls = {"n": 0}

    def exploding(logprobs, top_p):
        if abs(top_p - 0.123) < 1e-9:
            calls["n"] += 1
            if calls["n"] > 3:  # fails mid-generation, not at the first token
                raise ValueError("injected sampler failure")
        return real(logprobs, top_p)

    monkeypatch.setattr(sampling_mod, "apply_top_p", exploding)
    sinks = [CollectingSink() for _ in victims]
    for v, s in zip(victims, sinks):
        engine.submit(v, s)
    bad = CollectingSink()
    engine.submit(chat("I am the culprit.", max_tokens=200, ignore_eos=True, temperature=1.0, top_p=0.123, seed=1), bad)
    bad_events = bad.wait()
    assert isinstance(bad_events[-1], Failed), bad_events[-1]
    assert isinstance(bad_events[-1].error, InvalidRequest)
    assert "injected sampler failure" in str(bad_events[-1].error)
    assert len(token_ids(bad_events)) <= 3
    for s, expected in zip(sinks, solo):
        events = s.wait()
        assert completed(events).finish_reason == "length"
        assert token_ids(events) == expected
    assert engine.healthy
    assert completed(run(engine, chat("And afterwards?", max_tokens=5))).completion_tokens >= 1


def test_concurrent_requests_share_a_long_prefix(loaded_model):
    """Requests that arrive together with the same long system prompt compute it once: the
    first prefills it, the others wait for it and start from its cache, with the tokens they
    get alone (no prompt cache involved)."""
    from lmlink.engine.engine import Engine, EngineConfig

    system = "You are a careful assistant who answers about rivers and mills. " * 40
    questions = [f"Question {i}: where does river {i} run?" for i in range(4)]

    def request(q: str) -> GenerationRequest:
        return GenerationRequest("", messages=(ChatTurn("system", system), ChatTurn("user", q)),
                                 sampling=SamplingOptions(max_tokens=12, ignore_eos=True))

    solo = []
    for q in questions:
        eng = Engine(loaded_model, EngineConfig(prompt_cache_entries=1))
        eng.start()
        solo.append(token_ids(run(eng, request(q))))
        eng.stop()
    eng = Engine(loaded_model)
    eng.start()
    try:
        sinks = []
        for q in questions:
            s = CollectingSink()
            eng.submit(request(q), s)
            sinks.append(s)
        results = [s.wait() for s in sinks]
    finally:
        eng.stop()
    assert [token_ids(r) for r in results] == solo
    cached = sorted(completed(r).cached_tokens for r in results)
    prompt_tokens = completed(results[0]).prompt_tokens
    assert cached[0] == 0  # the first computes the shared prefix...
    assert all(c >= prompt_tokens - 20 for c in cached[1:]), cached  # ...the others reuse it


def test_a_mostly_cached_prompt_is_not_copied_into_the_cache_while_it_runs(loaded_model):
    """Followers whose long prompt came from the prompt cache add no entry of their own while
    they decode (each would be a full copy of the shared prefix); the leader's prompt, which
    it computed itself, is shared as soon as it is prefilled."""
    from lmlink.engine.engine import Engine

    system = "You are a careful assistant who answers about rivers and mills. " * 40

    def request(q: str, n: int) -> GenerationRequest:
        return GenerationRequest("", messages=(ChatTurn("system", system), ChatTurn("user", q)),
                                 sampling=SamplingOptions(max_tokens=n, ignore_eos=True))

    class Sink(CollectingSink):
        def __init__(self) -> None:
            super().__init__()
            self.decoding = threading.Event()

        def deliver(self, events) -> None:  # noqa: ANN001
            super().deliver(events)
            if any(isinstance(e, TokenDelta) for e in events):
                self.decoding.set()

    eng = Engine(loaded_model)
    eng.start()
    try:
        leader = Sink()
        eng.submit(request("Where does the first river run?", 400), leader)
        assert leader.decoding.wait(60)
        assert eng.stats().prompt_cache_entries == 1  # its prompt, while it still runs
        followers = [Sink() for _ in range(3)]
        for i, s in enumerate(followers):
            eng.submit(request(f"Where does river {i} run?", 400), s)
        assert all(s.decoding.wait(60) for s in followers)
        stats = eng.stats()
        assert stats.active == 4
        assert stats.prompt_cache_entries == 1, stats
        assert stats.prompt_cache_bytes > 0
        results = [s.wait() for s in (leader, *followers)]
    finally:
        eng.stop()
    assert all(completed(r).cached_tokens > 600 for r in results[1:])


def test_cached_prompts_hold_only_their_own_memory(loaded_model):
    """A finished request's cache, kept for reuse, is its own compact copy: the arrays alive
    afterwards are the prompt caches and nothing else (a lazy copy would keep the batch's
    whole key/value buffers alive with it)."""
    import gc

    import mlx.core as mx

    from lmlink.engine.engine import Engine

    system = "You are a careful assistant who answers about rivers and mills. " * 30
    gc.collect()
    before = mx.get_active_memory()
    eng = Engine(loaded_model)
    eng.start()
    try:
        sinks = []
        for i in range(4):
            s = CollectingSink()
            eng.submit(GenerationRequest("", messages=(ChatTurn("system", f"{i} {system}"),
                                                       ChatTurn("user", f"River {i}?")),
                                         sampling=SamplingOptions(max_tokens=24)), s)
            sinks.append(s)
        for s in sinks:
            s.wait()
        stats = eng.stats()
        gc.collect()
        grown = mx.get_active_memory() - before
    finally:
        eng.stop()
    assert stats.prompt_cache_entries >= 4
    assert grown <= stats.prompt_cache_bytes * 1.1 + (1 << 20), (grown, stats.prompt_cache_bytes)
