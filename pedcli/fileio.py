"""Atomic writes, output checks and content hashing, shared by every stage that writes artifacts."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pedcli.errors import NO_SPACE, PedError, refuse, write_error

PARTIAL = ".partial"
# who writes a partial file: host and pid, so a later run can tell a dead writer's leftover from a live one
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
_LOW_SPACE = 1 << 20  # bytes free under which a write error without errno is taken for a full disk


def _owner() -> str:
    return f"{_HOST}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_partials(target: str | Path) -> list[Path]:
    """Delete the partial files of `target` whose writer (on this host) no longer runs: what a killed
    `atomic_path` leaves. A live writer's partial file, or one from another host, is kept."""
    target = Path(target)
    removed = []
    head = f".{target.name}."
    for p in target.parent.glob(f"{glob.escape(head)}*{PARTIAL}"):
        host, _, pid = p.name[len(head) :].split(".", 1)[0].rpartition("-")
        if host == _HOST and pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def remove_stale_partials_in(folder: str | Path) -> list[Path]:
    """`remove_stale_partials` for every target in `folder`, at the start of a stage that writes there."""
    folder = Path(folder)
    targets = {p.name[1:].split(f".{_HOST}-", 1)[0] for p in folder.glob(f".*{PARTIAL}")}
    return [p for name in sorted(targets) for p in remove_stale_partials(folder / name)]


def _disk_full(folder: Path) -> bool:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(folder).free < _LOW_SPACE
    return False


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on error delete it.

    A reader never sees a half-written file; a killed writer leaves only a `.partial` file, removed by the
    next write of the same path. A full disk or an unwritable folder is a PedError naming the cause.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.{_owner()}.", suffix=f"{suffix}{PARTIAL}", dir=path.parent
        )
    except OSError as e:
        raise (write_error(e, path) or e) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        # libraries (h5py, torch) may report a full disk without errno; the free space tells
        if isinstance(e, OSError) and e.errno is not None:
            if e.errno in NO_SPACE:
                raise write_error(e, path) from e
        elif isinstance(e, (OSError, RuntimeError)) and _disk_full(path.parent):
            raise write_error(OSError(NO_SPACE[0], "no space"), path) from e
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def check_writable(path: str | Path, *, folder: bool = False) -> None:
    """Refuse, before any work is done, an output path that cannot be written.

    `folder`: the output is a folder (a run, a cache) rather than a file. Missing parents are fine (they
    are created); the nearest existing one must accept a new file (tested by creating one)."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kinds = ("file", "folder")
        refuse(f"{path} is a {kinds[path.is_dir()]}, expected a {kinds[folder]}", "choose another path")
    probe = path if folder and path.is_dir() else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        refuse(f"cannot write {path}: {probe} is not a folder", "choose another output path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".pedcli-write-test.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise (write_error(e, path) or PedError(f"cannot write {path} ({e.strerror})")) from e


def guard_overwrite(path: str | Path, kind: str, is_ours: Callable[[Path], bool], force: bool) -> None:
    """Refuse to replace an existing file that is not an earlier `kind` output (unless `force`)."""
    path = Path(path)
    if path.is_file() and not force and not is_ours(path):
        refuse(
            f"{path} exists and is not a {kind} written by pedcli; it is left untouched",
            "choose another output path, or pass --force to replace it",
        )


def check_output(path: str | Path, kind: str, is_ours: Callable[[Path], bool], force: bool) -> None:
    """Both output checks of a file output, before any work: writable, and not someone else's file."""
    check_writable(path)
    guard_overwrite(path, kind, is_ours, force)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
