"""Python clients for lmlink servers (no MLX needed on the client side)."""

from .aio import AsyncClient, AsyncGenerationStream
from .errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    LmlinkError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .events import Completed, Event, Generation, PromptProgress, Started, TokenDelta
from .info import LoadProgress, ModelInfo, ServerInfo, UnloadResult
from .sync import Client, GenerationStream

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AsyncGenerationStream",
    "Cancelled",
    "Client",
    "Completed",
    "DeadlineExceeded",
    "Event",
    "Generation",
    "GenerationStream",
    "InvalidArgument",
    "LoadProgress",
    "LmlinkError",
    "ModelInfo",
    "NotFound",
    "PermissionDenied",
    "PromptProgress",
    "ResourceExhausted",
    "ServerInfo",
    "Started",
    "TokenDelta",
    "Unauthenticated",
    "Unavailable",
    "UnloadResult",
]
