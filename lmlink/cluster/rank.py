"""What every rank of `lmlink cluster up` runs (started by mpirun or mlx.launch, never by hand).

    python -m lmlink.cluster.rank OPTIONS [LOG_LEVEL]   (cluster file in $LMLINK_CLUSTER_TOML)

OPTIONS is rank 0's `ServeOptions` as base64 JSON, built by `lmlink cluster up` (every rank
reads its batching limits: they must match for lockstep). This module never imports the
command line: rank 0 calls `lmlink.server.serve(options, cluster=runtime)` itself.

All ranks: join the mx.distributed group, load their shard of the model, then run the same
lockstep engine. Rank 0 also runs the whole `lmlink serve` stack (gRPC, HTTP bridge, discovery)
with the usual serving flags and a side channel for heartbeats; the other ranks serve nothing
to the network.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .control import ControlServer, Heartbeat, RankStatus, fetch_files, memory_in_use
from .spec import ClusterSpec, parse_cluster

from lmlink import defaults

log = logging.getLogger("lmlink.cluster")
ENV_SPEC = defaults.ENV_CLUSTER_TOML
ENV_LINGER = defaults.ENV_CLUSTER_LINGER


def encode_serve_options(options: Any, log_level: str = "warning") -> list[str]:
    """The rank command line's arguments: `options` (a ServeOptions) as base64 JSON."""
    import dataclasses

    data = dataclasses.asdict(dataclasses.replace(options, cluster=None))
    data.pop("cluster", None)
    blob = base64.b64encode(json.dumps(data, default=str).encode()).decode()
    return [blob, log_level]


def decode_serve_options(blob: str) -> Any:
    """The inverse of `encode_serve_options`."""
    from lmlink.engine.engine import EngineConfig
    from lmlink.front_door import TailnetSettings
    from lmlink.server import ServeOptions

    data = json.loads(base64.b64decode(blob))
    data["engine"] = EngineConfig(**data["engine"])
    tailnet = data["tailnet"]
    tailnet["state_dir"] = Path(tailnet["state_dir"])
    data["tailnet"] = TailnetSettings(**tailnet)
    if "allowed_origins" in data:
        data["allowed_origins"] = tuple(data["allowed_origins"])
    if "resume" in data:
        from lmlink.api.resume import ResumeOptions

        data["resume"] = ResumeOptions(**data["resume"])
    return ServeOptions(**data)


def spec_from_env() -> ClusterSpec:
    import tomllib

    return parse_cluster(tomllib.loads(base64.b64decode(os.environ[ENV_SPEC]).decode()))


def _emit(event: dict[str, Any]) -> None:
    """A JSON line for the launcher (rank 0's stdout reaches it through mpirun / mlx.launch)."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def load_shard(spec: ClusterSpec, group: Any, model: str, progress: Callable[[str], None],
               path: Path | None = None) -> Any:
    """This rank's part of the model, as a `LoadedModel`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import sharded_load

    from lmlink.engine.loader import LoadedModel, _context_length, resolve_model_path

    model_id, aliases, resolved = resolve_model_path(model, progress=progress)
    path = path or resolved
    progress(f"loading {spec.sharding}-parallel shard {group.rank() + 1}/{group.size()} "
             f"of {model_id}")
    t0 = time.monotonic()
    if spec.sharding == "pipeline":
        net, tokenizer = sharded_load(str(path), pipeline_group=group)
    else:
        net, tokenizer = sharded_load(str(path), tensor_group=group)
    mx.eval(net.parameters())
    memory = sum(v.nbytes for _, v in tree_flatten(net.parameters()))
    progress(f"loaded {memory / 1e6:.1f} MB of weights in {time.monotonic() - t0:.1f} s")
    return LoadedModel(id=model_id, aliases=aliases, path=path, model=net, tokenizer=tokenizer,
                       context_length=_context_length(path, tokenizer), memory_bytes=memory)


class ClusterFacts:
    """What rank 0 reports about the cluster (GetServerInfo / `lmlink status`)."""

    def __init__(self, spec: ClusterSpec, control: ControlServer) -> None:
        self.spec = spec
        self.control = control

    @property
    def backend(self) -> str:
        return self.spec.backend

    @property
    def sharding(self) -> str:
        return self.spec.sharding

    def ranks(self) -> list[RankStatus]:
        return [self.control.ranks[r] for r in sorted(self.control.ranks)]


