"""What `ped runs` reads from run folders: one summary per run, the per-epoch table, the differences
between runs, and a picture of a training curve. Rows of plain values; the CLI draws the tables."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pedcli.engine import runs
from pedcli.engine.project import list_runs
from pedcli.errors import PedError
from pedcli.fileio import atomic_path

PLOT_SIZE = (800, 600)  # pixels of `ped runs show --plot`
_DPI = 100
SORT_KEYS = ("newest", "name", "method", "best", "test")
STATES = ("running", "finished", "interrupted", "damaged")


@dataclass
class RunSummary:
    """One row of `ped runs` (percentages as `ped eval` prints them; None: not measured)."""

    name: str
    path: str
    method: str
    cache: str
    epochs_done: int
    epochs_planned: int
    best_val_r1: float | None
    best_epoch: int | None
    test_r1: float | None
    test_map: float | None
    wall_s: float
    state: str
    created: float  # config.json modification time (seconds since the epoch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _epoch_seconds(record: dict[str, Any]) -> float:
    return sum(record.get(k, 0.0) for k in ("train_time_s", "val_time_s", "trunk_cache_s"))


def _test_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / runs.EVAL.format(split="test")
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("t2i", {})
    except (OSError, ValueError):
        return {}  # a damaged eval record is no reason to hide the run; `ped eval` writes it again


def summarize(run_dir: Path) -> RunSummary:
    """The summary of one run folder, from config.json, metrics.jsonl, eval-test.json and its lock.
    A config.json that cannot be read makes a "damaged" row rather than hiding the other runs."""
    created = (run_dir / runs.CONFIG).stat().st_mtime
    try:
        config = runs.read_config(run_dir)
    except PedError:
        return RunSummary(
            run_dir.name, str(run_dir), "?", "?", 0, 0, None, None, None, None, 0.0, "damaged", created
        )
    records = runs.read_metrics(run_dir)
    planned = sum(int(s.get("epochs", 0)) for s in config.get("stages", []))
    done = records[-1]["epoch"] if records else 0
    # the epoch the engine kept as best.pt (the last one it marked): not simply the highest val R@1,
    # which may come from before the whole test score had learned (`complete_stage`)
    best = next((r for r in reversed(records) if r.get("best") and "val" in r), None)
    test = _test_metrics(run_dir)
    if runs.is_running(run_dir):
        state = "running"
    else:
        state = "finished" if planned and done >= planned else "interrupted"
    return RunSummary(
        name=run_dir.name,
        path=str(run_dir),
        method=config["method"],
        cache=Path(config["cache"]).name,
        epochs_done=done,
        epochs_planned=planned,
        best_val_r1=best["val"]["R@1"] if best else None,
        best_epoch=best["epoch"] if best else None,
        test_r1=test.get("R@1"),
        test_map=test.get("mAP"),
        wall_s=round(sum(_epoch_seconds(r) for r in records), 1),
        state=state,
        created=created,
    )


def list_summaries(root: Path, method: str | None = None, sort: str = "newest") -> list[RunSummary]:
    """Summaries of the runs under `root`, of one method or all, sorted (best/test: highest first)."""
    if sort not in SORT_KEYS:
        raise PedError(f"cannot sort runs by '{sort}'", f"choose one of: {', '.join(SORT_KEYS)}")
    rows = [summarize(p) for p in list_runs(root)]
    if method is not None:
        rows = [r for r in rows if r.method == method]
    keys = {
        "newest": lambda r: -r.created,
        "name": lambda r: r.name,
        "method": lambda r: (r.method, -r.created),
        "best": lambda r: -(r.best_val_r1 if r.best_val_r1 is not None else -1.0),
        "test": lambda r: -(r.test_r1 if r.test_r1 is not None else -1.0),
    }
    return sorted(rows, key=keys[sort])


def find_run(name: str | Path, root: Path) -> Path:
    """A run given as a folder path, or by its name under `root`."""
    for path in (Path(name), root / name):
        if (path / runs.CONFIG).is_file():
            return path
    names = ", ".join(p.name for p in list_runs(root)) or "none"
    raise PedError(f"no run '{name}' (looked at {name} and {root / name})", f"runs under {root}: {names}")


EPOCH_COLUMNS = ("epoch", "stage", "loss", "lr", "val R@1", "val R@5", "val mAP", "samples/s", "s", "best")


def epoch_rows(run_dir: Path) -> list[tuple[Any, ...]]:
    """One row per epoch, in EPOCH_COLUMNS order."""
    rows = []
    for r in runs.read_metrics(run_dir):
        val = r.get("val", {})
        rows.append(
            (
                r["epoch"],
                f"{r.get('stage', '?')} {r.get('stage_epoch', '')}".strip(),
                r.get("loss"),
                r.get("lr"),
                val.get("R@1"),
                val.get("R@5"),
                val.get("mAP"),
                r.get("samples_per_s"),
                round(_epoch_seconds(r), 1),
                "*" if r.get("best") else "",
            )
        )
    return rows


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """The options of a run as `--set`-style keys: method options bare, engine options as train.KEY."""
    out = {k: config.get(k) for k in ("method", "seed", "cache")}
    out |= dict(config.get("method_config", {}))
    out |= {f"train.{k}": v for k, v in config.get("train", {}).items()}
    return out


def compare_rows(run_dirs: list[Path]) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(options that differ, metrics): rows of (name, value per run), for `ped runs compare`."""
    configs = [flat_config(runs.read_config(p)) for p in run_dirs]
    keys = sorted({k for c in configs for k in c})
    missing = "—"
    differ = [
        (k, *(format_cell(c.get(k, missing)) for c in configs))
        for k in keys
        if len({repr(c.get(k, missing)) for c in configs}) > 1
    ]
    summaries = [summarize(p) for p in run_dirs]
    metrics = [
        ("state", *(s.state for s in summaries)),
        ("epochs", *(f"{s.epochs_done}/{s.epochs_planned}" for s in summaries)),
        ("best val R@1 (epoch)", *(_best(s) for s in summaries)),
        ("test R@1", *(format_cell(s.test_r1) for s in summaries)),
        ("test mAP", *(format_cell(s.test_map) for s in summaries)),
        ("wall time", *(format_seconds(s.wall_s) for s in summaries)),
    ]
    return differ, metrics


