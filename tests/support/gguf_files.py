"""Write small GGUF files the way llama.cpp's convert_hf_to_gguf.py does, with llama.cpp's
own Python package (gguf-py), from mlx-lm models; the tests load them back with lmlink."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lmlink.engine.loader import BUILTIN_MODEL_DIR

HF_TO_GGUF = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.permute`, verbatim in substance."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_name(hf: str) -> str:
    parts = hf.split(".")
    kind = parts[-1]
    if hf.startswith("model.layers."):
        layer, inner = parts[2], ".".join(parts[3:-1])
        return f"blk.{layer}.{HF_TO_GGUF[inner]}.{kind}"
    return f"{HF_TO_GGUF['.'.join(parts[:-1])]}.{kind}"


def llama_cpp_rope_factors(config: dict) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.generate_extra_tensors` for rope_type llama3."""
    import math

    rs = config["rope_scaling"]
    base, dim = config["rope_theta"], config["head_dim"]
    factor, low_ff, high_ff = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> tuple[Any, dict]:
    """A small random mlx-lm model (vocabulary of the built-in model's tokenizer)."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    mx.random.seed(seed)
    config = {
        "model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "vocab_size": 2048, "tie_word_embeddings": False,
        **overrides,
    }
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    # Norm weights start at 1: perturb them so a wrong mapping shows.
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    model.load_weights([(k, v + 0.1 * mx.random.normal(v.shape) if "norm" in k else v)
                        for k, v in params.items()])
    mx.eval(model.parameters())
    return model, config


def builtin_model() -> tuple[Any, dict]:
    from mlx_lm.utils import load_model

    model, config = load_model(BUILTIN_MODEL_DIR)
    return model, config


def builtin_vocab() -> tuple[list[str], list[str], list[int], dict]:
    """Tokens, merges, token types and config of the built-in model's byte-level BPE."""
    tok = json.loads((BUILTIN_MODEL_DIR / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    types = [3 if t in special else 1 for t in tokens]
    cfg = json.loads((BUILTIN_MODEL_DIR / "tokenizer_config.json").read_text())
    return tokens, merges, types, cfg


def train_sentencepiece(vocab_size: int = 2048) -> bytes:
    """A small SentencePiece BPE model (byte fallback, like Llama 2's) trained on the corpus."""
    import io

    import sentencepiece as spm

    text = (BUILTIN_MODEL_DIR.parents[2] / "data" / "corpus" / "python_reference.txt").read_text()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text[:400_000].splitlines()), model_writer=buf,
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
    )
    return buf.getvalue()


def _add_sentencepiece_vocab(w: Any, proto: bytes) -> None:
    """llama.cpp's `_set_vocab_sentencepiece`: pieces, scores, token types, special ids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto)
    n = sp.get_piece_size()

    def kind(i: int) -> int:  # llama.cpp SentencePieceTokenTypes
        return (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                else 5 if sp.is_unused(i) else 1)

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([kind(i) for i in range(n)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] "
                        "{{ m['content'] }}\n{% endfor %}[assistant]")


def write_gguf(path: Path, model: Any, config: dict, *, arch: str, qtype: str = "F32",
               permute: bool | None = None, pre: str = "qwen2",
               sentencepiece: bytes | None = None) -> Path:
    """Write `model` as llama.cpp would: its names, q/k permuted for llama, its metadata.

    qtype: F32, or Q8_0 / Q4_0 / Q4_1 for the 2-D weights (quantized by gguf-py).
    """
    import gguf
    from mlx.utils import tree_flatten

    permute = arch in ("llama", "mistral") if permute is None else permute
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(float(config["rope_theta"]))
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if "head_dim" in config:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    w.add_vocab_size(config["vocab_size"])
    if sentencepiece is not None:
        _add_sentencepiece_vocab(w, sentencepiece)
    else:
        tokens, merges, types, tcfg = builtin_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_eos_token_id(tokens.index("<|im_end|>") if "<|im_end|>" in tokens else 0)
        w.add_add_bos_token(False)
        if tcfg.get("chat_template"):
            w.add_chat_template(tcfg["chat_template"])
    for name, value in tree_flatten(model.parameters()):
        arr = np.array(value.astype(__import__("mlx.core").core.float32))
        if permute and ".q_proj." in name:
            arr = llama_cpp_permute(arr, heads, heads)
        elif permute and ".k_proj." in name:
            arr = llama_cpp_permute(arr, heads, kv)
        if qtype != "F32" and arr.ndim == 2 and name.endswith(".weight"):
            t = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(gguf_name(name), gguf.quants.quantize(arr, t), raw_dtype=t)
        else:
            w.add_tensor(gguf_name(name), arr)
    if (config.get("rope_scaling") or {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(config))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dequantized_reference(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32, dequantized by gguf-py (llama.cpp's reference)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
    return out