class Rank0:
    """Rank 0's cluster runtime: handed to `serve` as `ServeOptions.cluster`."""

    def __init__(self, spec: ClusterSpec, group: Any, control: ControlServer, model: str,
                 config: Any) -> None:
        self.spec, self.group, self.control = spec, group, control
        self.model, self.config = model, config
        self.engine: Any = None

    def make_engine(self, progress: Callable[[str], None] | None) -> Any:
        import mlx.core as mx

        from lmlink.engine.engine import Engine
        from lmlink.engine.lockstep import DistributedBroadcaster

        say = progress or (lambda m: None)
        me = self.control.ranks[0]

        def progress0(msg: str) -> None:
            me.message = msg
            say(f"rank 0 ({me.host}): {msg}")
            _emit({"event": "progress", "rank": 0, "host": me.host, "pid": os.getpid(),
                   "message": msg})

        me.state = "loading"
        loaded = load_shard(self.spec, self.group, self.model, progress0)
        me.model_bytes = loaded.memory_bytes
        missing = self.control.wait_connected(120)
        if missing:
            raise RuntimeError(f"rank(s) {missing} never reported in")
        # Every rank has its shard: one collective to line up, then the lockstep loop.
        mx.eval(mx.distributed.all_sum(mx.array([1]), group=self.group))
        me.state = "ready"
        engine = ClusterEngine(loaded, self.config, lockstep=DistributedBroadcaster(self.group))
        engine.control = self.control
        engine.cluster = ClusterFacts(self.spec, self.control)
        self.engine = engine
        progress0(f"all {self.spec.size} ranks loaded; serving")
        return engine


def _cluster_engine_class() -> type:
    from lmlink.engine.engine import Engine

    class _ClusterEngine(Engine):
        control: ControlServer | None = None

        def stop(self, timeout: float = 10.0) -> None:
            if self.control is not None:
                self.control.closing = True  # ranks leaving now is the plan, not a failure
            super().stop(timeout)

        def stats(self):  # noqa: ANN201 - same as Engine.stats
            me = self.control.ranks.get(0) if self.control else None
            if me is not None:
                me.memory_bytes = memory_in_use()
            return super().stats()

    return _ClusterEngine