def _best(s: RunSummary) -> str:
    return "—" if s.best_val_r1 is None else f"{s.best_val_r1:.2f} ({s.best_epoch})"


def format_cell(value: Any) -> str:
    """A table cell: None as a dash, small floats with 4 significant digits, others with 2 decimals."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 0.01 else f"{value:.2f}"
    return str(value)


def format_seconds(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else (f"{m}m{s:02d}s" if m else f"{s}s")


def plot_run(run_dir: Path, out: Path) -> Path:
    """Loss and val R@1 per epoch as a PNG of PLOT_SIZE pixels, each stage's start marked and named."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    records = runs.read_metrics(run_dir)
    if not records:
        raise PedError(f"{run_dir} has no finished epoch to plot", "plot it after its first epoch")
    fig = Figure(figsize=(PLOT_SIZE[0] / _DPI, PLOT_SIZE[1] / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    loss_ax, val_ax = fig.subplots(2, 1, sharex=True)
    epochs = [r["epoch"] for r in records]
    loss_ax.plot(epochs, [r.get("loss") for r in records], marker="o", label="loss (sum)")
    for name in records[-1].get("losses", {}):
        values = [r.get("losses", {}).get(name) for r in records]
        loss_ax.plot(epochs, values, linestyle="--", marker=".", label=name)
    loss_ax.set_ylabel("training loss")
    loss_ax.legend(loc="upper right", fontsize="small")
    val = [(r["epoch"], r["val"]["R@1"]) for r in records if "val" in r]
    if val:
        val_ax.plot(*zip(*val, strict=True), marker="o", color="tab:green")
    val_ax.set_ylabel("val R@1 (text → image, %)")
    val_ax.set_xlabel("epoch")
    val_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for r in records:
        if r.get("stage_epoch") == 1:  # a stage starts: a line through both plots, named at the top
            for ax in (loss_ax, val_ax):
                ax.axvline(r["epoch"] - 0.5, color="grey", linestyle=":")
            loss_ax.annotate(
                str(r.get("stage", "")),
                (r["epoch"] - 0.5, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -12),
                textcoords="offset points",
                fontsize="small",
                color="grey",
            )
    config = runs.read_config(run_dir)
    fig.suptitle(f"{run_dir.name}: {config['method']} on {Path(config['cache']).name}")
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    return out
