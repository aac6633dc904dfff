"""Shared-prefix prefill: concurrent requests that share a long prefix compute it once.

Two small rules, used by the engine:
- as soon as a long prompt has been prefilled, its KV cache goes into the prompt cache, while
  the request is still running (not only when it finishes), so a later arrival that shares a
  system prompt or tool definitions reuses it;
- a request that arrives while another request with the same long prefix is still being
  prefilled waits for it (a few steps) instead of computing the same prefix in parallel.
"""

from __future__ import annotations

from typing import Iterable, Sequence

# Below this many shared tokens, recomputing is cheaper than copying a cache around.
SHARE_MIN_TOKENS = 256


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def worth_caching(prompt: Sequence[int]) -> bool:
    return len(prompt) >= SHARE_MIN_TOKENS


def shared_with(prompt: Sequence[int], leaders: Iterable[Sequence[int]]) -> int:
    """The longest prefix this prompt shares with a prompt being prefilled (0 if too short)."""
    best = 0
    for other in leaders:
        if len(other) >= SHARE_MIN_TOKENS and other[0] == prompt[0]:
            best = max(best, common_prefix(prompt, other))
    return best if best >= SHARE_MIN_TOKENS else 0
