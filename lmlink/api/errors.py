"""One error vocabulary for every door: a kind, and what it is called on each wire.

Why one table: the gRPC servicer, the HTTP bridge, `lmlink link` and the clients used to
keep their own mappings, and they drifted (an overloaded engine was `overloaded` through the
bridge but `rate_limited` through the link). Now the core raises one `CallError` carrying an
`ErrorKind`; each door maps it at its edge from this table, and the link maps a gRPC error
back through the same table (the server sends the kind in trailing metadata).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

import grpc

from lmlink import ERROR_CODE_KEY as CODE_KEY
from lmlink import ERROR_KIND_KEY as KIND_KEY

RETRY_KEY = "retry-after"


@dataclass(frozen=True)
class _Wire:
    grpc: grpc.StatusCode
    http: int
    openai: str  # OpenAI's error `code`
    anthropic: str  # Anthropic's error `type`


class ErrorKind(str, Enum):
    """Why a call failed, independent of the door it came through."""

    INVALID_ARGUMENT = "invalid_argument"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA = "unsupported_media_type"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    RESOURCE_EXHAUSTED = "resource_exhausted"  # a quota or a per-caller limit
    OVERLOADED = "overloaded"  # the server is busy; any caller would get this now
    LOADING = "loading"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    UPSTREAM = "upstream"  # the link: the remote server failed after answering began
    INTERNAL = "internal"

    @property
    def wire(self) -> _Wire:
        return _TABLE[self]

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return _TABLE[self].grpc

    @property
    def http_status(self) -> int:
        return _TABLE[self].http

    @property
    def openai_code(self) -> str:
        return _TABLE[self].openai

    @property
    def anthropic_type(self) -> str:
        return _TABLE[self].anthropic


S = grpc.StatusCode
_TABLE: dict[ErrorKind, _Wire] = {
    ErrorKind.INVALID_ARGUMENT: _Wire(S.INVALID_ARGUMENT, 400, "invalid_request", "invalid_request_error"),
    ErrorKind.TOO_LARGE: _Wire(S.INVALID_ARGUMENT, 413, "request_too_large", "request_too_large"),
    ErrorKind.UNSUPPORTED_MEDIA: _Wire(S.INVALID_ARGUMENT, 415, "unsupported_media_type", "invalid_request_error"),
    ErrorKind.UNAUTHENTICATED: _Wire(S.UNAUTHENTICATED, 401, "unauthenticated", "authentication_error"),
    ErrorKind.PERMISSION_DENIED: _Wire(S.PERMISSION_DENIED, 403, "permission_denied", "permission_error"),
    ErrorKind.NOT_FOUND: _Wire(S.NOT_FOUND, 404, "model_not_found", "not_found_error"),
    ErrorKind.ALREADY_EXISTS: _Wire(S.ALREADY_EXISTS, 409, "duplicate_request_id", "invalid_request_error"),
    ErrorKind.RESOURCE_EXHAUSTED: _Wire(S.RESOURCE_EXHAUSTED, 429, "rate_limited", "rate_limit_error"),
    ErrorKind.OVERLOADED: _Wire(S.RESOURCE_EXHAUSTED, 429, "overloaded", "overloaded_error"),
    ErrorKind.LOADING: _Wire(S.UNAVAILABLE, 503, "model_loading", "overloaded_error"),
    ErrorKind.UNAVAILABLE: _Wire(S.UNAVAILABLE, 503, "unavailable", "api_error"),
    ErrorKind.DEADLINE_EXCEEDED: _Wire(S.DEADLINE_EXCEEDED, 504, "timeout", "api_error"),
    ErrorKind.CANCELLED: _Wire(S.CANCELLED, 499, "cancelled", "api_error"),
    ErrorKind.UPSTREAM: _Wire(S.UNAVAILABLE, 502, "upstream_failed", "api_error"),
    ErrorKind.INTERNAL: _Wire(S.INTERNAL, 500, "internal_error", "api_error"),
}
del S

# A gRPC status from a server that did not say which kind (or an older server).
_BY_GRPC: dict[grpc.StatusCode, ErrorKind] = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorKind.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED: ErrorKind.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: ErrorKind.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND: ErrorKind.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: ErrorKind.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorKind.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE: ErrorKind.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorKind.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED: ErrorKind.CANCELLED,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorKind.INVALID_ARGUMENT,
}


def kind_of_status(code: grpc.StatusCode, named: str | None = None) -> ErrorKind:
    """The kind of a gRPC failure: the one the server named, else by status."""
    if named:
        try:
            return ErrorKind(named)
        except ValueError:
            pass
    return _BY_GRPC.get(code, ErrorKind.INTERNAL)


def kind_of(exc: BaseException) -> ErrorKind:
    """The kind an exception carries (engine errors and refusals do), else INTERNAL."""
    kind = getattr(exc, "kind", None)
    if isinstance(kind, str):
        try:
            return ErrorKind(kind)
        except ValueError:
            pass
    return ErrorKind.INTERNAL


class CallError(Exception):
    """The one exception the call core raises; each door maps it at its edge.

    `code` overrides the OpenAI code for a finer reason (e.g. `quota_exceeded`); `param`
    names the offending field; `extra` adds top-level fields to an HTTP error body.
    """

    def __init__(
        self,
        kind: ErrorKind | str,
        message: str,
        *,
        retry_after: float | None = None,
        code: str | None = None,
        param: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = ErrorKind(kind)
        self.message = message
        self.retry_after = retry_after
        self.code = code or self.kind.openai_code
        self.param = param
        self.extra = dict(extra or {})

    @classmethod
    def of(cls, exc: BaseException) -> "CallError":
        """A CallError for any exception carrying a kind (engine errors); INTERNAL otherwise."""
        if isinstance(exc, CallError):
            return exc
        kind = kind_of(exc)
        # Errors that carry a kind were written for the caller; others may hold anything.
        message = str(exc) if hasattr(exc, "kind") else "internal error"
        retry = {ErrorKind.OVERLOADED: 1.0, ErrorKind.UNAVAILABLE: 5.0}.get(kind)
        return cls(kind, message or kind.value, retry_after=retry)

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return self.kind.grpc_status

    @property
    def http_status(self) -> int:
        return self.kind.http_status

    def retry_seconds(self) -> int | None:
        return None if self.retry_after is None else max(1, math.ceil(self.retry_after))

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        out = [(KIND_KEY, self.kind.value), (CODE_KEY, self.code)]
        s = self.retry_seconds()
        if s is not None:
            out.append((RETRY_KEY, str(s)))
        return tuple(out)
