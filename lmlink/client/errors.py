"""Client exceptions: one class per gRPC status a caller may want to handle."""

from __future__ import annotations

import grpc

from lmlink import ERROR_CODE_KEY as CODE_KEY
from lmlink import ERROR_KIND_KEY as KIND_KEY


class LmlinkError(Exception):
    """Any failed call; `code` is the gRPC status, `str(exc)` a one-line reason.

    `kind` is the server's name for the failure (e.g. "overloaded" vs "resource_exhausted",
    both RESOURCE_EXHAUSTED; see lmlink.api.errors.ErrorKind), `reason` its finer code
    (e.g. "quota_exceeded"), `retry_after` seconds to wait; empty/None when not sent.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None, *, kind: str = "",
                 reason: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.kind = kind
        self.reason = reason
        self.retry_after = retry_after


class InvalidArgument(LmlinkError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LmlinkError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(LmlinkError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(LmlinkError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(LmlinkError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LmlinkError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LmlinkError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LmlinkError):
    code = grpc.StatusCode.CANCELLED


class AlreadyExists(LmlinkError):
    code = grpc.StatusCode.ALREADY_EXISTS


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        AlreadyExists,
    )
}


def from_rpc_error(error: grpc.RpcError, target: str = "") -> LmlinkError:
    """Turn grpc's error into ours, with a message a person can act on."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    if code == grpc.StatusCode.UNAVAILABLE and target and (
        not details or "connect" in details.lower() or "failed to" in details.lower()
    ):
        details = f"cannot reach lmlink server at {target} ({details})"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"deadline exceeded: {details}" if details else "deadline exceeded"
    meta = _trailers(error)
    retry = meta.get("retry-after", "")
    cls = _BY_CODE.get(code, LmlinkError)
    return cls(details or code.name.lower(), code, kind=meta.get(KIND_KEY, ""),
               reason=meta.get(CODE_KEY, ""),
               retry_after=float(retry) if retry.replace(".", "", 1).isdigit() else None)


def _trailers(error: grpc.RpcError) -> dict[str, str]:
    try:
        pairs = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:  # not a call error (e.g. a channel failure)
        return {}
    return {k: v for k, v in pairs if isinstance(v, str)}
