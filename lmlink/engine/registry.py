"""Which engines serve which model names (ids and aliases), and loading/unloading them live.

A model is in one of three states: `loaded` (an engine serves it), `loading` (LoadModel is
reading it) or `available` (known to this server -- unloaded earlier, or the built-in model --
but not in memory). Unloading takes the model's names away at once (new requests get
NOT_FOUND "is being unloaded"), then the caller drains or cancels its streams and stops it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .engine import Engine
from .types import ModelNotFound

# A model needs its weights plus room for the KV cache and activations.
MEMORY_HEADROOM = 1.2


class ModelTooLarge(Exception):
    """The model would not fit in the memory left on this machine."""


@dataclass
class ModelEntry:
    """One model this server knows, whatever its state."""

    id: str
    state: str  # loaded | loading | available
    spec: str = ""  # what to pass to load_model to load it again
    aliases: tuple[str, ...] = ()
    context_length: int = 0
    memory_bytes: int = 0
    idle_ttl: float = 0.0
    engine: Engine | None = None
    last_used: float = field(default_factory=time.monotonic)

    @property
    def active_streams(self) -> int:
        if self.engine is None:
            return 0
        stats = self.engine.stats()
        return stats.active + stats.queued


def estimate_bytes(path: Path) -> int:
    """Weights on disk (safetensors / npz) times a headroom factor."""
    if path.suffix.lower() == ".gguf" and path.is_file():
        from .gguf import estimate_bytes as gguf_bytes

        return int(gguf_bytes(path) * MEMORY_HEADROOM)
    total = 0
    for pattern in ("*.safetensors", "*.npz"):
        for f in path.glob(pattern):
            try:
                total += f.stat().st_size
            except OSError:
                pass
    return int(total * MEMORY_HEADROOM)


def available_memory(loaded_bytes: int = 0) -> int:
    """Memory a new model may use: MemAvailable on Linux; total minus what is loaded elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return sys.maxsize
    # macOS: unified memory; keep a quarter for the system and other apps.
    return max(0, int(total * 0.75) - loaded_bytes)


