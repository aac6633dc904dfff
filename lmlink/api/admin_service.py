"""The gRPC `lmlink.v1.Admin` servicer: the owner's share/token/usage commands over the tailnet.

Only the node owner may call it (the tailnet identity of the owner's own devices, the
loopback user in local mode, or an owner-bound bearer token). The command runs in
`lmlink.access.admin`, exactly as `lmlink share ... --state-dir` would run it, then the guard
re-checks running streams so a revocation cuts them at once.
"""

from __future__ import annotations

import json

import grpc

from lmlink.access.admin import COMMANDS, run
from lmlink.access.shares import NotFound, ShareError
from lmlink.access.store import StoreError
from lmlink.v1 import admin_pb2 as pb
from lmlink.v1 import admin_pb2_grpc as pb_grpc

from .core import Core


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, core: Core) -> None:
        self._core = core
        self._guard = core.guard

    async def Run(self, request: pb.AdminRequest, context: grpc.aio.ServicerContext) -> pb.AdminReply:
        metadata = dict(context.invocation_metadata() or ())
        # the same identity call as every other door (a CallError is mapped by add_servicer)
        caller = await self._core.identify(context.peer(), metadata.get("authorization"))
        identity = caller.identity
        if not identity.is_owner:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity.label} is not the owner of this server; only the owner may "
                f"manage shares, tokens and usage",
            )
        access = self._guard.access
        if access is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this server keeps no access state")
        assert access is not None
        if request.command not in COMMANDS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown admin command {request.command!r}")
        try:
            args = json.loads(request.arguments_json or "{}")
            result = run(access, request.command, args, actor=identity.login_name or "owner")
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (ShareError, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc).splitlines()[0])
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        access.reload()
        self._guard.revalidate()
        return pb.AdminReply(result_json=json.dumps(result))
