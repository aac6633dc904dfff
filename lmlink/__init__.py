"""lmlink: a private MLX inference service for your tailnet."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

# Part of the wire contract next to the proto: on a failed gRPC call the server names the
# failure's kind (lmlink.api.errors.ErrorKind) and finer code in these trailing-metadata keys.
ERROR_KIND_KEY = "lmlink-error-kind"
ERROR_CODE_KEY = "lmlink-error-code"
