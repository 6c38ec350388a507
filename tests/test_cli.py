"""Project-folder defaults (pedcli/engine/project.py) and the CLI lines that use them: which dataset,
cache and run a command picks when given no path, the one line saying why, and the refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pedcli.cli import app
from pedcli.data.cache import META
from pedcli.engine import project, runs
from pedcli.engine.project import (
    default_cache_dir,
    detect_dataset,
    new_run_dir,
    pick_cache,
    pick_dataset,
    pick_run,
)
from pedcli.errors import PedError


def _annotations(folder: Path, name: str, keypoints: bool = False) -> Path:
    """A one-record annotation file (detection reads only the file, never the images)."""
    record = {"id": 1, "file_path": "imgs/a.jpg", "captions": ["a man"], "split": "train"}
    if keypoints:
        record["keypoints"] = [[1.0, 2.0, 1.0]] * 14
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps([record]), encoding="utf-8")
    return folder


def _aged(path: Path, seconds_ago: float) -> None:
    t = path.stat().st_mtime - seconds_ago
    os.utime(path, (t, t))


def _fake_run(
    folder: Path, seconds_ago: float = 0.0, checkpoints: tuple[str, ...] = ("best", "last")
) -> Path:
    (folder / runs.CHECKPOINTS).mkdir(parents=True)
    (folder / runs.CONFIG).write_text("{}", encoding="utf-8")
    for name in checkpoints:
        runs.checkpoint_path(folder, name).write_bytes(b"")
    _aged(folder / runs.CONFIG, seconds_ago)
    return folder


def test_layout_names_match_the_modules_that_write_them() -> None:
    # project.py names them itself so that `ped --help` imports neither torch nor h5py
    assert project.RUN_CONFIG == runs.CONFIG
    assert project.CACHE_META == META


def test_detects_each_format_by_its_annotation_file(tmp_path: Path) -> None:
    assert detect_dataset(_annotations(tmp_path / "RSTPReid", "data_captions.json")).format == "rstpreid"
    assert detect_dataset(_annotations(tmp_path / "ICFG-PEDES", "ICFG-PEDES.json")).format == "icfg-pedes"
    cuhk = detect_dataset(_annotations(tmp_path / "CUHK-PEDES", "reid_raw.json"))
    synth = detect_dataset(_annotations(tmp_path / "synth", "reid_raw.json", keypoints=True))
    assert (cuhk.format, cuhk.pose_source) == ("cuhk-pedes", "blazepose")
    assert (synth.format, synth.pose_source) == ("synth", "annotations")
    assert detect_dataset(tmp_path / "empty") is None
    assert default_cache_dir(cuhk, tmp_path) == tmp_path / "cache" / "cuhk-pedes"


def test_one_folder_with_two_formats_is_refused(tmp_path: Path) -> None:
    both = _annotations(_annotations(tmp_path / "mixed", "data_captions.json"), "ICFG-PEDES.json")
    with pytest.raises(PedError, match="several formats") as err:
        detect_dataset(both)
    assert "--dataset" in err.value.hint


def test_no_dataset_names_where_it_looked_and_both_ways_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(PedError) as err:
        pick_dataset(project=tmp_path)
    assert str(tmp_path / "data") in err.value.message
    assert "ped synth" in err.value.hint and "data/README.md" in err.value.hint


def test_the_only_dataset_is_picked_and_two_are_refused_with_the_flags(tmp_path: Path) -> None:
    _annotations(tmp_path / "data" / "synth", "reid_raw.json", keypoints=True)
    (tmp_path / "data" / "notes").mkdir()  # a folder without an annotation file is no candidate
    found, why = pick_dataset(project=tmp_path)
    assert found.format == "synth" and "the only dataset" in why
    _annotations(tmp_path / "data" / "RSTPReid", "data_captions.json")
    with pytest.raises(PedError, match="2 datasets") as err:
        pick_dataset(project=tmp_path)
    assert f"--root {tmp_path / 'data' / 'RSTPReid'} --dataset rstpreid" in err.value.hint
    assert f"--root {tmp_path / 'data' / 'synth'} --dataset synth" in err.value.hint
    # --dataset narrows the candidates; --root picks one whatever else is there
    assert pick_dataset(dataset="rstpreid", project=tmp_path)[0].format == "rstpreid"
    assert pick_dataset(root=tmp_path / "data" / "synth", project=tmp_path)[0].format == "synth"
    named, _ = pick_dataset(root=tmp_path / "data" / "synth", dataset="synth", project=tmp_path)
    assert named.pose_source == "annotations"  # read from the records, not from the format's name


def test_new_runs_never_reuse_a_name(tmp_path: Path) -> None:
    assert new_run_dir("mgel", tmp_path).path == tmp_path / "runs" / "mgel"
    (tmp_path / "runs" / "mgel").mkdir(parents=True)
    assert new_run_dir("mgel", tmp_path).path == tmp_path / "runs" / "mgel-2"
    (tmp_path / "runs" / "mgel-2").mkdir()
    pick = new_run_dir("mgel", tmp_path)
    assert pick.path == tmp_path / "runs" / "mgel-3" and "2 earlier mgel run(s)" in pick.why
    assert new_run_dir("han", tmp_path).path == tmp_path / "runs" / "han"


def test_newest_run_with_the_checkpoint_is_picked(tmp_path: Path) -> None:
    with pytest.raises(PedError, match="no trained run"):
        pick_run(tmp_path)
    _fake_run(tmp_path / "runs" / "old", seconds_ago=300)
    _fake_run(tmp_path / "runs" / "mid", seconds_ago=200)
    _fake_run(tmp_path / "runs" / "new", seconds_ago=100, checkpoints=())  # still in its first epoch
    pick = pick_run(tmp_path)
    assert pick.path.name == "mid" and pick.why.startswith("newest of 2 runs")
    _fake_run(tmp_path / "runs" / "newest", seconds_ago=0, checkpoints=("last",))
    assert pick_run(tmp_path).path.name == "mid"
    assert pick_run(tmp_path, checkpoint="last").path.name == "newest"


def test_newest_cache_is_picked(tmp_path: Path) -> None:
    with pytest.raises(PedError, match="no cache") as err:
        pick_cache(tmp_path)
    assert "ped preprocess" in err.value.hint
    for name, age in (("a", 50), ("b", 10), ("c", 30)):
        (tmp_path / "cache" / name).mkdir(parents=True)
        (tmp_path / "cache" / name / META).write_text("{}", encoding="utf-8")
        _aged(tmp_path / "cache" / name / META, age)
    pick = pick_cache(tmp_path)
    assert pick.path.name == "b" and pick.why.startswith("newest of 3 caches")


def test_commands_without_paths_in_an_empty_folder_say_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    expected = {
        ("preprocess",): "ped synth",
        ("train", "--method", "baseline"): "ped preprocess",
        ("eval",): "ped train",
        ("query", "a man", "--gallery", "."): "ped train",
    }
    for args, fix in expected.items():
        result = runner.invoke(app, list(args))
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and fix in result.output and "Traceback" not in result.output
    assert not any(tmp_path.iterdir())  # nothing was created on the way


def test_preprocess_refuses_two_datasets_with_the_flag_for_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _annotations(tmp_path / "data" / "synth", "reid_raw.json", keypoints=True)
    _annotations(tmp_path / "data" / "CUHK-PEDES", "reid_raw.json")
    result = CliRunner().invoke(app, ["preprocess"])
    assert result.exit_code == 2
    assert "--root data/CUHK-PEDES --dataset cuhk-pedes" in result.output
    assert "--root data/synth --dataset synth" in result.output
    assert not (tmp_path / "cache").exists()
