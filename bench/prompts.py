"""Deterministic, distinct benchmark prompts cut from the shipped prose corpus.

Every request in a run gets its own prompt (windows starting at different words), so no
server can answer one request from another's prompt cache; the same list, in the same
order, goes to every server.
"""

from __future__ import annotations

import random
import re

from common import REPO

CORPUS_DIR = REPO / "data" / "corpus"
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[.,;:]?")


def _corpus_words() -> list[str]:
    words: list[str] = []
    for path in sorted(CORPUS_DIR.glob("*.txt")):
        words.extend(_WORD.findall(path.read_text(encoding="utf-8", errors="replace")))
    if len(words) < 1000:  # corpus missing: fall back to a fixed synthetic vocabulary
        rng = random.Random(7)
        base = "the a of to in is for that with on as by from this are be it or an".split()
        base += "python module function value object list string error file data type".split()
        words = [rng.choice(base) for _ in range(20000)]
    return words


def make_prompts(count: int, words_per_prompt: int = 32, seed: int = 1234) -> list[str]:
    """`count` distinct prompts of `words_per_prompt` words each."""
    words = _corpus_words()
    rng = random.Random(seed)
    seen: set[str] = set()
    prompts: list[str] = []
    limit = count * 20
    while len(prompts) < count and limit > 0:
        limit -= 1
        start = rng.randrange(0, len(words) - words_per_prompt)
        text = " ".join(words[start : start + words_per_prompt])
        head = " ".join(words[start : start + 3])  # distinct openings keep shared prefixes short
        if text in seen or head in seen:
            continue
        seen.add(text)
        seen.add(head)
        prompts.append(text)
    return prompts