class ModelRegistry:
    """Maps model ids and aliases to running engines; the first one added is the default."""

    def __init__(self) -> None:
        self._engines: dict[str, Engine] = {}
        self._names: dict[str, str] = {}
        self._default: str | None = None
        self._entries: dict[str, ModelEntry] = {}
        self._lock = threading.RLock()
        self.default_idle_ttl = 0.0  # seconds; 0 = never unload idle models
        # Builds and starts an engine for a freshly loaded model (set by the server).
        self.engine_factory: Callable[[Any], Engine] | None = None
        self.memory_available: Callable[[int], int] = available_memory

    def add(
        self, engine: Engine, *, default: bool = False, spec: str = "", idle_ttl: float = 0.0
    ) -> None:
        with self._lock:
            model_id = engine.loaded.id
            self._engines[model_id] = engine
            for name in (model_id, *engine.loaded.aliases):
                self._names[name] = model_id
            if default or self._default is None:
                self._default = model_id
            loaded = engine.loaded
            self._entries[model_id] = ModelEntry(
                model_id, "loaded", spec or str(getattr(loaded, "path", "")) or model_id,
                tuple(getattr(loaded, "aliases", ())), getattr(loaded, "context_length", 0),
                getattr(loaded, "memory_bytes", 0), idle_ttl, engine,
            )

    def resolve(self, name: str) -> Engine:
        """The engine for `name` ('' means the default model)."""
        with self._lock:
            model_id = self._names.get(name) if name else self._default
            if model_id is None or model_id not in self._engines:
                entry = self._entries.get(name) if name else None
                served = ", ".join(sorted(self._engines)) or "none (still loading)"
                if not name:  # the caller asked for the default model
                    loading = [e.id for e in self._entries.values() if e.state == "loading"]
                    if self._engines:
                        raise ModelNotFound(f"there is no default model; name one of: {served}")
                    raise ModelNotFound(
                        f"model {loading[0]!r} is still loading" if loading else
                        "no model is loaded here (load one with `lmlink models load MODEL`)")
                if entry is not None and entry.state == "loading":
                    raise ModelNotFound(f"model {name!r} is still loading; served models: {served}")
                if entry is not None and entry.state == "unloading":
                    raise ModelNotFound(f"model {name!r} is being unloaded; served models: {served}")
                if entry is not None:
                    raise ModelNotFound(
                        f"model {name!r} is not loaded (load it with `lmlink models load "
                        f"{name}`); served models: {served}"
                    )
                raise ModelNotFound(f"model {name!r} is not served here; served models: {served}")
            entry = self._entries.get(model_id)
            if entry is not None:
                entry.last_used = time.monotonic()
            return self._engines[model_id]

    @property
    def default_id(self) -> str | None:
        return self._default

    def engines(self) -> list[Engine]:
        with self._lock:
            return list(self._engines.values())

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    def entry(self, name: str) -> ModelEntry | None:
        with self._lock:
            model_id = self._names.get(name, name)
            return self._entries.get(model_id)

    def remember(self, model_id: str, spec: str, aliases: tuple[str, ...] = ()) -> None:
        """Know a model as `available` without loading it."""
        with self._lock:
            self._entries.setdefault(model_id, ModelEntry(model_id, "available", spec, aliases))

    # ----- load / unload ---------------------------------------------------------------------

    def load(
        self,
        spec: str,
        *,
        progress: Callable[[str, str, float, int, int], None] = lambda *a: None,
        make_default: bool = False,
        idle_ttl: float = 0.0,
    ) -> ModelEntry:
        """Resolve, check memory, load and serve `spec` (blocking; run it in a thread).

        `progress(stage, message, fraction, estimated_bytes, available_bytes)` is called as it
        goes. Raises ModelTooLarge, ModelLoadError or ValueError (already loaded / loading).
        """
        from .loader import load_model, resolve_model_path

        with self._lock:
            known = self._entries.get(self._names.get(spec, spec))
            if known is not None and known.state in ("loaded", "loading", "unloading"):
                raise ValueError(f"model {known.id!r} is already {known.state}")
            if known is not None and known.spec:
                spec = known.spec
        progress("resolving", f"resolving {spec}", 0.05, 0, 0)
        model_id, aliases, path = resolve_model_path(
            spec, progress=lambda m: progress("resolving", m, 0.1, 0, 0)
        )
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is not None and entry.state != "available":
                raise ValueError(f"model {model_id!r} is already {entry.state}")
            need = estimate_bytes(path)
            loaded_bytes = sum(e.memory_bytes for e in self._entries.values() if e.engine)
            have = self.memory_available(loaded_bytes)
            progress("checking_memory", f"{model_id} needs about {_human(need)}; "
                     f"{_human(have)} available", 0.15, need, have)
            if need > have:
                raise ModelTooLarge(
                    f"model {model_id!r} needs about {_human(need)} (weights plus "
                    f"{int((MEMORY_HEADROOM - 1) * 100)}% headroom) but only {_human(have)} of "
                    f"memory is available on this server; unload a model first "
                    f"(`lmlink models unload MODEL`)"
                )
            self._entries[model_id] = ModelEntry(model_id, "loading", str(path), aliases,
                                                 memory_bytes=need, idle_ttl=idle_ttl)
        try:
            progress("loading", f"loading {model_id} weights from {path}", 0.2, need, have)
            loaded = load_model(str(path) if model_id != "lmlink-tiny" else "builtin")
            progress("starting", f"starting the engine for {model_id}", 0.9, need, have)
            if self.engine_factory is None:
                raise RuntimeError("this server cannot start engines for new models")
            engine = self.engine_factory(loaded)
        except BaseException:
            with self._lock:
                self._entries[model_id] = ModelEntry(model_id, "available", str(path), aliases)
            raise
        self.add(engine, default=make_default, spec=str(path), idle_ttl=idle_ttl)
        progress("ready", f"{model_id} is loaded", 1.0, need, have)
        return self._entries[model_id]

    def begin_unload(self, name: str) -> ModelEntry:
        """Stop routing new requests to `name`; the caller then drains and `finish_unload`s."""
        with self._lock:
            model_id = self._names.get(name, name)
            entry = self._entries.get(model_id)
            if entry is None or entry.engine is None or entry.state != "loaded":
                state = entry.state if entry is not None else "not known here"
                raise ModelNotFound(f"model {name!r} is not loaded ({state})")
            entry.state = "unloading"
            for alias in [n for n, m in self._names.items() if m == model_id]:
                del self._names[alias]
            self._engines.pop(model_id, None)
            if self._default == model_id:
                self._default = next(iter(self._engines), None)
            return entry

    def finish_unload(self, entry: ModelEntry) -> int:
        """Stop the engine (blocking) and keep the model as `available`; returns freed bytes."""
        engine = entry.engine
        if engine is not None:
            engine.stop()
        with self._lock:
            self._entries[entry.id] = ModelEntry(entry.id, "available", entry.spec, entry.aliases,
                                                 entry.context_length)
        return entry.memory_bytes

    def idle_expired(self, now: float | None = None) -> list[str]:
        """Loaded models idle (no streams) for longer than their TTL (or the default TTL)."""
        now = time.monotonic() if now is None else now
        out = []
        with self._lock:
            entries = [e for e in self._entries.values() if e.state == "loaded"]
        for e in entries:
            ttl = e.idle_ttl or self.default_idle_ttl
            if ttl > 0 and e.active_streams == 0 and now - e.last_used >= ttl:
                out.append(e.id)
            elif e.active_streams:
                e.last_used = now
        return out

    def stop_all(self) -> None:
        for engine in self.engines():
            engine.stop()


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
