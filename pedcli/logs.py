"""Logging: the library logs through the standard `logging` module, under the `pedcli` logger.

Modules take `logging.getLogger(__name__)` and only log; `log_to` decides, for the span of one command,
where the records go, per rank of a `torchrun` launch (each rank is its own process):

- rank 0: to the console, a Rich console on stderr (plain text, never Rich markup: messages carry paths
  and captions; warnings in yellow), and to a log file (a run's train.log: "date time message" lines);
- other ranks: warnings and errors only, on stderr as "rank N: message" (they would repeat rank 0's info).

Every record carries its `rank`. Without `log_to` nothing is printed (a library stays quiet by default).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console

ROOT = "pedcli"
FILE_FORMAT = "%(asctime)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

logging.getLogger(ROOT).addHandler(logging.NullHandler())  # no "last resort" printing to library callers


class _Rank(logging.Filter):
    """Stamps each record with this process's rank."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


class RichConsoleHandler(logging.Handler):
    """Records as whole lines on a Rich console: no markup, no highlighting, no wrapping (a long path
    stays copyable); warnings and errors in yellow, or the record's own `style` (`extra={"style": …}`)."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        warn = "yellow" if record.levelno >= logging.WARNING else None
        style = getattr(record, "style", None) or warn
        try:
            text = self.format(record)
            self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)
        except Exception:  # logging must never break the work it reports on
            self.handleError(record)


@contextlib.contextmanager
def log_to(
    *, rank: int = 0, console: Console | bool | None = None, file: str | Path | None = None
) -> Iterator[logging.Logger]:
    """Send `pedcli` records (INFO and up) to `console` (True: a new stderr console) and append them to
    `file` on rank 0, warnings only to stderr on the other ranks; undone on exit. The file is opened at
    the first record, so a command that logs nothing leaves no file behind."""
    logger = logging.getLogger(ROOT)
    handlers: list[logging.Handler] = []
    if rank == 0:
        if console:
            handlers.append(RichConsoleHandler(Console(stderr=True) if console is True else console))
        if file is not None:
            to_file = logging.FileHandler(file, mode="a", encoding="utf-8", delay=True)
            to_file.setFormatter(logging.Formatter(FILE_FORMAT, DATE_FORMAT))
            handlers.append(to_file)
    else:
        others = logging.StreamHandler()  # stderr
        others.setLevel(logging.WARNING)
        others.setFormatter(logging.Formatter("rank %(rank)s: %(message)s"))
        handlers.append(others)
    for handler in handlers:
        handler.addFilter(_Rank(rank))
        logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield logger
    finally:
        logger.setLevel(level)
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
