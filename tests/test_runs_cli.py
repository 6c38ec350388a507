"""`ped runs` (list, show, compare, the training-curve plot), options files (`ped train --config`,
`ped runs show --config-out`), TensorBoard event files and the running/interrupted state of a run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import tiny_train
from PIL import Image
from typer.testing import CliRunner

from pedcli.cli import app
from pedcli.cli_options import parse_assignments, read_options_file
from pedcli.engine import runs
from pedcli.engine.run_summary import PLOT_SIZE, summarize
from pedcli.engine.train import TrainOptions, TrainResult
from pedcli.errors import PedError
from pedcli.models.methods import method_class

runner = CliRunner()


@pytest.fixture(scope="module")
def run_root(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/a (2 epochs) and runs/b (1 epoch, another lr) of the tiny baseline. Read-only."""
    root = tmp_path_factory.mktemp("project") / "runs"
    tiny_train(tiny_cache, root / "a")
    tiny_train(tiny_cache, root / "b", epochs=1, lr=0.01)
    return root


def _ped(*args: Any) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _listed(root: Path, *args: Any) -> list[dict[str, Any]]:
    return json.loads(_ped("runs", "--root", root, "--json", *args))


def test_runs_lists_each_run_with_its_progress_and_best_epoch(run_root: Path) -> None:
    rows = {r["name"]: r for r in _listed(run_root)}
    assert set(rows) == {"a", "b"}
    a = rows["a"]
    records = runs.read_metrics(run_root / "a")
    planned = sum(s["epochs"] for s in runs.read_config(run_root / "a")["stages"])
    assert (a["method"], a["epochs_done"], a["epochs_planned"], a["state"]) == (
        "baseline",
        4,
        planned,
        "finished",
    )
    best = max(records, key=lambda r: (r["val"]["R@1"], -r["epoch"]))
    assert (a["best_val_r1"], a["best_epoch"]) == (best["val"]["R@1"], best["epoch"])
    assert a["best_epoch"] == [r["epoch"] for r in records if r["best"]][-1]
    assert a["wall_s"] > 0 and a["test_r1"] is None  # not evaluated yet
    assert [r["name"] for r in _listed(run_root, "--sort", "name")] == ["a", "b"]
    assert _listed(run_root, "--method", "mgel") == []
    table = _ped("runs", "--root", run_root)
    assert "finished" in table and "baseline" in table


def test_runs_shows_the_epoch_the_engine_kept(run_root: Path, tmp_path: Path) -> None:
    """The best epoch is the one marked (best.pt), not the highest val R@1: an epoch from before the whole
    score had learned (MIA's steps 1-2) is never marked, however it scored."""
    run = shutil.copytree(run_root / "a", tmp_path / "c")
    records = runs.read_metrics(run)
    records[0]["val"]["R@1"], records[0]["best"] = 101.0, False  # as an early, incomplete epoch
    for r in records[1:]:
        r["best"] = r["epoch"] == 3
    (run / runs.METRICS).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    summary = summarize(run)
    assert (summary.best_epoch, summary.best_val_r1) == (3, records[2]["val"]["R@1"])


def test_runs_tells_interrupted_and_running_apart(run_root: Path, tmp_path: Path) -> None:
    run = shutil.copytree(run_root / "a", tmp_path / "c")
    lines = (run / runs.METRICS).read_text(encoding="utf-8").splitlines()
    (run / runs.METRICS).write_text(lines[0] + "\n", encoding="utf-8")  # killed after its first epoch
    assert summarize(run).state == "interrupted" and summarize(run).epochs_done == 1
    with runs.running(run):
        assert summarize(run).state == "running"
        with pytest.raises(PedError, match="being trained by another process"):
            tiny_train(Path(runs.read_config(run)["cache"]), run, resume=True)
    assert summarize(run).state == "interrupted"
    (run / runs.CONFIG).write_text("{", encoding="utf-8")  # cut by hand or by a full disk
    assert summarize(run).state == "damaged"
    assert {r["name"]: r["state"] for r in _listed(tmp_path)} == {"c": "damaged"}


def test_eval_of_the_runs_own_cache_is_recorded_for_runs(run_root: Path, tmp_path: Path) -> None:
    run = shutil.copytree(run_root / "b", tmp_path / "runs" / "b")
    out = _ped("eval", "--run", run, "--out", tmp_path / "m.json")
    assert "recorded in" in out
    metrics = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["t2i"]
    row = _listed(tmp_path / "runs")[0]
    assert (row["test_r1"], row["test_map"]) == (metrics["R@1"], metrics["mAP"])
    other = json.loads((tmp_path / "m.json").read_text(encoding="utf-8")) | {"cache": str(tmp_path)}
    assert runs.record_eval(other) is None  # another cache's numbers are not the run's test result


