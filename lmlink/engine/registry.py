"""Which engines serve which model names (ids and aliases)."""

from __future__ import annotations

from .engine import Engine
from .types import ModelNotFound


class ModelRegistry:
    """Maps model ids and aliases to running engines; the first one added is the default."""

    def __init__(self) -> None:
        self._engines: dict[str, Engine] = {}
        self._names: dict[str, str] = {}
        self._default: str | None = None

    def add(self, engine: Engine, *, default: bool = False) -> None:
        model_id = engine.loaded.id
        self._engines[model_id] = engine
        for name in (model_id, *engine.loaded.aliases):
            self._names[name] = model_id
        if default or self._default is None:
            self._default = model_id

    def resolve(self, name: str) -> Engine:
        """The engine for `name` ('' means the default model)."""
        model_id = self._names.get(name) if name else self._default
        if model_id is None:
            served = ", ".join(sorted(self._engines)) or "none (still loading)"
            raise ModelNotFound(f"model {name!r} is not served here; served models: {served}")
        return self._engines[model_id]

    @property
    def default_id(self) -> str | None:
        return self._default

    def engines(self) -> list[Engine]:
        return list(self._engines.values())

    def stop_all(self) -> None:
        for engine in self._engines.values():
            engine.stop()
