"""`lmlink.v1.Observe`: the status snapshot over gRPC, for `lmlink top` (translation only)."""

from __future__ import annotations

from typing import Any

import grpc

from lmlink.v1 import observe_pb2 as pb

from .core import Core
from .errors import CallError
from .grpc_service import abort
from .status_door import StatusViews


class ObserveService:
    def __init__(self, core: Core, views: StatusViews) -> None:
        self.core = core
        self.views = views

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.ServerStatus:
        try:
            metadata = dict(context.invocation_metadata() or ())
            caller = await self.core.identify(context.peer(), metadata.get("authorization"))
            self.core.require(caller, "info")
        except CallError as error:
            await abort(context, error)
        return status_to_wire(self.views.snapshot())


def status_to_wire(snap: dict[str, Any]) -> pb.ServerStatus:
    cluster = snap.get("cluster") or {}
    return pb.ServerStatus(
        server=snap.get("server", ""),
        uptime_seconds=snap.get("uptime_s", 0.0),
        draining=bool(snap.get("draining")),
        models=[pb.ModelStatus(**{k: m[k] for k in pb.ModelStatus.DESCRIPTOR.fields_by_name if k in m})
                for m in snap.get("models", [])],
        active=[pb.ActiveStream(**a) for a in snap.get("active", [])],
        tokens_per_second=[pb.RateSample(**r) for r in snap.get("tokens_per_second", [])],
        recent_refusals=[pb.RefusalRecord(**r) for r in snap.get("recent_refusals", [])],
        ranks=[pb.RankStatus(**r) for r in cluster.get("ranks", [])],
        outcomes=snap.get("outcomes", {}),
        cluster_backend=cluster.get("backend", ""),
    )
