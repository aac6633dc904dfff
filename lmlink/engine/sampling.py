"""Per-request samplers and logits processors, seeded so a seed reproduces its tokens."""

from __future__ import annotations

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

Sampler = Callable[[mx.array], mx.array]


def make_sampler(opts: SamplingOptions) -> Sampler:
    """Greedy requests share one sampler object, which lets the batch sample them together.

    Random sampling uses a key owned by the request, so its tokens depend only on its seed,
    not on what else happens to be in the batch.
    """
    if opts.temperature == 0:
        return greedy_sampler
    seed = opts.seed if opts.seed is not None else int.from_bytes(os.urandom(8), "little")
    key = mx.random.key(seed % (1 << 64))
    inv_temp = 1.0 / opts.temperature
    top_p, top_k, min_p = opts.top_p, opts.top_k, opts.min_p

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0:
            logprobs = apply_min_p(logprobs, min_p, 1)
        if top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sample


def make_processors(
    opts: SamplingOptions, tokenizer: Any = None
) -> list[Callable[[mx.array, mx.array], mx.array]]:
    """Repetition penalty, then the output constraint (its mask must be applied last)."""
    procs: list[Callable[[mx.array, mx.array], mx.array]] = []
    if opts.repetition_penalty is not None and opts.repetition_penalty != 1.0:
        procs += make_logits_processors(repetition_penalty=opts.repetition_penalty)
    if opts.grammar is not None:
        procs += make_grammar_processor(opts.grammar, tokenizer)
    return procs
