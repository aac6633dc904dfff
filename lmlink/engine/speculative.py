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

Cluster lockstep: drafts, adaptive k and acceptance are computed from the batch's own token
history, which every rank holds identically, so ranks take the same decisions without any
extra message.

`SpeculativeBatch` replaces BatchGenerator's generation batch (one object for the life of the
generator: mlx-lm only ever extends and filters it); steps with nothing to verify run the
normal pipelined mlx-lm step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import BatchKVCache

from .sampling import can_draw_ahead, commit, draw_ahead

MODES = ("off", "prompt-lookup", "draft-model")
NGRAM_MAX = 4  # longest suffix looked up
NGRAM_MIN = 2  # shorter suffixes match too often by chance to be worth a verify slot
K_START = 4
K_MAX = 8
# Positions one verify pass may compute over the whole batch (pending tokens, drafts and the
# padding of rows with shorter drafts): a lone stream verifies up to 7 drafts, 2 streams 3
# each, 4 streams 1, 5 or more none. Decode on a CPU is compute-bound already at small batches
# (here, 8 streams of chat on SmolLM2-135M with 3 positions per stream: paired runs 0.86x and
# 1.04x of plain decoding, so no gain), where a GPU would still be bandwidth-bound.
VERIFY_POSITIONS = 8


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
    k: int = K_START
    seq: list[int] = field(default_factory=list)  # tokens in the cache + the pending one
    index: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> end position
    indexed: int = 0  # n-grams ending before this position are in `index`

    def sync(self, committed: list[int], pending: int) -> None:
        """Bring `seq` up to committed + [pending] (it only ever grows at the end)."""
        n = len(self.seq)
        if n and n <= len(committed) + 1:
            self.seq[n - 1:] = committed[n - 1:] + [pending]
        else:
            self.seq = list(committed) + [pending]
            self.index.clear()
            self.indexed = 0

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the suffix."""
        seq = self.seq
        end = len(seq)
        # Index the n-grams ending at every position before the current end.
        for e in range(max(self.indexed, NGRAM_MIN), end):
            for n in range(NGRAM_MIN, min(NGRAM_MAX, e) + 1):
                self.index[tuple(seq[e - n:e])] = e
        self.indexed = max(self.indexed, end)
        for n in range(min(NGRAM_MAX, end - 1), NGRAM_MIN - 1, -1):
            at = self.index.get(tuple(seq[end - n:]))
            if at is not None and at < end:
                return seq[at:at + limit]
        return []

    def adapt(self, drafted: int, accepted: int) -> None:
        if drafted and accepted == drafted:
            self.k = min(K_MAX, self.k + 2)
        elif drafted:
            self.k = max(1, accepted + 1)


class DraftModel:
    """Drafts from a small model with the same vocabulary, run greedily on its own cache.

    One unbatched cache per request: speculation only runs at small batch sizes (the verify
    budget), and a per-request cache rolls back by a plain trim to the longest prefix it
    shares with the request's real tokens. Every rank of a cluster would compute the same
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
        cls, model: Any, fallback_sampler: Any, drafter: "DraftModel | None" = None
    ) -> "SpeculativeBatch":
        """`drafter`: a small model proposing the drafts; None = prompt lookup."""
        batch = cls.empty(model, fallback_sampler)
        batch.rows = {}
        batch.drafter = drafter
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
        """Each row's pending token and drafts, or None when no row has a draft."""
        if not all(isinstance(c, BatchKVCache) for c in self.prompt_cache):
            return None
        limit = min(K_MAX, VERIFY_POSITIONS // len(self.uids) - 1)
        if limit < 1:
            return None
        pending = self._next_tokens.tolist()
        drafts: list[list[int]] = []
        for i, uid in enumerate(self.uids):
            row = self.rows.get(uid)
            sampler = self.samplers[i] if self.samplers else None
            # Room: the pending token and every accepted draft count toward max_tokens.
            room = self.max_tokens[i] - self._num_tokens[i] - 1
            if row is None or room <= 0 or not can_draw_ahead(sampler or self.fallback_sampler):
                drafts.append([])
                continue
            row.sync(self.tokens[i], pending[i])
            n = min(row.k, room, limit)
            if self.drafter is not None:
                drafts.append(self.drafter.draft(uid, row.seq, n))
            else:
                drafts.append(row.draft(n))
        if not any(drafts):
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
                    row.adapt(len(d), n)
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
        """Remove each row's last `drop[i]` cache positions (rejected drafts and padding)."""
        common = min(drop)
        extra = [d - common for d in drop]
        for c in self.prompt_cache:
            if common:
                c.trim(common)
            if any(extra):
                c._right_padding = mx.array(extra)
                c.finalize()


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
