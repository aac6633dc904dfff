"""The model manager: which models are served, loading and unloading them, their health.

One owner for a model's life (it used to live in the registry, the gRPC servicer and the
server assembly): the registry of names, how to start an engine for a newly loaded model,
load progress, draining on unload (through the engine's own `cancel_all`, so every door's
streams end the same way, with finish_reason "cancelled"), the idle sweeper and health.
The doors' LoadModel/UnloadModel are small adapters over `load` and `unload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from lmlink.engine.registry import ModelEntry, ModelRegistry, ModelTooLarge
from lmlink.engine.types import EngineError, ModelNotFound

from .errors import CallError, ErrorKind
from .streams import StreamHub

log = logging.getLogger("lmlink.models")


@dataclass(frozen=True)
class LoadStep:
    """Progress of a load: stage, human message, fraction done, bytes needed / available."""

    stage: str
    message: str
    fraction: float
    estimated_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class Unloaded:
    entry: ModelEntry
    drained: int
    cancelled: int
    freed_bytes: int


class ModelManager:
    """Registry + engine factory + load/unload + idle sweep + health, for one event loop."""

    def __init__(self, hub: StreamHub, *, registry: ModelRegistry | None = None,
                 idle_ttl: float = 0.0) -> None:
        self.hub = hub
        self.registry = registry or ModelRegistry()
        self.registry.default_idle_ttl = idle_ttl
        self.ready = asyncio.Event()  # the first model serves
        self._loads: set[asyncio.Future[Any]] = set()
        self._health_listeners: list[Callable[[bool], Awaitable[None]]] = []

    # ----- what is served --------------------------------------------------------------------

    def add(self, engine: Any, *, default: bool = False, spec: str = "") -> None:
        """Serve an engine that is already started; the first one makes the server ready."""
        add_listener = getattr(engine, "add_step_listener", None)
        if add_listener is not None:
            add_listener(self.hub.on_step)
        self.registry.add(engine, default=default, spec=spec)
        self.ready.set()

    def resolve(self, name: str) -> Any:
        """The engine for `name` ('' = the default); CallError NOT_FOUND / LOADING otherwise."""
        if not self.ready.is_set():
            raise CallError(ErrorKind.LOADING, "the model is still loading", retry_after=5)
        try:
            return self.registry.resolve(name)
        except ModelNotFound as exc:
            raise CallError(ErrorKind.NOT_FOUND, str(exc), param="model") from None

    def engines(self) -> list[Any]:
        return self.registry.engines()

    def entries(self) -> list[ModelEntry]:
        return self.registry.entries()

    @property
    def default_id(self) -> str | None:
        return self.registry.default_id

    @property
    def healthy(self) -> bool:
        return self.ready.is_set() and all(e.healthy for e in self.engines())

    def enable_loading(self, factory: Callable[[Any], Any], known: dict[str, str] | None = None) -> None:
        """Allow LoadModel: `factory(loaded)` builds and starts an engine (in a thread)."""

        def start(loaded: Any) -> Any:
            engine = factory(loaded)
            engine.add_step_listener(self.hub.on_step)
            engine.start()
            return engine

        self.registry.engine_factory = start
        for model_id, spec in (known or {}).items():
            self.registry.remember(model_id, spec, (spec,))

    # ----- load / unload ---------------------------------------------------------------------

    async def load(self, spec: str, *, make_default: bool = False,
                   idle_ttl: float = 0.0) -> AsyncIterator[LoadStep | ModelEntry]:
        """Load `spec`: LoadStep events, then the served ModelEntry. Raises CallError.

        The load runs to its end in a thread even if the caller stops listening.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def progress(stage: str, message: str, fraction: float, need: int, have: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, LoadStep(stage, message, fraction, need, have))

        def work() -> None:
            try:
                done: Any = self.registry.load(spec, progress=progress,
                                               make_default=make_default, idle_ttl=idle_ttl)
            except BaseException as exc:  # noqa: BLE001 - reported to the caller below
                done = exc
            loop.call_soon_threadsafe(events.put_nowait, done)

        task = asyncio.ensure_future(asyncio.to_thread(work))
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
        while True:
            item = await events.get()
            if isinstance(item, BaseException):
                raise _load_error(item)
            yield item
            if isinstance(item, ModelEntry):
                return

    async def unload(self, name: str, *, drain_timeout: float = 30.0) -> Unloaded:
        """Stop routing to `name`, wait up to `drain_timeout` for its streams, cancel the rest
        (every door's streams end with finish_reason "cancelled"), then stop its engine."""
        try:
            entry = self.registry.begin_unload(name)
        except ModelNotFound as exc:
            raise CallError(ErrorKind.NOT_FOUND, str(exc), param="model") from None
        drained, cancelled = await self._drain(entry, drain_timeout)
        freed = await asyncio.to_thread(self.registry.finish_unload, entry)
        return Unloaded(entry, drained, cancelled, freed)

    async def _drain(self, entry: ModelEntry, timeout: float) -> tuple[int, int]:
        before = entry.active_streams
        deadline = time.monotonic() + timeout
        while entry.active_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = entry.active_streams
        if left and entry.engine is not None:
            entry.engine.cancel_all()
            end = time.monotonic() + 2.0
            while entry.active_streams and time.monotonic() < end:
                await asyncio.sleep(0.02)
        return before - left, left

    async def sweep_idle(self, every: float = 1.0) -> None:
        """Unload models idle longer than their TTL (runs for the life of the server)."""
        while True:
            await asyncio.sleep(every)
            for model_id in self.registry.idle_expired():
                with contextlib.suppress(CallError):
                    log.info("unloading %s after its idle TTL", model_id)
                    await self.unload(model_id, drain_timeout=0.0)

    # ----- health ----------------------------------------------------------------------------

    def on_health(self, listener: Callable[[bool], Awaitable[None]]) -> None:
        """Call `listener(serving)` whenever health changes (a cluster rank failing, say)."""
        self._health_listeners.append(listener)

    async def watch_health(self, every: float = 0.25) -> None:
        # The server reports SERVING once the first model serves; from then on, follow it.
        # (Reading `healthy` before that would start from "not serving" and miss the first
        # failure: a cluster rank that dies then never turned health to NOT_SERVING.)
        await self.ready.wait()
        serving = True
        while True:
            await asyncio.sleep(every)
            ok = self.healthy
            if ok != serving:
                serving = ok
                for listener in self._health_listeners:
                    await listener(ok)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator["ModelManager"]:
        """The sweeper and the health watch for the life of the block; engines stop after."""
        tasks = [asyncio.ensure_future(self.sweep_idle()), asyncio.ensure_future(self.watch_health())]
        try:
            yield self
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.to_thread(self.registry.stop_all)


def _load_error(exc: BaseException) -> CallError:
    from lmlink.engine.loader import ModelLoadError

    if isinstance(exc, CallError):
        return exc
    if isinstance(exc, ModelTooLarge):
        return CallError(ErrorKind.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, ValueError):  # already loaded / loading
        return CallError(ErrorKind.ALREADY_EXISTS, str(exc))
    if isinstance(exc, ModelLoadError):
        return CallError(ErrorKind.NOT_FOUND, str(exc))
    if isinstance(exc, EngineError):
        return CallError.of(exc)
    log.error("model load failed: %s", type(exc).__name__)
    log.debug("model load failure", exc_info=exc)
    return CallError(ErrorKind.INTERNAL, f"loading failed: {exc.__class__.__name__}: {exc}")
