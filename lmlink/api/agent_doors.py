"""The Responses and Anthropic doors' routes, for the server's bridge (backend:
lmlink.api.core_backend) and `lmlink link` (backend: lmlink.link.doors).

Nothing here may import the engine or MLX: the link runs on laptops without them."""

from __future__ import annotations

from starlette.routing import Route

from .anthropic_door import AnthropicDoor
from .door_common import DoorBackend, ResponseStore
from .responses_door import ResponsesDoor

# JSON-only POST paths (the browser guard refuses other media types on them).
AGENT_PATHS = ("/v1/responses", "/v1/messages", "/v1/messages/count_tokens")


def agent_routes(backend: DoorBackend, store: ResponseStore | None = None) -> list[Route]:
    responses = ResponsesDoor(backend, store)
    anthropic = AnthropicDoor(backend)
    return [
        Route("/v1/responses", responses.create, methods=["POST"]),
        Route("/v1/messages", anthropic.messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", anthropic.count_tokens, methods=["POST"]),
    ]
