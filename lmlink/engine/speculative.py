"""Speculative decoding inside continuous batching: drafts verified in one batched pass.

Drafts come from prompt lookup (below) or, with `DraftModel`, from a small second model.

Why it pays: a decode step reads every weight once to produce one token per stream; feeding
a stream's pending token plus k guessed tokens costs nearly the same read and can yield up to
k + 1 tokens. The guesses here come from the stream's own text (prompt lookup: the longest
recent n-gram that ends the sequence is looked up earlier in prompt + output, and what
followed it is proposed), so edits, code and answers quoting their input accept many.

How the output stays identical to plain decoding: every position of the verify pass is
sampled exactly as plain decoding would sample it there (the same processors over the same
context, the same sampler; a seeded sampler uses the same key split for the n-th token, see
`sampling.SeededSampler.draw_ahead`). A draft token is kept only while it equals what was
sampled, so the accepted tokens plus the first sampled token after them are the tokens plain
decoding produces. Rejected positions are removed from the KV cache per row (trim the
common part, right-align the rest as left padding, the way mlx-lm finalizes right-padded
prompts).

Cluster lockstep: drafts, verify widths and acceptance estimates are computed from the
batch's own token history, which every rank holds identically, so ranks take the same
decisions without any extra message.

`SpeculativeBatch` replaces BatchGenerator's generation batch (one object for the life of the
generator: mlx-lm only ever extends and filters it); steps with nothing to verify run the
normal pipelined mlx-lm step.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import BatchKVCache, dynamic_roll

from .sampling import can_draw_ahead, commit, draw_ahead

MODES = ("off", "prompt-lookup", "draft-model")
NGRAM_MAX = 4  # longest suffix looked up (longer matches are tried first)
# An edit or a quote copies its source in order: after a draft copied from position p, the
# next match is looked for within NEAR tokens of where that copy left off before falling back
# to the latest occurrence (which, for a 1-token suffix, is usually an unrelated one).
NEAR = 8
K_MAX = 9  # drafts per stream per step
# The cost of one more position in a forward pass, relative to the pass itself. Decode reads
# every weight once per pass, whatever the number of positions, and then spends a little
# compute per position: on SmolLM2-135M (2-core Xeon VM, OpenBLAS 1 thread) a one-position pass
# takes 104 ms, 2 positions 114-117, 8 positions 130, 24 positions 176, 32 positions 202,
# i.e. +9 % for leaving matrix-vector products (PASS_JUMP) and ~0.03 of a pass per position.
# On a GPU a position is cheaper still, in a mixture-of-experts model dearer (its own experts):
# `--verify-position-cost` sets it. The verify width is chosen each step to maximise expected
# tokens per unit of this cost (see `choose_width`).
POSITION_COST = 0.03
# A pass over more than one position runs matrix-matrix products, which cost more per weight
# read than the matrix-vector products of a lone stream's decode step (+9 % here).
PASS_JUMP = 0.09
# With several rows, a verify pass costs more than its positions: rows keeping different
# numbers of positions are re-aligned by moving their cached keys and values, and each row
# is sampled on its own. Per row and cached position, relative to a pass: 8 rows of ~80
# cached positions spent ~80 ms beyond their 157 ms forward pass on the machine above. It is
# what makes verifying rarely worth it for a full batch on a CPU, unless most rows copy.
CUT_COST = 0.001
RATE_PRIOR = 0.5  # a new stream's assumed chance that a draft token is accepted
RATE_MEMORY = 0.7  # weight of the old estimate in each update (recent steps matter most)
RATE_RECOVERY = 0.05  # drift toward the prior per step a draft is not verified


@dataclass
class SpecStats:
    """Per-request counters, read by the engine for the `Completed` event."""

    drafted: int = 0  # draft tokens proposed and verified
    accepted: int = 0  # of those, kept
    steps: int = 0  # forward passes that produced tokens for this request
    tokens: int = 0  # tokens emitted by those passes


@dataclass
class _Row:
    stats: SpecStats
    seq: list[int] = field(default_factory=list)  # tokens in the cache + the pending one
    index: dict[tuple[int, ...], list[int]] = field(default_factory=dict)  # n-gram -> ends
    indexed: int = 0  # n-grams ending before this position are in `index`
    # Estimated chance that a draft token is accepted, by the length of the suffix matched
    # (the longer the match, the likelier a copy): rates[n], 1 <= n <= NGRAM_MAX.
    rates: list[float] = field(default_factory=lambda: [RATE_PRIOR] * (NGRAM_MAX + 1))
    kind: int = 0  # the suffix length behind the last draft
    copied_from: int = -1  # where the last draft was copied from
    cursor: int = -1  # where that copy left off after verification

    def sync(self, committed: list[int], pending: int) -> None:
        """Bring `seq` up to committed + [pending] (it only ever grows at the end)."""
        n = len(self.seq)
        if n and n <= len(committed) + 1:
            self.seq[n - 1:] = committed[n - 1:] + [pending]
        else:
            self.seq = list(committed) + [pending]
            self.index.clear()
            self.indexed = 0
            self.cursor = -1

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed an earlier occurrence of the text just written.

        In order: the longest 2-4-token suffix found (the occurrence nearest where the last
        copy left off, else the latest); the same for the suffix before the last token (an
        edit that inserted one token, such as a comma, then goes on copying); a 1-token
        suffix (weak evidence, verified only while this stream's drafts keep being accepted).
        """
        seq = self.seq
        end = len(seq)
        for e in range(max(self.indexed, 1), end):  # index the n-grams ending before `end`
            for n in range(1, min(NGRAM_MAX, e) + 1):
                self.index.setdefault(tuple(seq[e - n:e]), []).append(e)
        self.indexed = max(self.indexed, end)
        found = self._lookup(end, 2) or self._lookup(end - 1, 2) or self._lookup(end, 1)
        at, self.kind = found or (-1, 0)
        self.copied_from = at
        return [] if at < 0 else seq[at:at + limit]

    @property
    def rate(self) -> float:
        return self.rates[self.kind]

    def _lookup(self, upto: int, shortest: int) -> tuple[int, int] | None:
        """(where the continuation of an earlier occurrence of seq[upto-n:upto] starts, n)."""
        for n in range(min(NGRAM_MAX, upto - 1), shortest - 1, -1):
            ends = self.index.get(tuple(self.seq[upto - n:upto]))
            if ends and ends[0] < upto:
                return _nearest(ends, upto, self.cursor), n
        return None

    def skipped(self) -> None:
        """The draft was not verified: drift its estimate back toward the prior, so a kind of
        match that stopped paying is tried again now and then."""
        self.rates[self.kind] += RATE_RECOVERY * (RATE_PRIOR - self.rates[self.kind])

    def record(self, drafted: int, accepted: int) -> None:
        """Update the acceptance estimate and the copy cursor after a verify pass."""
        if not drafted:
            return
        # Each draft token is accepted with chance `rate` until the first rejection.
        observed = accepted / (accepted + (accepted < drafted))
        self.rates[self.kind] = RATE_MEMORY * self.rate + (1 - RATE_MEMORY) * observed
        if self.copied_from >= 0:  # the source position of the next pending token
            self.cursor = self.copied_from + accepted


