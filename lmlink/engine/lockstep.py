"""Step commands and how they reach every rank.

Each engine iteration, rank 0 decides what changes in the batch (admit these requests, remove
those) and hands the decision to a `Broadcaster`. Every rank, rank 0 included, then applies the
very same `StepCommands` to its own BatchGenerator and prompt cache and calls `next()`, so the
batches on all ranks stay identical and the collectives inside the model line up.

A single-process engine uses `LocalBroadcaster` (a no-op): it runs the same code path, so
cluster and single-node behaviour cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .types import SamplingOptions


@dataclass(frozen=True)
class Admit:
    """Insert a request into the batch: everything a rank needs to compute identical tokens."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    sampling: SamplingOptions  # random sampling always carries a concrete seed
    cached: int = 0  # prompt tokens rank 0 found in its prompt cache (others must find the same)


@dataclass(frozen=True)
class Remove:
    """Take a request out of the batch; reason 'stop' (stop string: keep its cache) or 'cancelled'."""

    request_id: str
    reason: str


@dataclass
class StepCommands:
    admits: list[Admit] = field(default_factory=list)
    removes: list[Remove] = field(default_factory=list)
    shutdown: bool = False

    def __bool__(self) -> bool:
        return bool(self.admits or self.removes or self.shutdown)

    def encode(self) -> bytes:
        body = {
            "a": [
                [a.request_id, a.prompt, a.max_tokens, _sampling_to_dict(a.sampling), a.cached]
                for a in self.admits
            ],
            "r": [[r.request_id, r.reason] for r in self.removes],
            "s": self.shutdown,
        }
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> "StepCommands":
        body = json.loads(data)
        return cls(
            admits=[
                Admit(rid, list(prompt), int(mt), _sampling_from_dict(s), int(cached))
                for rid, prompt, mt, s, cached in body["a"]
            ],
            removes=[Remove(rid, reason) for rid, reason in body["r"]],
            shutdown=bool(body["s"]),
        )


def _sampling_to_dict(s: SamplingOptions) -> dict[str, Any]:
    d = asdict(s)
    d["stop"] = list(s.stop)
    return d


def _sampling_from_dict(d: dict[str, Any]) -> SamplingOptions:
    return SamplingOptions(**{**d, "stop": tuple(d.get("stop", ()))})


class LocalBroadcaster:
    """One process: the decision is already everywhere it needs to be."""

    rank = 0
    size = 1
    distributed = False

    def share(self, commands: StepCommands | None) -> StepCommands:
        return commands if commands is not None else StepCommands()

    def finish(self) -> None:
        pass


class DistributedBroadcaster:
    """Rank 0's step commands to every rank over an mx.distributed group.

    Per step: one 1-element all_sum carrying the payload length (0 = nothing changed); only when
    it is non-zero, a second all_sum of a uint8 buffer that is rank 0's payload on rank 0 and
    zeros elsewhere (mlx_lm.server's pattern, with JSON instead of pickle: a rank never
    unpickles bytes from the network).
    """

    distributed = True

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.steps = 0

    def share(self, commands: StepCommands | None) -> StepCommands:
        # On the generation stream: BatchGenerator keeps the next forward pass (with its own
        # collectives) in flight while we decide; one stream keeps the collective order the
        # same on every rank.
        import mlx.core as mx
        from mlx_lm.generate import generation_stream as s

        self.steps += 1
        if self.rank == 0:
            assert commands is not None
            payload = commands.encode() if commands else b""
            n = mx.distributed.all_sum(mx.array([len(payload)], dtype=mx.int32),
                                       group=self.group, stream=s)
            mx.eval(n)
            if payload:
                buf = mx.array(list(payload), dtype=mx.uint8)
                mx.eval(mx.distributed.all_sum(buf, group=self.group, stream=s))
            return commands
        n = mx.distributed.all_sum(mx.array([0], dtype=mx.int32), group=self.group,
                                   stream=s).item()
        if n == 0:
            return StepCommands()
        buf = mx.distributed.all_sum(mx.zeros((n,), dtype=mx.uint8), group=self.group, stream=s)
        mx.eval(buf)
        return StepCommands.decode(bytes(memoryview(buf)))

    def finish(self) -> None:
        """The last collective of a run (every distributed run ends with a barrier)."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        mx.eval(mx.distributed.all_sum(mx.array([1], dtype=mx.int32), group=self.group,
                                       stream=generation_stream))


class LockstepError(RuntimeError):
    """A rank's state diverged from rank 0's (a bug): the cluster cannot continue."""
