"""One error type the CLI knows how to print: what is wrong, and what to do about it.

`refuse` is the one way library code turns a bad input into that error; `write_error` names the cause of
a failed write (disk full, read-only, permission) instead of letting the OS or a library's text through.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import NoReturn


class PedError(Exception):
    """A user-facing error. `hint` says how to fix it; the CLI prints both and exits 2."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


def refuse(message: str, fix: str | None = None) -> NoReturn:
    """Stop with `error: message` / `fix: fix` (exit 2 at the CLI); never a traceback."""
    raise PedError(message, fix)


def mount_point(path: str | Path) -> Path:
    """The mount point (the "device" a user frees space on) holding `path` or its nearest existing parent."""
    p = Path(os.path.abspath(path))
    while not p.exists():
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_error(e: OSError, path: str | Path) -> PedError | None:
    """The PedError for a failed write of `path` when the cause is the disk or the permissions, else None."""
    if e.errno in NO_SPACE:
        return PedError(
            f"no space left on {mount_point(path)} while writing {path}",
            "free some space there, or write the output to another disk",
        )
    if e.errno in NOT_WRITABLE:
        why = "read-only file system" if e.errno == errno.EROFS else "permission denied"
        return PedError(f"cannot write {path} ({why})", "choose a folder you can write to")
    if e.errno in (errno.ENOTDIR, errno.EISDIR):
        return PedError(f"cannot write {path} ({os.strerror(e.errno)})", "choose another output path")
    return None
