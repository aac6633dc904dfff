"""The observing door: the status page (`/`), its JSON (`/v1/status`) and `/metrics`.

Who may look: the status needs the `info` action (the owner, or a grant that lists it); the
Prometheus exposition needs the owner or the `metrics` action, because it names principals.
A local Prometheus that cannot present an identity scrapes the optional loopback-only port
(`lmlink serve --metrics-port`) instead.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from lmlink.observe.metrics import CONTENT_TYPE, Metrics
from lmlink.observe.status import server_status

from .core import Core
from .errors import CallError, ErrorKind
from .http_shell import PAGE_HEADERS
from .limits import Caller

_PAGE = resources.files("lmlink.observe").joinpath("static/status.html")


class StatusViews:
    """One per server: the snapshot, the metrics registry fed by the Guard's telemetry."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.draining = False
        self.metrics = Metrics(self.snapshot)
        core.guard.telemetry.listeners.append(self.metrics)

    def snapshot(self) -> dict[str, Any]:
        return server_status(self.core, self.core.guard.telemetry, name=self.core.facts.name,
                             draining=self.draining)

    def routes(self, caller: Callable[[Request], Awaitable[Caller]]) -> list[Route]:
        async def page(request: Request) -> Response:
            self.core.require(await caller(request), "info")
            return HTMLResponse(_PAGE.read_text(encoding="utf-8"), headers=PAGE_HEADERS)

        async def status(request: Request) -> Response:
            self.core.require(await caller(request), "info")
            return JSONResponse(self.snapshot(), headers={"cache-control": "no-store"})

        async def metrics(request: Request) -> Response:
            who = await caller(request)
            if not who.identity.is_owner and not self.core.guard.check(who.identity, "metrics").allowed:
                raise CallError(ErrorKind.PERMISSION_DENIED,
                                f"{who.identity.label} may not read metrics (owner or the 'metrics' action)")
            return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

        return [Route("/", page, methods=["GET"]),
                Route("/v1/status", status, methods=["GET"]),
                Route("/metrics", metrics, methods=["GET"])]
