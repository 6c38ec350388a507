"""Logging per rank (`pedcli.logs`): where records go, what a run's train.log holds, nothing left behind."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest
from conftest import tiny_train
from rich.console import Console

from pedcli.engine.runs import LOG, METRICS
from pedcli.logs import ROOT, log_to

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (.*)$")  # train.log: "date time message"
log = logging.getLogger("pedcli.engine.something")


def _root_handlers() -> list[type]:
    return [type(h) for h in logging.getLogger(ROOT).handlers]


def test_rank0_writes_whole_plain_lines_to_console_and_file(tmp_path: Path) -> None:
    shown, path = io.StringIO(), tmp_path / "x.log"
    before = _root_handlers()
    message = "cache /a/[bold]quite[/]/long/path/that/is/wider/than/the/console " * 2
    with log_to(console=Console(file=shown, width=20), file=path):
        log.info(message)
        log.warning("careful")
        log.debug("not shown")
    assert shown.getvalue().splitlines() == [message, "careful"]  # no markup, no wrapping
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [LINE.match(ln).group(1) for ln in lines] == [message, "careful"]
    assert _root_handlers() == before  # undone on exit
    log.warning("after")
    assert "after" not in path.read_text(encoding="utf-8") and "after" not in shown.getvalue()


def test_other_ranks_show_only_warnings_with_their_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shown, path = io.StringIO(), tmp_path / "x.log"
    with log_to(rank=2, console=Console(file=shown), file=path):
        log.info("rank 0 says this once")
        log.warning("disk nearly full")
    assert capsys.readouterr().err.splitlines() == ["rank 2: disk nearly full"]
    assert shown.getvalue() == "" and not path.exists()  # the console and the file are rank 0's


def test_a_quiet_library_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    log.warning("no handler configured")  # not Python's last-resort stderr output
    assert capsys.readouterr().err == ""


def test_train_log_of_a_run(tiny_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    tiny_train(tiny_cache, run)
    messages = [LINE.match(ln).group(1) for ln in (run / LOG).read_text(encoding="utf-8").splitlines()]
    first = f"training baseline on {tiny_cache.resolve()} (1 process(es), cpu) from stage 0 epoch 0"
    assert messages[0] == first
    epochs = len((run / METRICS).read_text(encoding="utf-8").splitlines())
    assert epochs >= 2 and sum(m.startswith("epoch ") for m in messages) == epochs
    assert messages[-1].startswith("done: best val_t2i_R@1 = ")
    assert _root_handlers() == [logging.NullHandler]  # the run's file handler is closed and removed
