"""Per-token log-probabilities (and the top alternatives) from the generator's logprob rows."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from .types import InvalidRequest, TokenLogprob, TopLogprob


def _token_bytes(tokenizer: Any, token_id: int) -> bytes:
    from .constrained import llg_tokenizer

    try:
        return bytes(llg_tokenizer(tokenizer).decode_bytes([token_id]))
    except InvalidRequest:  # a tokenizer llguidance cannot wrap: fall back to decoded text
        return tokenizer.decode([token_id]).encode("utf-8")


def token_logprob(tokenizer: Any, token_id: int, row: mx.array, top: int) -> TokenLogprob:
    """The chosen token's logprob and the `top` most likely tokens, most likely first.

    `row` is the normalized log-distribution the token was sampled from (after repetition
    penalty and any output constraint, which is what mlx-lm's generator reports).
    """
    values = np.asarray(row.astype(mx.float32)).reshape(-1)
    alts: tuple[TopLogprob, ...] = ()
    if top > 0:
        k = min(top, values.size)
        idx = np.argpartition(-values, k - 1)[:k]
        idx = idx[np.argsort(-values[idx], kind="stable")]
        alts = tuple(_top(tokenizer, int(i), float(values[i])) for i in idx)
    b = _token_bytes(tokenizer, token_id)
    return TokenLogprob(
        token_id, b.decode("utf-8", errors="replace"), float(values[token_id]), b, alts
    )


def _top(tokenizer: Any, token_id: int, logprob: float) -> TopLogprob:
    b = _token_bytes(tokenizer, token_id)
    return TopLogprob(token_id, b.decode("utf-8", errors="replace"), logprob, b)
