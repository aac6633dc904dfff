"""The shipped built-in model loads offline, chats in ChatML, and rebuilds byte-identically:
the shipped files are the final state the build manifest names, and a rebuild up to the first
checkpoint matches it (the full rebuild, byte for byte, is `make rebuild-builtin`)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "lmlink" / "engine" / "builtin_model"
BUILD_SCRIPT = REPO / "scripts" / "build_builtin_model.py"
EXPECTED_FILES = {  # besides build_manifest.json, which lists them
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


def build_script():
    """The build script as a module (its pinning re-exec runs only as a script)."""
    if "build_builtin_model" not in sys.modules:
        spec = importlib.util.spec_from_file_location("build_builtin_model", BUILD_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["build_builtin_model"]


def test_shipped_files_are_the_manifests_final_build() -> None:
    """The manifest names every shipped file's sha256 and the parameters after the last
    training step; the shipped weights must be exactly that state (so a checkpoint match in
    the next test speaks for the shipped weights, not some other build)."""
    import mlx.core as mx

    script = build_script()
    manifest = json.loads((MODEL_DIR / script.MANIFEST).read_text())
    assert manifest["stopped_after"] is None
    assert set(manifest["files"]) == EXPECTED_FILES
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((MODEL_DIR / name).read_bytes()).hexdigest() == digest, name
    steps = max(int(step) for step in manifest["checkpoints"])
    assert f"{steps} AdamW steps" in (MODEL_DIR / "README.md").read_text()
    assert set(manifest["checkpoints"]) == {*(str(c) for c in script.CHECKPOINTS), str(steps)}
    weights = mx.load(str(MODEL_DIR / "model.safetensors"))
    assert script.params_digest(weights) == manifest["checkpoints"][str(steps)]["params_sha256"]


@pytest.mark.timeout(900)
def test_rebuild_matches_the_shipped_build_at_its_first_checkpoint(tmp_path: Path) -> None:
    """Rebuild from the corpus, train the first checkpoint's steps of the shipped schedule, and
    compare tokenizer, config and parameter digest with the shipped manifest, in an environment
    set up to differ (2 BLAS threads, another OpenBLAS kernel, mlx's own BLAS): the script must
    pin what changes float rounding itself. Then show the comparison can fail. The full
    600-step rebuild (30 min on a loaded 2-core VM) is `make rebuild-builtin`."""
    script = build_script()
    first = min(script.CHECKPOINTS)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LMLINK_BUILD_PINNED")}
    env.update(OPENBLAS_NUM_THREADS="2", OMP_NUM_THREADS="2", OPENBLAS_CORETYPE="Zen")
    out = tmp_path / "rebuilt"
    run = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--out", str(out), "--check", str(MODEL_DIR),
         "--stop-after", str(first)],
        env=env, capture_output=True, text=True, timeout=880)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert f"rebuild matches {MODEL_DIR}" in run.stdout
    built = json.loads((out / script.MANIFEST).read_text())
    assert list(built["checkpoints"]) == [str(first)] and built["stopped_after"] == first
    assert built["built_with"]["pinned_env"]["OPENBLAS_NUM_THREADS"] == "1"
    # the check itself can fail: a shipped manifest naming other parameters at that step
    tampered = tmp_path / "tampered"
    shutil.copytree(MODEL_DIR, tampered)
    manifest = json.loads((tampered / script.MANIFEST).read_text())
    manifest["checkpoints"][str(first)]["params_sha256"] = "0" * 64
    (tampered / script.MANIFEST).write_text(json.dumps(manifest))
    assert [p for p in script.compare(out, tampered) if f"step {first}" in p]