def _nearest(ends: list[int], upto: int, cursor: int) -> int:
    """Of the ends before `upto`, the one closest to `cursor` if within NEAR of it, else the
    latest."""
    last = bisect.bisect_left(ends, upto)  # ends[:last] are earlier occurrences
    if cursor >= 0:
        i = bisect.bisect_left(ends, cursor, 0, last)
        near = [e for e in ends[max(0, i - 1):min(i + 1, last)] if abs(e - cursor) <= NEAR]
        if near:
            return min(near, key=lambda e: abs(e - cursor))
    return ends[last - 1]


def pass_cost(positions: int, cost: float = POSITION_COST) -> float:
    """A forward pass over `positions` positions, relative to a one-position pass."""
    return 1.0 if positions <= 1 else 1.0 + PASS_JUMP + cost * (positions - 1)


def choose_width(
    lengths: list[int], rates: list[float], cached: int = 0, cost: float = POSITION_COST
) -> int:
    """Positions per row (1 + drafts) that maximise expected tokens per unit of pass cost.

    Every row pays for the full width (shorter drafts are padded) and a row's j-th draft
    token is emitted with chance rate**j; with several rows, re-aligning their caches
    (`cached` positions each) afterwards costs CUT_COST per row and position. A lone
    stream verifies all of its draft or none: once it pays for a matrix product, more
    positions cost little, and acceptance comes in runs (copying) more than one rate says.
    """
    rows = len(lengths)
    widths = range(2, max(lengths, default=0) + 2)
    if rows == 1:
        widths = range(lengths[0] + 1, lengths[0] + 2) if lengths[0] else range(0)
    best_w, best = 1, rows / pass_cost(rows, cost)
    cut = CUT_COST * rows * cached if rows > 1 else 0.0
    for w in widths:
        expected = rows + sum(
            sum(r ** j for j in range(1, min(n, w - 1) + 1)) for n, r in zip(lengths, rates)
        )
        value = expected / (pass_cost(rows * w, cost) + cut)
        if value > best:
            best_w, best = w, value
    return best_w