def ClusterEngine(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - a class factory
    return _cluster_engine_class()(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    import mlx.core as mx

    argv = list(sys.argv[1:] if argv is None else argv)
    from .lifecycle import watch_launcher

    watch_launcher()  # leave with the launcher / `cluster up`, however it dies
    spec = spec_from_env()
    group = mx.distributed.init(backend=spec.backend, strict=True)
    rank, size = group.rank(), group.size()
    if size != spec.size:
        print(f"lmlink cluster rank: launched {size} ranks but the cluster file names "
              f"{spec.size}", file=sys.stderr)
        return 1
    me = spec.ranks[rank]
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")

    def say(msg: str) -> None:
        print(f"[rank {rank} {me.host.name}] {msg}", file=sys.stderr, flush=True)

    try:
        options = decode_serve_options(argv[0])
    except (IndexError, ValueError, TypeError, KeyError) as exc:
        print(f"lmlink cluster rank: bad serve options from the launcher: {exc}", file=sys.stderr)
        return 2
    level = argv[1] if len(argv) > 1 else "warning"
    logging.getLogger().setLevel(getattr(logging, level.upper(), logging.WARNING))
    try:
        if rank == 0:
            return _main_rank0(spec, group, options, say)
        return _main_follower(spec, group, rank, options.model, options.engine, say)
    except Exception as exc:  # noqa: BLE001 - one line per rank, never a traceback
        say(f"cannot start: {exc}")
        if rank == 0:
            _emit({"event": "error", "message": str(exc)})
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def _main_rank0(spec: ClusterSpec, group: Any, options: Any, say: Callable[[str], None]) -> int:
    import mlx.core as mx

    from lmlink.engine.types import EngineStopped

    statuses = [RankStatus(r.rank, r.host.name, r.host.address) for r in spec.ranks]
    statuses[0].pid = os.getpid()
    linger = float(os.environ.get(ENV_LINGER, "10"))
    runtime: Rank0 | None = None
    files_root: Path | None = None
    if spec.weights == "rank0":
        from lmlink.engine.loader import resolve_model_path

        files_root = resolve_model_path(options.model, progress=say)[2]

    def on_failure(status: RankStatus, why: str) -> None:
        error = EngineStopped(f"rank {status.rank} ({status.host}) stopped responding: {why}")
        _emit({"event": "cluster-failed", "rank": status.rank, "host": status.host,
               "message": str(error), "linger": linger})
        say(str(error))
        if runtime is not None and runtime.engine is not None:
            runtime.engine.abort(error)

        def leave() -> None:  # keep answering health (NOT_SERVING) a while, then go
            time.sleep(linger)
            os._exit(3)

        threading.Thread(target=leave, daemon=True).start()

    def on_progress(status: RankStatus) -> None:
        say(f"rank {status.rank} ({status.host}): {status.message}")
        _emit({"event": "progress", "rank": status.rank, "host": status.host,
               "pid": status.pid, "message": status.message})

    control = ControlServer(statuses, ("0.0.0.0" if spec.ranks[0].host.address in ("", "*")
                                       else spec.ranks[0].host.address, spec.control_port),
                            spec.heartbeat_timeout, on_failure, on_progress, files_root)
    # Tell every rank where the side channel is (the only collective before loading).
    mx.eval(mx.distributed.all_sum(mx.array([control.port], dtype=mx.int32), group=group))
    runtime = Rank0(spec, group, control, options.model, options.engine)
    return _serve(options, runtime, say)


def _serve(options: Any, runtime: Rank0, say: Callable[[str], None]) -> int:
    """Rank 0 serves like `lmlink serve --json`: one ready line, or one error line."""
    import asyncio

    from lmlink.engine.types import EngineError
    from lmlink.server import ServeError, serve

    def on_ready(running: Any) -> None:
        _emit({"event": "ready", "grpc": running.grpc_address, "http": running.http_address,
               "model": running.registry.resolve("").model_id, "listen": options.listen,
               "tls_fingerprint": running.tls_fingerprint or None})

    try:
        asyncio.run(serve(options, on_ready=on_ready, on_progress=say, cluster=runtime))
    except (ServeError, EngineError, OSError, RuntimeError) as exc:
        _emit({"event": "error", "message": str(exc)})
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _main_follower(spec: ClusterSpec, group: Any, rank: int, model: str, config: Any,
                   say: Callable[[str], None]) -> int:
    import mlx.core as mx

    from lmlink.engine.engine import Engine
    from lmlink.engine.lockstep import DistributedBroadcaster

    # Leaving is rank 0's call (a shutdown command); the launcher kills what is left after that.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    port = int(mx.distributed.all_sum(mx.array([0], dtype=mx.int32), group=group).item())
    address = (spec.ranks[0].host.address, port)
    beat = Heartbeat(address, rank)

    def progress(msg: str) -> None:
        say(msg)
        beat.send(message=msg)

    path = None
    if spec.weights == "rank0" and not spec.ranks[rank].host.local:
        from lmlink.engine.loader import BUILTIN_MODEL_ID, resolve_model_path

        model_id = resolve_model_path(model)[0] if model in ("builtin", BUILTIN_MODEL_ID) \
            else model
        cache = Path(os.environ.get(defaults.ENV_WEIGHTS_DIR,
                                    Path.home() / ".cache" / "lmlink" / "cluster-weights"))
        path = fetch_files(address, cache / model_id.replace("/", "--"), progress=progress)
        model = str(path)
    loaded = load_shard(spec, group, model, progress, path)
    beat.send(state="loaded", model_bytes=loaded.memory_bytes)
    mx.eval(mx.distributed.all_sum(mx.array([1]), group=group))
    engine = Engine(loaded, config, lockstep=DistributedBroadcaster(group))
    beat.tokens = lambda: engine._generated_tokens
    beat.send(state="ready", message="serving")
    engine.run_follower()
    beat.send(state="stopped", message="stopped")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
