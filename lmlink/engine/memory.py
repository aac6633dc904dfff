"""Give freed KV-cache memory back to the operating system when the engine goes idle.

Prompt caches and batch buffers are large (tens of MB) and come and go with every request.
glibc serves such blocks from its heap once a few have been freed (it raises its mmap
threshold), and keeps freed heap memory for reuse: an idle server then stays hundreds of MB
larger than what it holds. `malloc_trim` hands those pages back. It is called when the last
request ends, not per request: keeping blocks mapped for good (a fixed mmap threshold) made a
cold 1,500-token prefill 4 % slower here (new pages to fault in for every buffer), while a trim
on an idle engine costs nobody anything. Elsewhere (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

_libc: Any = None


def _load() -> Any:
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.malloc_trim  # noqa: B018 - glibc only
                _libc = libc
            except (OSError, AttributeError):
                pass
    return _libc


def return_freed_memory() -> bool:
    """Return the allocator's free pages to the system; True if anything was released."""
    libc = _load()
    return bool(libc and libc.malloc_trim(0))