class DraftModel:
    """Drafts from a small model with the same vocabulary, run greedily on its own cache.

    One unbatched cache per request: speculation pays mostly at small batch sizes (see
    `choose_width`), and a per-request cache rolls back by a plain trim to the longest
    prefix it shares with the request's real tokens. Every rank of a cluster would compute the same
    drafts from the same tokens, but only single-process serving offers it for now.
    """

    def __init__(self, model: Any, prefill_step: int = 512) -> None:
        self.model = model
        self.prefill_step = prefill_step
        self._state: dict[int, tuple[list[Any], list[int]]] = {}  # uid -> (cache, tokens in it)

    def drop(self, uid: int) -> None:
        self._state.pop(uid, None)

    def draft(self, uid: int, seq: list[int], limit: int) -> list[int]:
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

        if limit < 1:
            return []
        cache, toks = self._state.get(uid) or (make_prompt_cache(self.model), [])
        keep = _common_prefix(toks, seq)
        keep = min(keep, len(seq) - 1)  # the last token must be fed to get the next logits
        if len(toks) > keep:
            trim_prompt_cache(cache, len(toks) - keep)
        feed = seq[keep:]
        while len(feed) > self.prefill_step:  # long prompts: in chunks, like a prefill
            self.model(mx.array(feed[: self.prefill_step])[None], cache=cache)
            mx.eval([c.state for c in cache])
            feed = feed[self.prefill_step:]
        logits = self.model(mx.array(feed)[None], cache=cache)
        toks = list(seq)
        out: list[int] = []
        y = mx.argmax(logits[0, -1], axis=-1)
        while True:
            token = int(y.item())
            out.append(token)
            if len(out) == limit:
                break
            logits = self.model(mx.array([[token]]), cache=cache)
            toks.append(token)
            y = mx.argmax(logits[0, -1], axis=-1)
        self._state[uid] = (cache, toks)
        return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def speculation_possible(model: Any) -> bool:
    """Rejected drafts are cut out of the cache by trimming: every layer's cache must allow it."""
    from mlx_lm.models.cache import make_prompt_cache

    return all(type(c).__name__ == "KVCache" for c in make_prompt_cache(model))


