"""Per-request samplers and logits processors, seeded so a seed reproduces its tokens.

Two needs shape this module. Speculative decoding samples several positions of one request
in a single step and keeps only some of them, so a random sampler must be able to draw ahead
without committing its key (`draw_ahead` / `commit`): the tokens then depend only on the seed
and the position, exactly as without speculation. And one request's bad sampler must not stop
the shared batch step, so samplers and processors run behind a guard that records the fault
for the engine (which then fails that request alone) and returns a harmless result.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
)

from .constrained import make_grammar_processor
from .types import SamplingOptions

log = logging.getLogger("lmlink.engine")

Sampler = Callable[[mx.array], mx.array]
Processor = Callable[[mx.array, mx.array], mx.array]
FaultHandler = Callable[[Exception], None]


class SeededSampler:
    """Temperature / top-p / min-p / top-k sampling with a key owned by the request.

    Its tokens depend only on its seed, not on what else happens to be in the batch, and
    the n-th token it samples always uses the n-th split of its key.
    """

    def __init__(self, opts: SamplingOptions, seed: int) -> None:
        self.key = mx.random.key(seed % (1 << 64))
        self.inv_temp = 1.0 / opts.temperature
        self.top_p, self.top_k, self.min_p = opts.top_p, opts.top_k, opts.min_p
        self._ahead: list[mx.array] = []

    def _draw(self, logprobs: mx.array, sub: mx.array) -> mx.array:
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p > 0:
            logprobs = apply_min_p(logprobs, self.min_p, 1)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return mx.random.categorical(logprobs * self.inv_temp, key=sub)

    def __call__(self, logprobs: mx.array) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return self._draw(logprobs, sub)

    def draw_ahead(self, logprobs: mx.array) -> mx.array:
        """Sample each row of `logprobs` (L, V) as the next L tokens; nothing is committed."""
        key, keys, out = self.key, [], []
        for j in range(logprobs.shape[0]):
            key, sub = mx.random.split(key)
            out.append(self._draw(logprobs[j : j + 1], sub))
            keys.append(key)
        self._ahead = keys
        return mx.concatenate(out, axis=0)

    def commit(self, n: int) -> None:
        """Keep the first `n` tokens of the last `draw_ahead` as sampled."""
        if n > 0:
            self.key = self._ahead[n - 1]
        self._ahead = []


class GuardedSampler:
    """Runs a request's sampler; if it raises, reports the fault and picks the argmax."""

    def __init__(self, inner: SeededSampler, on_fault: FaultHandler) -> None:
        self.inner = inner
        self.on_fault = on_fault

    def __call__(self, logprobs: mx.array) -> mx.array:
        try:
            return self.inner(logprobs)
        except Exception as exc:  # noqa: BLE001 - the request fails, not the batch
            self.on_fault(exc)
            return mx.argmax(logprobs, axis=-1)

    def draw_ahead(self, logprobs: mx.array) -> mx.array:
        try:
            return self.inner.draw_ahead(logprobs)
        except Exception as exc:  # noqa: BLE001
            self.on_fault(exc)
            return mx.argmax(logprobs, axis=-1)

    def commit(self, n: int) -> None:
        self.inner.commit(n)


def make_sampler(opts: SamplingOptions, on_fault: FaultHandler | None = None) -> Sampler:
    """Greedy requests share one sampler object, which lets the batch sample them together."""
    if opts.temperature == 0:
        return greedy_sampler
    seed = opts.seed if opts.seed is not None else int.from_bytes(os.urandom(8), "little")
    sampler = SeededSampler(opts, seed)
    return GuardedSampler(sampler, on_fault) if on_fault is not None else sampler


def draw_ahead(sampler: Sampler, logprobs: mx.array) -> mx.array:
    """Sample L consecutive positions of one request (logprobs (L, V)) without committing."""
    if sampler is greedy_sampler:
        return mx.argmax(logprobs, axis=-1)
    ahead = getattr(sampler, "draw_ahead", None)
    if ahead is None:
        raise TypeError("this sampler cannot draw ahead")
    return ahead(logprobs)


def can_draw_ahead(sampler: Sampler) -> bool:
    return sampler is greedy_sampler or hasattr(sampler, "draw_ahead")


def commit(sampler: Sampler, n: int) -> None:
    fn = getattr(sampler, "commit", None)
    if fn is not None:
        fn(n)


def make_processors(
    opts: SamplingOptions, on_fault: FaultHandler | None = None, tokenizer: Any = None
) -> list[Processor]:
    """Repetition penalty, then the output constraint (its mask must be applied last; it is
    stateful, so it is not marked safe for draft tokens)."""
    procs: list[Processor] = []
    if opts.repetition_penalty is not None and opts.repetition_penalty != 1.0:
        procs += make_logits_processors(repetition_penalty=opts.repetition_penalty)
        if on_fault:
            procs = [guard_processor(p, on_fault) for p in procs]
    if opts.grammar is not None:
        procs += make_grammar_processor(opts.grammar, tokenizer)
    return procs


def guard_processor(processor: Processor, on_fault: FaultHandler) -> Processor:
    """A processor that reports its fault and leaves the logits unchanged instead of raising."""

    def guarded(tokens: mx.array, logits: mx.array) -> mx.array:
        try:
            return processor(tokens, logits)
        except Exception as exc:  # noqa: BLE001
            on_fault(exc)
            return logits

    guarded.stateless = True  # type: ignore[attr-defined]  # safe to apply to draft tokens
    return guarded


def vocab_size(model: object, tokenizer: object) -> int | None:
    """The width of the model's logits (what `top_k` is checked against), if it can be told."""
    size = getattr(getattr(model, "args", None), "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    try:
        return len(tokenizer.vocab) or None  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - unknown tokenizer shape: no bound
        return None
