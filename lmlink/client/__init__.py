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
from .events import Completed, Event, Generation, Logprob, PromptProgress, Started, TokenDelta, ToolCall
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
    "Logprob",
    "ModelInfo",
    "NotFound",
    "PermissionDenied",
    "PromptProgress",
    "ResourceExhausted",
    "ServerInfo",
    "Started",
    "TokenDelta",
    "ToolCall",
    "Unauthenticated",
    "Unavailable",
    "UnloadResult",
]
