"""The shipped built-in model loads offline, chats in ChatML, and rebuilds byte-identically:
a short build twice gives the same bytes, and the full build (slow) gives the shipped files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "lmlink" / "engine" / "builtin_model"
BUILD_SCRIPT = REPO / "scripts" / "build_builtin_model.py"
EXPECTED_FILES = {
    "README.md",
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def loaded() -> Iterator[tuple]:
    """Load once, with the hub forced offline, as `lmlink serve` would on a fresh machine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        from mlx_lm import load

        yield load(str(MODEL_DIR))


def test_shipped_files_are_complete_and_small() -> None:
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert EXPECTED_FILES <= names
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < 5 * 1024 * 1024


def test_config_allows_2_and_4_way_tensor_parallel() -> None:
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size"):
        assert config[key] % 4 == 0, key
    index = json.loads((MODEL_DIR / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}


def test_eos_is_im_end(loaded: tuple) -> None:
    _, tokenizer = loaded
    config = json.loads((MODEL_DIR / "config.json").read_text())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    assert config["eos_token_id"][0] == im_end
    assert im_end in tokenizer.eos_token_ids


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "Emoji 🎉🐍👩‍💻 and flags 🇫🇷.",
        "naïve café, Ünïcödé — 中文, русский, العربية",
        "tabs\tand\n\nnewlines   and  trailing spaces  ",
    ],
)
def test_tokenizer_round_trips_utf8(loaded: tuple, text: str) -> None:
    from tokenizers import Tokenizer

    _, tokenizer = loaded
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    # transformers rebuilds the Qwen2 pre-tokenizer; it must agree with the one we trained.
    assert Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json")).encode(text).ids == ids


def test_chat_template_renders_chatml(loaded: tuple) -> None:
    _, tokenizer = loaded
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "More?"}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nMore?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=False, tokenize=False)
    assert without.endswith("<|im_start|>user\nHi<|im_end|>\n")


def test_greedy_chat_output_is_varied_printable_text(loaded: tuple) -> None:
    from mlx_lm import stream_generate

    model, tokenizer = loaded
    messages = [{"role": "user", "content": "Tell me about the json module."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=40))
    tokens = [r.token for r in responses]
    text = "".join(r.text for r in responses)
    assert len(set(tokens)) >= min(5, len(tokens)) > 1
    assert text.strip()
    assert sum(c.isprintable() or c in "\n\t" for c in text) / len(text) > 0.95
    assert sum(c.isalpha() or c == " " for c in text) / len(text) > 0.7


def build(out: Path, *options: str) -> subprocess.Popen:
    args = [sys.executable, str(BUILD_SCRIPT), "--out", str(out), *options]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())


SHORT = ("--steps", "3", "--seed", "7", "--corpus-limit-bytes", "150000")


def test_build_script_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    runs = [build(first, *SHORT), build(second, *SHORT)]
    for run in runs:
        output, _ = run.communicate(timeout=120)
        assert run.returncode == 0, output.decode(errors="replace")
    names = sorted(p.name for p in first.iterdir())
    assert set(names) == EXPECTED_FILES
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_full_rebuild_equals_the_shipped_files(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The build script with its defaults remakes the shipped directory byte for byte (the
    script's reproducibility claim: same versions, OpenBLAS preloaded, as `make test` runs).
    Slow tier: 600 training steps, about 10 min on an idle 2-core EPYC VM, 45 min on a busy one;
    run with `-m slow` or LMLINK_SLOW_TESTS=1.

    Found 2026-12-02 (this test's first run, OPENBLAS_NUM_THREADS=1 as /work/bin/lt and the
    engine use): every file but model.safetensors is identical, final loss too (4.145), but the
    weights differ; the shipped ones were built with 2 BLAS threads. Until the build pins its BLAS
    thread count or the weights are rebuilt under it, this test fails, as it should."""
    if "slow" not in (request.config.getoption("markexpr") or "") and not os.environ.get(
            "LMLINK_SLOW_TESTS"):
        pytest.skip("slow tier: run with -m slow or LMLINK_SLOW_TESTS=1")
    run = build(tmp_path / "rebuilt")
    output, _ = run.communicate(timeout=7000)
    assert run.returncode == 0, output.decode(errors="replace")[-3000:]
    names = sorted(p.name for p in (tmp_path / "rebuilt").iterdir())
    assert names == sorted(p.name for p in MODEL_DIR.iterdir())
    differ = [n for n in names if (tmp_path / "rebuilt" / n).read_bytes() != (MODEL_DIR / n).read_bytes()]
    assert differ == [], f"rebuilt files differ from the shipped ones: {differ}"
