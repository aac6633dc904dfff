"""Continuous batching over mlx-lm's BatchGenerator, driven by one worker thread.

Why one thread: MLX work for a model must stay on one stream and one thread, and a single
loop lets every step admit new requests and drop cancelled ones before the next forward
pass. Callers talk to the worker only through `submit` / `cancel` (thread-safe); results go
out through each request's `EventSink`, grouped per step.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from .constrained import warm_up
from .loader import LoadedModel
from .logprobs import token_logprob
from .memory import return_freed_memory
from .lockstep import Admit, LocalBroadcaster, LockstepError, Remove, StepCommands
from .prefix import shared_with, worth_caching
from .prompts import encode_prompt
from .sampling import make_processors, make_sampler, vocab_size
from .speculative import (
    POSITION_COST,
    DraftModel,
    SpecStats,
    load_draft_model,
    SpeculativeBatch,
    spec_timings,
    speculation_possible,
)
from .stops import StopStringMatcher
from .tools import ToolCallSink, prepare_request
from .types import (
    Completed,
    DuplicateRequestId,
    EngineError,
    EngineStopped,
    Event,
    EventSink,
    Failed,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
    PromptProgress,
    Started,
    TokenDelta,
)

log = logging.getLogger("lmlink.engine")


@dataclass(frozen=True)
class EngineConfig:
    """Batching limits; defaults suit a single Mac serving a handful of users."""

    max_batch_size: int = 32
    prefill_batch_size: int = 8
    prefill_step_size: int = 512
    max_queue: int = 1024
    default_max_tokens: int = 512
    prompt_cache_entries: int = 16
    prompt_cache_bytes: int = 1 << 30
    # While streams are decoding, a new request may wait up to this long (scaled by how full
    # the batch is) so that arrivals share one prefill pass and one merge into the batch:
    # each pass stalls every running stream for about two decode steps. 0 = admit at once.
    admit_window_s: float = 0.1
    # Speculative decoding: "prompt-lookup" (drafts from the request's own text, verified in
    # the batch step), "draft-model" (drafts from the small model at `draft_model`, a path or
    # id with the same vocabulary; single process only) or "off". A request may override it
    # (SamplingOptions.speculate).
    speculate: str = "prompt-lookup"
    draft_model: str | None = None
    # What one more position costs in a decode pass, relative to the pass: decides how many
    # draft tokens are worth verifying (see speculative.POSITION_COST; measured for a dense
    # model on a CPU; a mixture-of-experts model pays more per position, a GPU less).
    verify_position_cost: float = POSITION_COST


@dataclass(frozen=True)
class EngineStats:
    active: int
    queued: int
    generated_tokens: int
    recent_tokens_per_second: float
    max_batch_size: int
    draft_tokens: int = 0  # speculative decoding since start: drafts verified, drafts kept
    accepted_draft_tokens: int = 0
    prompt_cache_entries: int = 0  # KV caches kept for reuse, and the memory they hold
    prompt_cache_bytes: int = 0


@dataclass(eq=False)
class _Request:
    """A request's state from submission until its final event; touched by the worker only."""

    request: GenerationRequest
    sink: EventSink
    prompt: list[int]
    max_tokens: int
    submitted: float
    uid: int = -1
    admitted: float = 0.0
    first_token: float = 0.0
    cached_tokens: int = 0
    completion_tokens: int = 0
    detokenizer: Any = None
    stops: StopStringMatcher | None = None
    pending: list[Event] = field(default_factory=list)
    done: bool = False  # final event made (a stop string may leave it in the batch one step)
    fetched: Any = None  # (cache, rest) from the prompt cache, between deciding and admitting
    fault: Exception | None = None  # this request's own sampler/processor raised mid-step
    spec: SpecStats | None = None  # speculation counters, when the request speculates
    prefilling: bool = False  # a long prompt still being computed (others may wait for it)


class _NoSink:
    """Ranks other than 0 deliver nothing."""

    def deliver(self, events: Sequence[Event]) -> None:
        pass


