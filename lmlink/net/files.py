"""Files that hold secrets: directories 0700, files 0600, never readable by others even briefly."""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def private_dir(path: Path) -> Path:
    """Create (or tighten) a directory to mode 0700: it holds private keys."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically write a file created with `mode` from the start (temp file + rename).

    The temp file's name is unique (mkstemp, created 0600), so threads or processes writing
    the same file at once never share one: each rename installs one whole version."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_private(path: Path) -> bytes:
    """Read a key file, first tightening it to 0600 if group/others could read it."""
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        log.warning("tightening permissions of %s to 0600", path)
        os.chmod(path, 0o600)
    return path.read_bytes()
