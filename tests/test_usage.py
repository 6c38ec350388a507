"""The usage lines work as written: the README's quick start, run in a new empty folder, with no other
option (issue 9). Each line goes through the real `ped` command-line parser (in-process, to spare five
interpreter start-ups) with the folder as the working directory."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pedcli.cli import app
from pedcli.engine import runs

README = Path(__file__).resolve().parents[1] / "README.md"

# `ped synth` alone renders 300 people, and one MGEL epoch over them at 384×128 takes many minutes of CPU;
# 20 people (16 train) keep the whole test near a minute and still fill MGEL's batch of 32 (16 people × 2
# captions). Only `ped synth` gets a size flag: every other line is exactly the README's.
SYNTH_SIZE = ["--identities", "20"]


def quick_start() -> list[str]:
    """The command lines of the README's quick-start code block."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README.md's quick start has no ```bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_quick_start_is_the_usage_lines() -> None:
    assert quick_start() == [
        "ped synth",
        "ped preprocess",
        "ped train --method mgel --epochs 1",
        "ped eval",
        'ped query "woman in red shirt" --gallery data/synth/imgs',
        "ped runs",
    ]


@pytest.mark.slow
def test_usage_lines_in_a_new_empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    outputs = {}
    for line in quick_start():
        args = shlex.split(line)[1:]
        result = runner.invoke(app, args + (SYNTH_SIZE if args == ["synth"] else []))
        assert result.exit_code == 0, f"`{line}` failed:\n{result.output}"
        outputs[args[0]] = result.output

    assert (tmp_path / "data" / "synth" / "reid_raw.json").is_file()
    assert (
        "dataset data/synth (the only dataset under data/, format synth) → cache cache/synth"
        in (outputs["preprocess"])
    )
    assert "using cache cache/synth (the only cache under cache/)" in outputs["train"]
    assert "writing run runs/mgel (a new folder)" in outputs["train"]
    run = tmp_path / "runs" / "mgel"
    assert runs.checkpoint_path(run, "best").is_file()
    for command in ("eval", "query"):
        assert "using run runs/mgel (the only run under runs/)" in outputs[command]
    assert (run / runs.EVAL.format(split="test")).is_file()  # `ped runs` shows its test R@1
    assert "woman in red shirt" in outputs["query"]
    assert re.search(r"mgel\s.*synth\s.*1/1\s.*finished", outputs["runs"])