class SpeculativeBatch(GenerationBatch):
    """mlx-lm's generation batch, plus a verify step for rows that have drafts."""

    @classmethod
    def create(
        cls, model: Any, fallback_sampler: Any, drafter: "DraftModel | None" = None,
        position_cost: float = POSITION_COST,
    ) -> "SpeculativeBatch":
        """`drafter`: a small model proposing the drafts; None = prompt lookup.
        `position_cost`: one more position's cost relative to a pass (see POSITION_COST)."""
        batch = cls.empty(model, fallback_sampler)
        batch.rows = {}
        batch.drafter = drafter
        batch.position_cost = position_cost
        return batch

    def enable(self, uid: int) -> SpecStats:
        """Speculate for this request (its processors must be stateless); returns its counters."""
        row = _Row(SpecStats())
        self.rows[uid] = row
        return row.stats

    def filter(self, keep: list[int]) -> None:
        gone = set(self.uids) - {self.uids[i] for i in keep}
        super().filter(keep)
        for uid in gone:
            self.rows.pop(uid, None)
            if self.drafter is not None:
                self.drafter.drop(uid)

    # ----- one step -------------------------------------------------------------------------

    def next(self) -> list[Any]:
        if not self.uids:
            return []
        plan = self._plan() if self.rows else None
        if plan is None:
            for uid in self.uids:
                row = self.rows.get(uid)
                if row is not None:
                    row.stats.steps += 1
                    row.stats.tokens += 1
            return super().next()
        return self._verify(*plan)

    def _plan(self) -> tuple[list[int], list[list[int]]] | None:
        """Each row's pending token and drafts, or None when verifying would not pay."""
        if not all(isinstance(c, BatchKVCache) for c in self.prompt_cache):
            return None
        # A stream's first token is already known when it joins: a plain step hands it out
        # at once (computing the next one meanwhile) where a verify pass would hold it back.
        if 0 in self._num_tokens:
            return None
        candidates: list[tuple[int, _Row, int]] = []  # (batch index, row, most drafts)
        for i, uid in enumerate(self.uids):
            row = self.rows.get(uid)
            sampler = self.samplers[i] if self.samplers else None
            # Room: the pending token and every accepted draft count toward max_tokens.
            room = self.max_tokens[i] - self._num_tokens[i] - 1
            if row is not None and room > 0 and can_draw_ahead(sampler or self.fallback_sampler):
                candidates.append((i, row, min(K_MAX, room)))
        B = len(self.uids)
        lengths, rates = [0] * B, [0.0] * B
        for i, row, most in candidates:
            lengths[i], rates[i] = most, max(row.rates)
        # The cache length from the token history, which every rank holds identically.
        cached = max((len(t) for t in self.tokens), default=0)
        # Even full-length drafts would not pay: skip before waiting for the pending tokens
        # (reading them ends mlx-lm's overlap of this step's Python with the last compute).
        if choose_width(lengths, rates, cached, self.position_cost) == 1:
            return None
        pending = self._next_tokens.tolist()
        drafts: list[list[int]] = [[] for _ in range(B)]
        for i, row, most in candidates:
            row.sync(self.tokens[i], pending[i])
            if self.drafter is None:
                drafts[i] = row.draft(most)
            lengths[i] = len(drafts[i]) if self.drafter is None else most
            rates[i] = row.rate
        width = choose_width(lengths, rates, cached, self.position_cost)
        for i, row, _ in candidates:
            if width == 1:
                row.skipped()
            elif self.drafter is not None:  # a draft model drafts only what will be verified
                drafts[i] = self.drafter.draft(self.uids[i], row.seq, width - 1)
            else:
                drafts[i] = drafts[i][: width - 1]
        if width == 1 or not any(drafts):
            return None
        return pending, drafts

    def _verify(self, pending: list[int], drafts: list[list[int]]) -> list[Any]:
        B = len(self.uids)
        width = 1 + max(len(d) for d in drafts)
        rows_in = [[p, *d] + [0] * (width - 1 - len(d)) for p, d in zip(pending, drafts)]
        inputs = mx.array(rows_in, dtype=mx.uint32)
        logits = self.model(inputs, cache=self.prompt_cache)  # (B, width, V)

        lp_rows: list[mx.array] = []
        sampled: list[mx.array] = []
        samplers = self.samplers or [None] * B
        for i in range(B):
            n_pos = 1 + len(drafts[i])
            row_logits = logits[i, :n_pos]
            processors = self.logits_processors[i] if self.logits_processors else ()
            if processors:
                committed = self._token_context[i].tokens
                outs = []
                for j in range(n_pos):
                    context = mx.concatenate([committed, inputs[i, : j + 1].astype(mx.int32)])
                    x = row_logits[j : j + 1]
                    for proc in processors:
                        x = proc(context, x)
                    outs.append(x)
                row_logits = mx.concatenate(outs, axis=0)
            lp = row_logits - mx.logsumexp(row_logits, axis=-1, keepdims=True)
            lp_rows.append(lp)
            sampler = samplers[i] or self.fallback_sampler
            if drafts[i]:
                sampled.append(draw_ahead(sampler, lp))
            else:
                sampled.append(sampler(lp[0:1]).reshape(1))
        mx.eval(sampled, lp_rows)
        sampled_ids = [s.tolist() for s in sampled]

        responses: list[Any] = []
        keep: list[int] = []
        next_tokens: list[int] = []
        next_logprobs: list[mx.array] = []
        drop = []  # cache positions to discard per row, out of `width`
        for i in range(B):
            d, s = drafts[i], sampled_ids[i]
            n = 0
            while n < len(d) and s[n] == d[n]:
                n += 1
            if d:
                commit(samplers[i] or self.fallback_sampler, n + 1)
            emitted = [pending[i], *d[:n]]
            logprobs = [self._next_logprobs[i], *(lp_rows[i][j] for j in range(n))]
            finish = None
            kept = 0
            for tok in emitted:
                kept += 1
                self._num_tokens[i] += 1
                if self._num_tokens[i] >= self.max_tokens[i]:
                    finish = "length"
                if self._matchers[i].advance(tok):
                    finish = "stop"
                if finish is not None:
                    break
            emitted, logprobs = emitted[:kept], logprobs[:kept]
            drop.append(width - kept)
            self.tokens[i].extend(emitted)
            if self.logits_processors and self.logits_processors[i]:
                self._token_context[i].update_and_fetch(mx.array(emitted, dtype=mx.int32))
            row = self.rows.get(self.uids[i])
            if row is not None:
                row.stats.steps += 1
                row.stats.tokens += kept
                if d:
                    row.stats.drafted += len(d)
                    row.stats.accepted += min(n, kept - 1)
                    row.record(len(d), n)
            next_tokens.append(s[n])
            next_logprobs.append(lp_rows[i][n])
            responses.append((i, emitted, logprobs, finish))
            if finish is None:
                keep.append(i)

        self._cut(drop)
        self._next_tokens = mx.array(next_tokens, dtype=mx.uint32)
        self._next_logprobs = next_logprobs

        out = []
        for i, emitted, logprobs, finish in responses:
            for j, (tok, lp) in enumerate(zip(emitted, logprobs)):
                last = j == len(emitted) - 1
                done = finish if last else None
                out.append(
                    self.Response(
                        uid=self.uids[i],
                        token=tok,
                        logprobs=lp,
                        finish_reason=done,
                        prompt_cache=self.extract_cache(i) if done else None,
                        all_tokens=self.tokens[i] if done else None,
                    )
                )
        if len(keep) < B:
            self.filter(keep)
        return out

    def _cut(self, drop: list[int]) -> None:
        """Remove each row's last `drop[i]` cache positions (rejected drafts and padding).

        The part every row drops is trimmed; rows that drop more are shifted right by the
        difference (more left padding), moving only the used part of the cache: its
        preallocated tail can be several times longer (see `CUT_COST`).
        """
        common = min(drop)
        extra = [d - common for d in drop]
        shifts = mx.array(extra)[:, None] if any(extra) else None
        for c in self.prompt_cache:
            if common:
                c.trim(common)
            if shifts is not None:
                used = c._idx
                c.keys[..., :used, :] = dynamic_roll(c.keys[..., :used, :], shifts, axis=2)
                c.values[..., :used, :] = dynamic_roll(c.values[..., :used, :], shifts, axis=2)
                c.offset = c.offset - shifts[:, 0]
                c.left_padding = c.left_padding + shifts[:, 0]


def spec_timings(spec: SpecStats | None) -> dict[str, Any]:
    """The `Completed` fields for a request's speculation (none if it did not speculate)."""
    if spec is None or not spec.steps:
        return {}
    return {
        "draft_tokens": spec.drafted,
        "accepted_draft_tokens": spec.accepted,
        "draft_acceptance_rate": spec.accepted / spec.drafted if spec.drafted else 0.0,
        "tokens_per_step": spec.tokens / spec.steps,
    }


def load_draft_model(path: str | None, vocab: int | None, distributed: bool) -> Any:
    """The draft model for `--speculate draft-model`, checked against the served model."""
    from .loader import load_model
    from .sampling import vocab_size
    from .types import InvalidRequest

    if distributed:
        raise InvalidRequest("draft-model speculation is not available in a cluster")
    if not path:
        raise InvalidRequest("--speculate draft-model needs --draft-model PATH")
    draft = load_model(path)
    size = vocab_size(draft.model, draft.tokenizer)
    if size != vocab:
        raise InvalidRequest(
            f"the draft model's vocabulary ({size} tokens) differs from the served model's "
            f"({vocab} tokens)"
        )
    return draft.model
