"""The tokenizer and chat template a GGUF file describes, as files mlx-lm loads.

A GGUF carries no tokenizer.json: only llama.cpp's metadata (vocabulary, merges or scores,
token types, special token ids, pre-tokenizer name, chat template). transformers' own GGUF
mapping turns that into a `tokenizers` backend (byte-level BPE from vocab + merges, and
SentencePiece-style `llama` vocabularies with merges rebuilt from the scores); we add the
pre-tokenizers it lacks, save tokenizer files, and let mlx-lm load them (it picks the right
streaming detokenizer from tokenizer.json).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from .types import EngineError

# llama.cpp pre-tokenizer names transformers' table lacks, as `tokenizers` pre-tokenizers.
# smollm: single digits, then GPT-2's split (llama-vocab.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM).
_EXTRA_PRE = ("smollm",)
TOKENIZER_TYPES = ("gpt2", "llama")


class GGUFTokenizerError(EngineError):
    """The file's tokenizer metadata is missing or of a kind we cannot rebuild."""


def _value(v: Any) -> Any:
    """mx.load returns numbers as 0-d (or 1-d) mlx arrays; make them plain Python values."""
    return v.tolist() if hasattr(v, "tolist") else v


def tokenizer_dict(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata transformers' GGUF tokenizer builders expect, under their key names."""
    keys = {
        "model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens",
        "scores": "scores", "token_type": "token_type", "merges": "merges",
        "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
        "unknown_token_id": "unk_token_id", "padding_token_id": "pad_token_id",
        "add_space_prefix": "add_prefix_space",
    }
    return {
        name: _value(meta[f"tokenizer.ggml.{key}"])
        for key, name in keys.items()
        if f"tokenizer.ggml.{key}" in meta
    }


def build_backend(arch: str, meta: dict[str, Any]) -> Any:
    """A `tokenizers.Tokenizer` equivalent to the one llama.cpp builds from this metadata."""
    from tokenizers import pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    d = tokenizer_dict(meta)
    kind = d.get("tokenizer_type")
    if kind not in TOKENIZER_TYPES:
        raise GGUFTokenizerError(
            f"tokenizer type {kind!r} is not supported (supported: {', '.join(TOKENIZER_TYPES)})"
        )
    if "tokens" not in d:
        raise GGUFTokenizerError("the file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    try:
        backend, _ = convert_gguf_tokenizer(arch, d)
    except (ValueError, KeyError) as exc:
        raise GGUFTokenizerError(f"cannot rebuild the tokenizer: {exc}") from exc
    if kind == "gpt2" and d.get("pre_tokenizer_type") == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    return backend


def eos_ids(meta: dict[str, Any]) -> list[int]:
    """End-of-sequence ids: EOS plus end-of-turn / end-of-message when the file names them."""
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            ids.append(int(_value(value)))
    return sorted(set(ids))


def save_tokenizer(arch: str, meta: dict[str, Any], out: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json (with the chat template) into `out`."""
    from transformers import PreTrainedTokenizerFast

    d = tokenizer_dict(meta)
    tokens = d["tokens"]

    def token(key: str) -> str | None:
        index = d.get(key)
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    template = meta.get("tokenizer.chat_template")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_backend(arch, meta),
        bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
        unk_token=token("unk_token_id"), pad_token=token("pad_token_id"),
        chat_template=template if isinstance(template, str) and template else None,
        clean_up_tokenization_spaces=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # transformers 5 may keep the template in chat_template.jinja; mlx-lm reads either.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("add_bos_token", False)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def load_tokenizer(arch: str, meta: dict[str, Any]) -> Any:
    """An mlx-lm TokenizerWrapper for this file (built in a temporary directory)."""
    from mlx_lm.tokenizer_utils import load as load_wrapper

    with tempfile.TemporaryDirectory(prefix="lmlink-gguf-tok-") as tmp:
        save_tokenizer(arch, meta, Path(tmp))
        return load_wrapper(Path(tmp), eos_token_ids=eos_ids(meta))