def test_show_prints_config_and_epochs_and_draws_the_curves(run_root: Path, tmp_path: Path) -> None:
    png = tmp_path / "curve.png"
    out = _ped("runs", "show", "a", "--root", run_root, "--plot", png)
    assert "train.batch_size" in out and "embed_dim" in out
    for record in runs.read_metrics(run_root / "a"):
        assert f"{record['val']['R@1']:.2f}" in out
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == PLOT_SIZE
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 10  # curves, axes and labels drawn, not a blank canvas


def test_config_out_reads_back_as_the_same_options(run_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    _ped("runs", "show", run_root / "a", "--config-out", path)
    config = runs.read_config(run_root / "a")
    file = read_options_file(path)
    assert (file.method, file.seed, str(file.cache)) == ("baseline", config["seed"], config["cache"])
    method_opts, train_opts = parse_assignments(file.items, method_class("baseline").Config, TrainOptions)
    assert runs.jsonable(method_opts) == config["method_config"]
    assert runs.jsonable(train_opts) == config["train"]


def test_train_config_file_then_set_then_flags(
    tmp_path: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    def fake_train(method: str, cache: Path, run: Path, **kwargs: Any) -> TrainResult:
        calls.append({"method": method, "cache": cache, "run": run} | kwargs)
        return TrainResult(Path(run), {"metric": "m", "value": 1.0, "epoch": 1}, [])

    monkeypatch.setattr("pedcli.engine.train.train", fake_train)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "opts.toml"
    path.write_text(
        f'method = "baseline"\nseed = 5\ncache = "{tiny_cache}"\nembed_dim = 48\nhidden = 16\n'
        "[train]\nepochs = 3\nlr = 0.1\nflip_prob = 0\n",
        encoding="utf-8",
    )
    _ped("train", "--config", path, "--set", "embed_dim=64", "--set", "train.lr=0.2", "--epochs", "4")
    (call,) = calls
    assert (call["method"], call["seed"], Path(call["cache"])) == ("baseline", 5, tiny_cache)
    assert call["method_options"] == {"embed_dim": 64, "hidden": 16}
    assert call["options"] == {"epochs": 4, "lr": 0.2, "flip_prob": 0.0}
    assert Path(call["run"]) == Path("runs/baseline")  # the default name when no --run is given

    path.write_text('method = "baseline"\nembed_dimm = 48\n', encoding="utf-8")
    result = runner.invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2 and "embed_dimm: no such method option" in result.output
    assert "valid:" in result.output and "embed_dim" in result.output
    path.write_text("[train]\nepochz = 1\n", encoding="utf-8")
    result = runner.invoke(app, ["train", "--method", "baseline", "--config", str(path)])
    assert result.exit_code == 2 and "train.epochz" in result.output and "train.epochs" in result.output
    path.write_text("method = \n", encoding="utf-8")
    result = runner.invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2 and "not a valid TOML file" in result.output
    assert len(calls) == 1


def test_compare_shows_the_options_that_differ_and_the_metrics(run_root: Path) -> None:
    out = _ped("runs", "compare", "a", "b", "--root", run_root)
    differ = out.split("metrics")[0]
    assert "train.lr" in differ and "train.epochs" in differ
    assert "embed_dim" not in differ  # same in both runs
    assert "best val R@1" in out and "4/4" in out and "2/2" in out
    result = runner.invoke(app, ["runs", "compare", "a", "nope", "--root", str(run_root)])
    assert result.exit_code == 2 and "no run 'nope'" in result.output


def test_tensorboard_event_files(tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    tiny_train(tiny_cache, tmp_path / "tb", epochs=1, tensorboard=True)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/loss", "val/R@1"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]  # one per epoch (2 stages × 1)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(PedError, match="tensorboard package") as err:
        tiny_train(tiny_cache, tmp_path / "no-tb", epochs=1, tensorboard=True)
    assert "pedcli[tensorboard]" in err.value.hint
    assert not (tmp_path / "no-tb").exists()  # refused before anything was written


def test_resume_without_run_continues_the_newest(
    run_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(run_root / "b", tmp_path / "runs" / "b")
    monkeypatch.chdir(tmp_path)
    out = _ped("train", "--resume", "--quiet")
    assert "resuming run runs/b (the only run under runs/)" in out
    assert len(runs.read_metrics(tmp_path / "runs" / "b")) == 2  # finished: nothing trained again
