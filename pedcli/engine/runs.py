"""Run folders: where a training writes, how it resumes, and how later stages load the trained method.

runs/<name>/
  config.json            resolved config (method + every option, train options, cache, data info, seed)
  vocab.json             the cache vocabulary, so `ped query` needs only the run
  checkpoints/last.pt    written after every epoch (resume point)
  checkpoints/best.pt    the epoch with the best validation R@1 (text → image)
  metrics.jsonl          one JSON object per epoch
  train.log
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pedcli.errors import PedError
from pedcli.fileio import atomic_path, write_text_atomic
from pedcli.models.methods.base import DataInfo, Method, create_method

CONFIG = "config.json"
VOCAB = "vocab.json"
METRICS = "metrics.jsonl"
LOG = "train.log"
CHECKPOINTS = "checkpoints"
CHECKPOINT_NAMES = ("last", "best")


def checkpoint_path(run_dir: str | Path, which: str) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{which}.pt"


def check_run_dir(run_dir: str | Path, resume: bool) -> None:
    """Check the folder suits the request: a new run never overwrites, a resume needs `last.pt`."""
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / CONFIG).is_file():
            raise PedError(f"cannot resume {run_dir}: it has no {CONFIG}", "start it without --resume")
        if not checkpoint_path(run_dir, "last").is_file():
            raise PedError(
                f"cannot resume {run_dir}: no checkpoint was saved yet (it stopped during its first epoch)",
                f"delete {run_dir} and start again without --resume",
            )
    elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise PedError(
            f"run folder {run_dir} already exists; a new training never overwrites a run",
            "pick another --run name, or add --resume to continue that run from its last checkpoint",
        )


def create_run_dir(run_dir: str | Path) -> Path:
    """A new, empty run folder (with its checkpoints/ folder); refuses an existing non-empty one."""
    check_run_dir(run_dir, resume=False)
    (Path(run_dir) / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    return Path(run_dir)


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PedError(
            f"{path} is missing: {run_dir} is not a training run", "pass a folder made by `ped train`"
        ) from None
    except json.JSONDecodeError as e:
        raise PedError(f"{path} is not valid JSON ({e})", "restore it or train the run again") from e


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise PedError(f"checkpoint {path} is missing", "train the run or pick another checkpoint") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise PedError(
            f"checkpoint {path} cannot be read ({e})", "use the other checkpoint or train again"
        ) from e


def truncate_metrics(run_dir: str | Path, last_epoch: int) -> None:
    """Drop metric lines of epochs after the resumed checkpoint (they will be trained again)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["epoch"] <= last_epoch]
    write_text_atomic(path, "".join(ln + "\n" for ln in kept))


def append_metrics(run_dir: str | Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_checkpoint(run: str | Path, checkpoint: str = "best") -> tuple[Path, Path]:
    """(run folder, checkpoint file) from a run folder + 'best'/'last', or from a .pt file inside a run."""
    run = Path(run)
    if run.is_file() and run.suffix == ".pt":
        run_dir = run.parent.parent
        if not (run_dir / CONFIG).is_file():
            raise PedError(f"{run} is not inside a run folder (no {run_dir / CONFIG})", "pass the run folder")
        return run_dir, run
    if not run.is_dir():
        raise PedError(f"no run folder or checkpoint at {run}", "pass a folder made by `ped train`")
    if checkpoint not in CHECKPOINT_NAMES:
        raise PedError(f"unknown checkpoint {checkpoint!r}", f"choose one of {', '.join(CHECKPOINT_NAMES)}")
    return run, checkpoint_path(run, checkpoint)


def data_info_from_config(config: dict[str, Any]) -> DataInfo:
    d = dict(config["data_info"])
    d["image_size"] = tuple(d["image_size"])
    return DataInfo(**d)


def load_run(
    run: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu"
) -> tuple[Method, dict[str, Any]]:
    """Rebuild the trained method from a run (in eval mode, on `device`) and return it with its config."""
    run_dir, ckpt_path = resolve_checkpoint(run, checkpoint)
    config = read_config(run_dir)
    method = create_method(config["method"], data_info_from_config(config), config["method_config"])
    state = load_checkpoint(ckpt_path)
    try:
        method.load_state_dict(state["model"])
    except RuntimeError as e:
        raise PedError(
            f"{ckpt_path} does not fit method '{config['method']}' as configured in {run_dir / CONFIG}",
            "the checkpoint or config was changed by hand; train the run again",
        ) from e
    return method.to(device).eval(), config
