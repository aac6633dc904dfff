"""lmlink: a private MLX inference service for your tailnet."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
