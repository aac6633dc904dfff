"""Load a llama-family GGUF file (llama.cpp's format) into an mlx-lm model.

`mx.load` reads GGUF: Q4_0, Q4_1 and Q8_0 tensors come back as MLX-quantized triples
(weight, scales, biases; group size 32) that mlx-lm's quantized layers use directly. What is
left to do here: map llama.cpp's tensor names to mlx-lm's, undo the row permutation
llama.cpp's converter applies to q/k for its rope layout (llama architecture only), build the
config from the metadata, and build the tokenizer (`gguf_tokenizer`). Anything else --
another architecture, a tensor type MLX does not read correctly -- is refused with one line.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .gguf_header import GGUFFormatError, TensorInfo, read_tensor_infos
from .gguf_tokenizer import GGUFTokenizerError, _value, eos_ids, load_tokenizer, save_tokenizer
from .types import EngineError

# GGUF architecture -> (mlx-lm model_type, q/k rows permuted by llama.cpp's converter).
# llama.cpp writes Mistral 7B-style models as `llama`; `mistral` is accepted for files that say so.
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}
# Kept quantized: mx.load returns MLX affine triples (group size 32).
QUANTIZED_TYPES = ("Q4_0", "Q4_1", "Q8_0")
# mx.load dequantizes these to float16/float32; checked equal to llama.cpp's gguf-py dequantizer.
FLOAT_TYPES = ("F32", "F16", "BF16", "Q6_K", "Q2_K")
# Q4_K: mx.load returns values that differ from the reference dequantization, so it is refused.
SUPPORTED_TYPES = QUANTIZED_TYPES + FLOAT_TYPES

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_]+)\.(weight|bias|scales|biases)$")


class GGUFError(EngineError):
    """The GGUF file cannot be served; the message is one line naming what and why."""


@dataclass
class GGUFModel:
    model: Any
    tokenizer: Any
    config: dict[str, Any]
    metadata: dict[str, Any]


# Dequantize on CPU-only machines only while float32 weights stay this small: beyond it the
# memory (4 bytes a weight) and memory bandwidth outweigh the faster float32 matmuls.
DEQUANTIZE_LIMIT_BYTES = 2 * 1024**3


def default_dequantize(n_weights: int = 0) -> bool:
    """Dequantize to float32 on CPU-only machines (faster there), keep quantized on Metal.

    Measured on a 2-core EPYC VM with OpenBLAS: SmolLM2-135M decodes faster in float32 than
    as Q4_1 (README). Models over DEQUANTIZE_LIMIT_BYTES in float32 stay quantized.
    `LMLINK_GGUF_DEQUANTIZE=0|1` overrides.
    """
    env = os.environ.get("LMLINK_GGUF_DEQUANTIZE", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return sys.platform != "darwin" and n_weights * 4 <= DEQUANTIZE_LIMIT_BYTES


def _n_weights(infos: list[TensorInfo]) -> int:
    from math import prod

    return sum(prod(t.shape) for t in infos)


def check_tensors(path: Path, infos: list[TensorInfo]) -> None:
    """Refuse files holding tensor types or tensors we cannot load correctly."""
    bad = Counter(t.type_name for t in infos if t.type_name not in SUPPORTED_TYPES)
    if bad:
        kind, count = bad.most_common(1)[0]
        example = next(t.name for t in infos if t.type_name == kind)
        raise GGUFError(
            f"{path.name}: tensor type {kind} ({count} tensors, e.g. {example}) is not supported; "
            f"supported types: {', '.join(SUPPORTED_TYPES)}"
        )
    for t in infos:
        m = _NAME.match(t.name)
        if t.name == "rope_freqs.weight":
            continue  # Llama 3.x frequency factors: see llama3_rope_scaling
        if m is None or (m.group(2) not in (_BLOCK if m.group(1) else _TOP)):
            raise GGUFError(f"{path.name}: tensor {t.name} has no place in a llama-family model "
                            "(mixture-of-experts and other variants are not supported)")


def mlx_name(name: str) -> str:
    """llama.cpp tensor name -> mlx-lm parameter name (blk.3.attn_q.weight -> ...q_proj.weight)."""
    m = _NAME.match(name)
    if m is None:
        raise GGUFError(f"unexpected tensor name {name}")
    layer, part, kind = m.groups()
    if layer is None:
        return f"{_TOP[part]}.{kind}"
    return f"model.layers.{layer}.{_BLOCK[part]}.{kind}"


def unpermute_rows(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's q/k permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    It reorders each head's rows from [two halves] to [interleaved pairs]; rows only, so it
    applies unchanged to quantized weights, their scales and biases, and to bias vectors.
    """
    rows = w.shape[0]
    return (
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_config(meta: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """An mlx-lm config.json for this file, from llama.cpp's `{arch}.*` metadata keys."""
    arch = str(meta.get("general.architecture", ""))
    if arch not in ARCHITECTURES:
        raise GGUFError(f"architecture {arch or '(none)'!r} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)})")

    def get(key: str, default: Any = ...) -> Any:
        value = meta.get(f"{arch}.{key}")
        if value is None and default is ...:
            raise GGUFError(f"metadata key {arch}.{key} is missing")
        return default if value is None else _value(value)

    scaling = get("rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise GGUFError(f"rope scaling type {scaling!r} is not supported")
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config = {
        "model_type": ARCHITECTURES[arch][0],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": int(get("vocab_size", len(tokens))),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if config["model_type"] == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    return config


def llama3_rope_scaling(factors: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Recover Llama 3's rope_scaling from the `rope_freqs` factors llama.cpp stores instead.

    The converter keeps only the per-frequency factors; the largest is the scaling `factor`.
    Llama 3.x uses low/high frequency factors 1 and 4 over an 8192-token original context:
    we take those, recompute the factors as the converter does, and refuse if they differ.
    """
    import math

    factors = [float(f) for f in factors.tolist()]
    dims, base = config["head_dim"], config["rope_theta"]
    scaling = {"rope_type": "llama3", "factor": max(factors), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    low = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    expected = []
    for i in range(0, dims, 2):
        wavelen = 2 * math.pi * base ** (i / dims)
        if wavelen < high:
            expected.append(1.0)
        elif wavelen > low:
            expected.append(scaling["factor"])
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    if len(expected) != len(factors) or any(
        abs(a - b) > 1e-3 * max(1.0, b) for a, b in zip(expected, factors)
    ):
        raise GGUFError("rope frequency factors (rope_freqs) do not match Llama 3's scheme")
    return scaling


def map_weights(weights: dict[str, Any], config: dict[str, Any], permuted: bool) -> dict:
    """Rename every tensor for mlx-lm and undo the q/k permutation where llama.cpp applied it."""
    out = {}
    for name, w in weights.items():
        if permuted and (".attn_q." in name or ".attn_k." in name):
            heads = config["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]
            w = unpermute_rows(w, heads)
        out[mlx_name(name)] = w
    return out


def _quant_params(weights: dict[str, Any], prefix: str) -> dict[str, Any]:
    scales, packed = weights[f"{prefix}.scales"], weights[f"{prefix}.weight"]
    in_dims = scales.shape[-1] * 32
    return {"group_size": 32, "bits": packed.shape[-1] * 32 // in_dims, "mode": "affine"}


def dequantize_all(weights: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """Expand every quantized triple to `dtype` (float32 is the fast path on CPU)."""
    import mlx.core as mx

    out = {}
    for name, w in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix and f"{prefix}.scales" in weights:
            p = _quant_params(weights, prefix)
            # In `dtype`, not the scales' float16: q * scale rounded to float16 loses bits.
            w = mx.dequantize(w, weights[f"{prefix}.scales"].astype(dtype),
                              weights[f"{prefix}.biases"].astype(dtype),
                              group_size=p["group_size"], bits=p["bits"])
        out[name] = w.astype(dtype) if w.dtype != dtype else w
    return out


def build_model(config: dict[str, Any], weights: dict[str, Any]) -> Any:
    """Instantiate the mlx-lm model, quantize the layers stored quantized, load the weights."""
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    quantized = {n[: -len(".scales")] for n in weights if n.endswith(".scales")}
    if quantized:
        nn.quantize(
            model, group_size=32, bits=4,
            class_predicate=lambda p, m: (
                _quant_params(weights, p) if p in quantized and hasattr(m, "to_quantized")
                else False
            ),
        )
        config["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine"}
        for p in sorted(quantized):
            q = _quant_params(weights, p)
            if q["bits"] != 4:
                config["quantization"][p] = q
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise GGUFError(f"the file's tensors do not fit a {config['model_type']} model: "
                        f"{str(exc).splitlines()[0]}") from exc
    return model


def estimate_bytes(path: Path) -> int:
    """Memory the loaded weights take: file size when kept quantized, 4 bytes a weight when
    dequantized to float32 (header only; no tensor data read)."""
    n = _n_weights(read_tensor_infos(path))
    return n * 4 if default_dequantize(n) else path.stat().st_size


def read_gguf(path: Path, *, dequantize: bool | None = None) -> tuple[dict, dict, dict]:
    """(mlx-lm weights, config, raw metadata) for a GGUF file, or a one-line GGUFError."""
    import mlx.core as mx

    try:
        infos = read_tensor_infos(path)
    except (GGUFFormatError, OSError) as exc:
        raise GGUFError(f"{path.name}: {exc}") from exc
    check_tensors(path, infos)
    try:
        raw, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as exc:
        raise GGUFError(f"{path.name}: {exc}") from exc
    names = {t.name for t in infos}
    try:
        config = hf_config(meta, names)
        if "rope_freqs.weight" in raw:
            if config["model_type"] != "llama":
                raise GGUFError("rope frequency factors are only supported for llama")
            config["rope_scaling"] = llama3_rope_scaling(raw.pop("rope_freqs.weight"), config)
    except GGUFError as exc:
        raise GGUFError(f"{path.name}: {exc}") from None
    weights = map_weights(raw, config, ARCHITECTURES[meta["general.architecture"]][1])
    if dequantize if dequantize is not None else default_dequantize(_n_weights(infos)):
        weights = dequantize_all(weights, mx.float32)
    return weights, config, meta


def load_gguf(path: str | Path, *, dequantize: bool | None = None) -> GGUFModel:
    """Load a GGUF file as an mlx-lm model plus its tokenizer (see module docstring)."""
    import mlx.core as mx

    path = Path(path)
    weights, config, meta = read_gguf(path, dequantize=dequantize)
    arch = str(meta["general.architecture"])
    model = build_model(config, weights)
    mx.eval(model.parameters())
    try:
        tokenizer = load_tokenizer(arch, meta)
    except GGUFTokenizerError as exc:
        raise GGUFError(f"{path.name}: {exc}") from exc
    return GGUFModel(model, tokenizer, config, meta)


def export_mlx_dir(path: str | Path, out: str | Path, *, dequantize: bool | None = None) -> Path:
    """Write the GGUF's model as an mlx-lm model directory (for mlx_lm.server, benchmarks)."""
    import mlx.core as mx
    from mlx_lm.utils import save_config, save_model

    path, out = Path(path), Path(out)
    weights, config, meta = read_gguf(path, dequantize=dequantize)
    model = build_model(config, weights)
    mx.eval(model.parameters())
    save_model(out, model)
    save_config(dict(config, eos_token_id=eos_ids(meta)), config_path=out / "config.json")
    save_tokenizer(str(meta["general.architecture"]), meta, out)
    return out