_NO_SINK = _NoSink()


class Engine:
    """Serves one loaded model to many concurrent requests.

    Every iteration of the worker is: rank 0 decides this step's commands (admit / remove),
    the broadcaster shares them, every rank applies them and calls `BatchGenerator.next()`.
    Single-process engines run the same loop with a no-op broadcaster; in a cluster
    (`lockstep=DistributedBroadcaster(group)`) ranks > 0 call `run_follower()` instead of
    `start()` and only rank 0 delivers events.
    """

    def __init__(
        self, loaded: LoadedModel, config: EngineConfig | None = None, *, lockstep: Any = None
    ) -> None:
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.lockstep = lockstep if lockstep is not None else LocalBroadcaster()
        self.cluster: Any = None  # cluster facts (ranks, hosts, backend) for status, if any
        self._tokenizer = loaded.tokenizer
        self._eos = sorted(set(loaded.tokenizer.eos_token_ids or ()))
        self._vocab_size = vocab_size(loaded.model, loaded.tokenizer)
        self._eos_stops = StopSequences([[t] for t in self._eos])
        self._no_stops = StopSequences()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: deque[_Request] = deque()
        self._cancels: set[str] = set()
        self._by_id: dict[str, _Request] = {}
        self._by_uid: dict[int, _Request] = {}
        self._stopping = False
        self._dead: EngineError | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmlink-engine", daemon=True)
        self._step_listeners: list[Callable[[], None]] = []
        self._trim_due = False  # work was done since memory was last handed back
        # Ranks hold different shards, so a byte limit would evict differently on each rank;
        # in a cluster the cache is bounded by entry count alone (the same on every rank).
        self._prompt_cache = LRUPromptCache(
            max_size=self.config.prompt_cache_entries,
            max_bytes=self.config.prompt_cache_bytes if not self.lockstep.distributed else 1 << 62,
        )
        self._live: dict[str, int] = {}  # request id -> uid of requests inside the generator
        self._deferred: list[Remove] = []  # decided on rank 0, applied at the next step
        self._seeds = random.Random()
        self._admitting: dict[str, _Request] = {}
        self._generated_tokens = 0
        self._recent: deque[tuple[float, int]] = deque()
        self._spec_batch: SpeculativeBatch | None = None
        self._drafted = self._accepted = 0
        self._can_speculate = speculation_possible(loaded.model)
        self._draft_model = None
        if self.config.speculate == "draft-model":
            self._draft_model = load_draft_model(
                self.config.draft_model, self._vocab_size, self.lockstep.distributed
            )

    # ----- public, thread-safe --------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self.loaded.id

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        warm_up(self._tokenizer)

    def add_step_listener(self, listener: Callable[[], None]) -> None:
        """Called on the worker thread after each step's events were delivered (must not block)."""
        self._step_listeners.append(listener)

    def submit(self, request: GenerationRequest, sink: EventSink) -> str:
        """Validate, tokenize and queue a request; raises `EngineError` subclasses synchronously."""
        request.sampling.validate(self._vocab_size)
        request = prepare_request(self._tokenizer, request)
        prompt = encode_prompt(self._tokenizer, request)
        context = self.loaded.context_length
        if len(prompt) >= context:
            raise InvalidRequest(
                f"prompt is {len(prompt)} tokens but the model context is {context} tokens"
            )
        room = context - len(prompt)
        wanted = request.sampling.max_tokens
        if wanted is not None and wanted > room:
            raise InvalidRequest(
                f"max_tokens {wanted} does not fit: prompt is {len(prompt)} tokens and the "
                f"model context is {context} tokens (at most {room} more)"
            )
        max_tokens = wanted if wanted is not None else min(self.config.default_max_tokens, room)
        request_id = request.request_id or uuid.uuid4().hex
        if request_id != request.request_id:
            request = _with_id(request, request_id)
        sink = ToolCallSink.wrap(self._tokenizer, request, sink)
        state = _Request(request, sink, prompt, max_tokens, time.perf_counter())
        with self._lock:
            if self._stopping or self._dead is not None:
                raise self._dead or EngineStopped("the server is shutting down")
            if request_id in self._by_id:
                raise DuplicateRequestId(f"request id {request_id!r} is already running")
            # In the server the Guard already bounds waiting calls fairly; requests it just
            # cancelled may sit here until the next step, so leave room for a whole batch
            # rather than refuse a call the Guard admitted.
            if len(self._incoming) >= self.config.max_queue + self.config.max_batch_size:
                raise Overloaded(
                    f"{len(self._incoming)} requests are already waiting; retry shortly"
                )
            self._by_id[request_id] = state
            self._incoming.append(state)
            self._wake.notify()
        return request_id

    def cancel(self, request_id: str, owner: str | None = None) -> bool:
        """Ask the worker to stop a request; False if no such request (or not the owner's)."""
        with self._lock:
            state = self._by_id.get(request_id)
            if state is None or (owner is not None and state.request.owner != owner):
                return False
            self._cancels.add(request_id)
            self._wake.notify()
            return True

    def cancel_all(self) -> int:
        """Cancel every request of this engine, whichever door sent it (used to unload a
        model: every stream then ends the same way, with finish_reason "cancelled")."""
        with self._lock:
            ids = list(self._by_id)
            self._cancels.update(ids)
            self._wake.notify()
        return len(ids)

    def stats(self) -> EngineStats:
        with self._lock:
            queued = len(self._incoming)
            active = len(self._by_id) - queued
            now = time.perf_counter()
            recent = [(t, n) for t, n in tuple(self._recent) if now - t <= 5.0]
        span = (now - recent[0][0]) if len(recent) > 1 else 0.0
        tps = sum(n for _, n in recent[1:]) / span if span > 0 else 0.0
        return EngineStats(
            active=active,
            queued=queued,
            generated_tokens=self._generated_tokens,
            recent_tokens_per_second=tps,
            max_batch_size=self.config.max_batch_size,
            draft_tokens=self._drafted,
            accepted_draft_tokens=self._accepted,
            # Read without the worker's cooperation: two counters, at worst one step stale.
            prompt_cache_entries=len(self._prompt_cache),
            prompt_cache_bytes=self._prompt_cache.nbytes,
        )

    @property
    def healthy(self) -> bool:
        return self._ready.is_set() and self._dead is None and not self._stopping

    def abort(self, error: EngineError) -> None:
        """Fail every request now, from any thread (a cluster rank died: the worker may be
        blocked in a collective that never returns). The engine stays unhealthy."""
        with self._lock:
            if self._dead is None:
                self._dead = error
            self._stopping = True
            states = list(self._by_id.values())
            self._by_id.clear()
            self._incoming.clear()
            self._wake.notify()
        for s in states:
            s.done = True
            s.pending.append(Failed(error))
        self._deliver(states)

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ----- worker thread --------------------------------------------------------------------

    def _new_generator(self) -> BatchGenerator:
        cfg = self.config
        generator = BatchGenerator(
            self.loaded.model,
            max_tokens=cfg.default_max_tokens,
            stop_tokens=[[t] for t in self._eos],
            completion_batch_size=cfg.max_batch_size,
            # BatchGenerator decodes up to max(completion, prefill) at once; keep it to max_batch.
            prefill_batch_size=min(cfg.prefill_batch_size, cfg.max_batch_size),
            prefill_step_size=cfg.prefill_step_size,
        )
        # Speculation lives in the generation batch, which mlx-lm keeps for the generator's
        # life (it only extends and filters it); installed whenever the model allows it, as
        # requests may ask for speculation even when the server default is off.
        self._spec_batch = None
        if self._can_speculate:
            drafter = DraftModel(self._draft_model) if self._draft_model is not None else None
            self._spec_batch = SpeculativeBatch.create(
                self.loaded.model, generator.sampler, drafter, self.config.verify_position_cost
            )
            generator._generation_batch = self._spec_batch
        return generator

    def _run(self) -> None:
        generator = self._new_generator()
        self._ready.set()
        distributed = self.lockstep.distributed
        try:
            while True:
                if self._trim_due and not self._has_work():
                    self._trim_due = False
                    return_freed_memory()  # idle now: hand freed cache memory back
                with self._lock:
                    while not self._has_work():
                        self._wake.wait()
                    if self._stopping:
                        break
                    room = self.config.max_batch_size + min(
                        self.config.prefill_batch_size, self.config.max_batch_size
                    )
                    room -= len(self._live)
                    n = min(room, len(self._incoming))
                    if n and not self._admit_now(n):
                        n = 0
                    admit = [self._incoming.popleft() for _ in range(n)]
                    cancels, self._cancels = self._cancels, set()
                try:
                    commands = self._decide(admit, cancels)
                    commands = self.lockstep.share(commands)
                    self._step(generator, commands)
                except Exception as exc:
                    if distributed:  # the other ranks cannot follow a reset: stop the cluster
                        raise
                    # A bug, not bad input: log it, fail the requests in flight, keep serving.
                    log.exception("generation step failed; failing the requests in flight")
                    self._fail_active(EngineError("internal error during generation"))
                    self._live.clear()
                    self._deferred.clear()
                    generator = self._new_generator()
            if distributed and self._dead is None:
                self.lockstep.share(StepCommands(shutdown=True))
                self.lockstep.finish()
        except BaseException as exc:  # pragma: no cover - the worker must never die silently
            log.exception("engine worker died")
            if self._dead is None:
                self._dead = EngineStopped(f"the engine stopped: {exc.__class__.__name__}")
        finally:
            self._fail_everything(self._dead or EngineStopped("the server is shutting down"))
            # BatchGenerator leaves the next step queued with async_eval; finish it on this
            # thread, or a process that exits normally afterwards can abort ("terminate called
            # without an active exception").
            with contextlib.suppress(Exception):
                mx.synchronize()

    def _has_work(self) -> bool:
        return bool(
            self._stopping or self._incoming or self._cancels or self._live or self._deferred
        )

    def _admit_now(self, waiting: int) -> bool:
        """Whether to admit the waiting requests this step (lock held).

        Idle, or a full prefill batch waiting: at once. Otherwise the oldest may wait up to
        `admit_window_s` times the batch's occupancy, so arrivals share a prefill pass.
        """
        cfg = self.config
        if not self._live or waiting >= cfg.prefill_batch_size or cfg.admit_window_s <= 0:
            return True
        window = cfg.admit_window_s * len(self._live) / cfg.max_batch_size
        return time.perf_counter() - self._incoming[0].submitted >= window

    def run_follower(self) -> None:
        """Ranks > 0: apply rank 0's commands step by step until it shuts the cluster down."""
        generator = self._new_generator()
        self._ready.set()
        while True:
            commands = self.lockstep.share(None)
            if commands.shutdown:
                break
            self._step(generator, commands)
        self.lockstep.finish()

    def _decide(self, admit: list[_Request], cancels: set[str]) -> StepCommands:
        """Rank 0: turn this step's arrivals and cancellations into commands for every rank."""
        removes, self._deferred = self._deferred, []
        if cancels:
            with self._lock:
                states = [s for s in (self._by_id.get(i) for i in cancels) if s is not None]
                queued = [s for s in states if s in self._incoming]
                for s in queued:
                    self._incoming.remove(s)
            for s in states:
                if s.request.request_id in self._live:
                    removes.append(Remove(s.request.request_id, "cancelled"))
                self._finish(s, "cancelled")
            self._deliver(states)
        admits = []
        admitted: list[_Request] = []
        waiting: list[_Request] = []
        leaders = [s.prompt for s in self._by_uid.values() if s.prefilling]
        for state in admit:
            if state.done:
                continue
            if self._can_speculate and leaders and shared_with(state.prompt, leaders):
                waiting.append(state)  # its long prefix is being computed: reuse it soon
                continue
            if self._can_speculate and worth_caching(state.prompt):
                leaders.append(state.prompt)
            admitted.append(state)
            sampling = state.request.sampling
            if sampling.temperature > 0 and sampling.seed is None:
                # Every rank must draw the same tokens: fix the seed here, once.
                sampling = replace(sampling, seed=self._seeds.getrandbits(63))
            if sampling.speculate is None:  # every rank applies rank 0's choice
                sampling = replace(sampling, speculate=self.config.speculate != "off")
            cache, rest = self._prompt_cache.fetch_nearest_cache(self.model_id, state.prompt)
            state.fetched = (cache, rest)
            admits.append(
                Admit(state.request.request_id, state.prompt, state.max_tokens, sampling,
                      _cached_len(state.prompt, cache, rest))
            )
        if waiting:
            with self._lock:
                self._incoming.extendleft(reversed(waiting))
        self._admitting = {s.request.request_id: s for s in admitted}
        return StepCommands(admits, removes)

    def _step(self, generator: BatchGenerator, commands: StepCommands) -> None:
        touched: dict[int, _Request] = {}
        # Admits see the prompt cache as it was before this step's removes, on every rank.
        admits = [(cmd, self._claim(cmd)) for cmd in commands.admits]
        if commands.removes:
            self._apply_removes(generator, commands.removes)
        for cmd, state in admits:
            try:
                self._admit(generator, cmd, state)
            except LockstepError:
                raise
            except Exception as exc:  # this request's own setup failed (same on every rank)
                self._fail_request(state, exc)
            touched[id(state)] = state
        if self._live:
            self._trim_due = True
            prompt_responses, generation_responses = generator.next()
            self._on_prompt_progress(generator, prompt_responses, touched)
            self._on_tokens(generator, generation_responses, touched)
            self._on_faults(touched)
        if self.lockstep.rank == 0:
            self._deliver(touched.values())

    def _claim(self, cmd: Admit) -> _Request:
        if self.lockstep.rank == 0:
            return self._admitting.pop(cmd.request_id)
        state = _Request(
            GenerationRequest(cmd.request_id, sampling=cmd.sampling), _NO_SINK, cmd.prompt,
            cmd.max_tokens, time.perf_counter(),
        )
        state.fetched = self._prompt_cache.fetch_nearest_cache(self.model_id, cmd.prompt)
        return state

    def _admit(self, generator: BatchGenerator, cmd: Admit, state: _Request) -> None:
        prompt = state.prompt
        (cache, rest), state.fetched = state.fetched, None
        cached = _cached_len(prompt, cache, rest)
        if cached != cmd.cached:
            raise LockstepError(
                f"rank {self.lockstep.rank} found {cached} cached prompt tokens for "
                f"{cmd.request_id}, rank 0 found {cmd.cached}"
            )
        if cache is not None and not rest:
            # An exact hit leaves nothing to feed; recompute the last token to get logits.
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
            else:
                cache, rest = None, prompt
        cached = len(prompt) - len(rest)
        sampling = cmd.sampling

        def on_fault(exc: Exception) -> None:
            if state.fault is None:
                state.fault = exc

        processors = make_processors(sampling, on_fault, self._tokenizer)
        (uid,) = generator.insert(
            [rest],
            max_tokens=[cmd.max_tokens],
            caches=[cache],
            all_tokens=[prompt[:cached]],
            samplers=[make_sampler(sampling, on_fault)],
            logits_processors=[processors],
            stop_sequences=[self._no_stops if sampling.ignore_eos else self._eos_stops],
        )
        # A processor with state (e.g. constrained decoding) cannot see draft tokens that may
        # be rejected: such a request does not speculate.
        if (
            sampling.speculate and self._spec_batch is not None
            and all(getattr(p, "stateless", False) for p in processors)
        ):
            state.spec = self._spec_batch.enable(uid)
        state.uid = uid
        # Only a prompt that computes a long part of its own is shared while it runs: one
        # that came mostly from the prompt cache adds little to it, and each copy costs
        # memory (~75 MB for 1,600 tokens of SmolLM2 in float32).
        state.prefilling = self._can_speculate and worth_caching(rest)
        state.admitted = time.perf_counter()
        state.cached_tokens = cached
        self._by_uid[uid] = state
        self._live[cmd.request_id] = uid
        if self.lockstep.rank == 0:
            state.detokenizer = self._tokenizer.detokenizer
            state.stops = StopStringMatcher(sampling.stop)
            state.pending.append(Started(self.model_id, len(prompt), cached))

    def _apply_removes(self, generator: BatchGenerator, removes: list[Remove]) -> None:
        keep: list[int] = []  # stopped by a stop string: their cache is worth keeping
        drop: list[int] = []
        for r in removes:
            uid = self._live.pop(r.request_id, None)
            if uid is None:
                continue
            self._by_uid.pop(uid, None)
            (keep if r.reason == "stop" else drop).append(uid)
        if drop:
            generator.remove(drop)
        if keep:
            caches = generator.remove(keep, return_prompt_caches=True)
            for uid in keep:
                cache, tokens = caches.get(uid, (None, None))
                self._remember_cache(tokens, cache)

    def _on_prompt_progress(
        self, generator: BatchGenerator, responses: Sequence[Any], touched: dict[int, _Request]
    ) -> None:
        for r in responses:
            state = self._by_uid.get(r.uid)
            if state is not None and r.end_of_prompt and state.prefilling:
                # Share the freshly computed prompt with later arrivals now (every rank does
                # the same, so prompt caches stay identical across a cluster).
                state.prefilling = False
                cache, tokens = generator.extract_cache([r.uid]).get(r.uid, (None, None))
                if tokens is not None and len(tokens) == len(state.prompt):
                    self._remember_cache(tokens, cache)
            processed, total = r.progress
            # One-chunk prompts finish before a progress report would be useful.
            if state is None or total <= self.config.prefill_step_size or r.end_of_prompt:
                continue
            state.pending.append(PromptProgress(int(processed), int(total)))
            touched[id(state)] = state

    def _on_tokens(
        self, generator: BatchGenerator, responses: Sequence[Any], touched: dict[int, _Request]
    ) -> None:
        now = time.perf_counter()
        leader = self.lockstep.rank == 0
        for r in responses:
            state = self._by_uid.get(r.uid)
            if state is None:
                continue
            if r.finish_reason is not None:  # the generator already dropped it, on every rank
                self._live.pop(state.request.request_id, None)
                self._by_uid.pop(r.uid, None)
                self._remember_cache(r.all_tokens, r.prompt_cache)
            if not leader or state.done or state.fault is not None:
                continue
            touched[id(state)] = state
            if not state.first_token:
                state.first_token = now
            detok = state.detokenizer
            ids: list[int] = []
            if r.finish_reason == "stop":
                detok.finalize()  # the end-of-sequence token itself is not output
            else:
                detok.add_token(r.token)
                ids.append(r.token)
                state.completion_tokens += 1
                if r.finish_reason is not None:
                    detok.finalize()
            text, matched = state.stops.feed(detok.last_segment)
            if r.finish_reason is not None and not matched:
                text += state.stops.flush()
            if text or ids:
                top = state.request.sampling.logprobs
                lps = None if top is None else [
                    token_logprob(self._tokenizer, i, r.logprobs, top) for i in ids
                ]
                state.pending.append(TokenDelta(text, ids, lps))
            if r.finish_reason is not None:
                self._finish(state, "stop" if matched else r.finish_reason)
            elif matched:
                # Done for the client now; out of the batch at the start of the next step, on
                # every rank (only rank 0 detokenizes, so only it can see stop strings).
                self._finish(state, "stop")
                self._deferred.append(Remove(state.request.request_id, "stop"))
        self._generated_tokens += len(responses)
        self._recent.append((now, len(responses)))
        while self._recent and now - self._recent[0][0] > 5.0:
            self._recent.popleft()

    def _on_faults(self, touched: dict[int, _Request]) -> None:
        """Fail the requests whose own sampler or processor raised in this step, and only them.

        The guard gave the batch a harmless token for them, so the step completed for
        everyone; every rank saw the same fault, and rank 0 removes them at the next step.
        """
        for state in list(self._by_uid.values()):
            if state.fault is None or state.done:
                continue
            rid = state.request.request_id
            if self.lockstep.rank == 0:
                if rid in self._live:
                    self._deferred.append(Remove(rid, "cancelled"))
                self._fail_request(state, state.fault)
                touched[id(state)] = state
            else:
                state.done = True

    def _fail_request(self, state: _Request, exc: Exception) -> None:
        """End one request with an error that names its own cause; the batch carries on."""
        log.warning(
            "request %s failed in its sampler: %s: %s",
            state.request.request_id, exc.__class__.__name__, exc,
        )
        state.done = True
        with self._lock:
            self._by_id.pop(state.request.request_id, None)
        state.pending.append(
            Failed(InvalidRequest(f"this request's sampling parameters failed: {exc}"))
        )

    def _remember_cache(self, tokens: list[int] | None, cache: Any) -> None:
        if tokens and cache is not None:
            # A cache extracted from the batch is a lazy copy that keeps the whole batch's
            # keys and values alive until it is computed: compute it now, or every entry pins
            # a batch-sized buffer (measured: +530 MB per four 1,600-token chats of SmolLM2).
            mx.eval([c.state for c in cache])
            self._prompt_cache.insert_cache(self.model_id, list(tokens), cache)

    def _finish(self, state: _Request, reason: FinishReason) -> None:
        now = time.perf_counter()
        state.done = True
        with self._lock:
            self._by_id.pop(state.request.request_id, None)
        first = state.first_token or now
        decode_s = now - first
        prefill_s = first - state.admitted if state.admitted else 0.0
        computed = len(state.prompt) - state.cached_tokens
        if state.spec is not None:
            self._drafted += state.spec.drafted
            self._accepted += state.spec.accepted
        state.pending.append(
            Completed(
                finish_reason=reason,
                prompt_tokens=len(state.prompt),
                completion_tokens=state.completion_tokens,
                cached_tokens=state.cached_tokens,
                time_to_first_token_ms=(first - state.submitted) * 1000 if state.first_token else 0.0,
                total_ms=(now - state.submitted) * 1000,
                tokens_per_second=(state.completion_tokens - 1) / decode_s
                if decode_s > 0 and state.completion_tokens > 1
                else 0.0,
                prompt_tokens_per_second=computed / prefill_s if prefill_s > 0 else 0.0,
                queued_ms=((state.admitted or now) - state.submitted) * 1000,
                **spec_timings(state.spec),
            )
        )

    def _deliver(self, states: Any) -> None:
        for state in states:
            if state.pending:
                events, state.pending = state.pending, []
                state.sink.deliver(events)
        for listener in self._step_listeners:
            listener()

    def _fail_active(self, error: EngineError) -> None:
        states = [s for s in self._by_uid.values() if not s.done]
        self._by_uid.clear()
        with self._lock:
            for s in states:
                self._by_id.pop(s.request.request_id, None)
        for s in states:
            s.pending.append(Failed(error))
        self._deliver(states)

    def _fail_everything(self, error: EngineError) -> None:
        with self._lock:
            self._stopping = True
            states = list(self._by_id.values())
            self._by_id.clear()
            self._incoming.clear()
        self._by_uid.clear()
        for s in states:
            s.done = True
            s.pending.append(Failed(error))
        self._deliver(states)


def _cached_len(prompt: list[int], cache: Any, rest: list[int]) -> int:
    return 0 if cache is None else len(prompt) - len(rest)


def _with_id(request: GenerationRequest, request_id: str) -> GenerationRequest:
    return replace(request, request_id=request_id)
