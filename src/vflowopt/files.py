"""Writing files the way users expect: atomically, with the permissions any new file of theirs gets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_text"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str, newline: str | None = None) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename, so a reader never
    sees half a file and a failure leaves the old one. The file gets 0o666 minus the umask, as open()
    would give it (mkstemp alone makes it private, 0o600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
