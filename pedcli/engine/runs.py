"""Run folders: where a training writes, how it resumes, and how later stages load the trained method.

runs/<name>/
  config.json            resolved config (method + every option, train options, cache, data info, seed)
  vocab.json             the cache vocabulary, so `ped query` needs only the run
  checkpoints/last.pt    written after every epoch (resume point)
  checkpoints/best.pt    the epoch with the best validation R@1 (text → image)
  metrics.jsonl          one JSON object per epoch
  train.log
  eval-<split>.json      the last `ped eval` of that split on the run's own cache (read by `ped runs`)
  .running.lock          held (flock) by the training process: `ped runs` tells running from interrupted
  events.out.tfevents.*  TensorBoard scalars, with `--set train.tensorboard=true`
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout

from pedcli import __version__
from pedcli.data.cache import META, Cache
from pedcli.errors import PedError, refuse
from pedcli.fileio import sha256_file, write_bytes_atomic, write_json_atomic, write_text_atomic
from pedcli.models.methods.base import DataInfo, Method, create_method, method_class

CONFIG = "config.json"  # engine/project.py finds runs by it
VOCAB = "vocab.json"
METRICS = "metrics.jsonl"
LOG = "train.log"
CHECKPOINTS = "checkpoints"
CHECKPOINT_NAMES = ("last", "best")
EVAL = "eval-{split}.json"
RUNNING = ".running.lock"


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
    elif run_dir.exists() and (not run_dir.is_dir() or any(p.name != RUNNING for p in run_dir.iterdir())):
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
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PedError(
            f"{path} is missing: {run_dir} is not a training run", "pass a folder made by `ped train`"
        ) from None
    except json.JSONDecodeError as e:
        raise PedError(f"{path} is not valid JSON ({e})", "restore it or train the run again") from e
    if "method_config" in config:
        config["method_config"] = method_class(config["method"]).upgrade_config(config["method_config"])
    return config


WEIGHTS_DIGEST = "weights_sha256"  # checkpoint key: digest of state["model"], verified on load


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: a flipped bit in the weights changes it."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically, with the digest of its weights. Serialised in memory first: torch
    writing to a full disk says only "unexpected pos", a plain write says ENOSPC (named by fileio)."""
    if "model" in state:
        state = state | {WEIGHTS_DIGEST: weights_digest(state["model"])}
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's state, its weights verified against the saved digest (when it has one). A damaged
    file is a PedError; torch's own text is not shown, as it advises `weights_only=False`, unsafe for a
    file that may not be what it claims."""
    fix = "use the run's other checkpoint (--checkpoint best or last), or train again"
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise PedError(f"checkpoint {path} is missing", "train the run or pick another checkpoint") from None
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, OSError, ValueError, ...
        why = type(e).__name__
        raise PedError(f"checkpoint {path} is damaged or not a pedcli checkpoint ({why})", fix) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        refuse(f"checkpoint {path} is not a pedcli checkpoint (no model weights)", fix)
    saved = state.get(WEIGHTS_DIGEST)
    if saved is not None and saved != weights_digest(state["model"]):
        refuse(f"checkpoint {path} is damaged: its weights differ from the digest saved with them", fix)
    return state


def truncate_metrics(run_dir: str | Path, last_epoch: int) -> None:
    """Drop metric lines of epochs after the resumed checkpoint (they will be trained again)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["epoch"] <= last_epoch]
    write_text_atomic(path, "".join(ln + "\n" for ln in kept))


def append_metrics(run_dir: str | Path, record: dict[str, Any], tensorboard: bool = False) -> None:
    """One epoch's record: a metrics.jsonl line, and TensorBoard scalars when asked (inside `running`)."""
    with open(Path(run_dir) / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    if tensorboard:
        writer = _writers.get(Path(run_dir).resolve())
        if writer is None:
            writer = _writers[Path(run_dir).resolve()] = _summary_writer()(log_dir=str(run_dir))
        step = record["epoch"]
        scalars = {k: record[k] for k in ("loss", "lr") if k in record} | record.get("losses", {})
        for name, value in scalars.items():
            writer.add_scalar(f"train/{name}", value, step)
        for name, value in record.get("val", {}).items():
            writer.add_scalar(f"val/{name}", value, step)
        writer.flush()


_writers: dict[Path, Any] = {}  # TensorBoard writers of the runs this process trains, closed by `running`


def _summary_writer() -> Any:
    """torch's SummaryWriter; a PedError naming the extra to install when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise PedError(
            "train.tensorboard=true needs the tensorboard package, which is not installed",
            'pip install "pedcli[tensorboard]" (or tensorboard), or drop --set train.tensorboard=true',
        ) from None
    return SummaryWriter


def check_tensorboard() -> None:
    """Fail before training rather than after the first epoch when tensorboard is missing."""
    _summary_writer()


@contextlib.contextmanager
def running(run_dir: str | Path, hold: bool = True) -> Iterator[None]:
    """Hold RUN/.running.lock while training (`hold`: rank 0 only): `ped runs` then tells a running run
    from an interrupted one (the OS drops the lock when the process dies, even by kill -9), and a second
    training of the same run is refused. A folder that holds only the lock afterwards is removed (the
    training stopped before writing anything)."""
    run_dir = Path(run_dir)
    if not hold or (run_dir.exists() and not run_dir.is_dir()):  # a file: check_run_dir says so
        yield
        return
    existed = run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / RUNNING)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise PedError(
            f"{run_dir} is being trained by another process right now",
            "wait for it to finish (ped runs shows it as running), or train into another --run",
        ) from None
    try:
        yield
    finally:
        writer = _writers.pop(run_dir.resolve(), None)
        if writer is not None:
            writer.close()
        lock.release()
        if not existed and [p.name for p in run_dir.iterdir()] == [RUNNING]:
            shutil.rmtree(run_dir, ignore_errors=True)


def is_running(run_dir: str | Path) -> bool:
    """Whether a process trains this run now (holds its lock)."""
    path = Path(run_dir) / RUNNING
    if not path.is_file():
        return False
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:  # a read-only folder: nobody can be training into it
        return False
    lock.release()
    return False


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run (none yet: an empty list). A line cut by a kill is skipped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def record_eval(result: dict[str, Any]) -> Path | None:
    """Keep a `ped eval` result in its run as eval-<split>.json when it evaluated the run's own cache
    (the numbers `ped runs` shows); results on another cache or on stored embeddings are not the run's."""
    run_dir = Path(result["run"])
    if "cache" not in result or Path(result["cache"]) != Path(read_config(run_dir)["cache"]).resolve():
        return None
    path = run_dir / EVAL.format(split=result["split"])
    write_json_atomic(path, result)
    return path


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
    path = checkpoint_path(run, checkpoint)
    if checkpoint == "best" and not path.exists() and checkpoint_path(run, "last").exists():
        raise PedError(  # best.pt waits for the first epoch of the whole score (engine/stages.py)
            f"{run} has no best checkpoint yet: it stopped before every part of its test score had "
            "trained (e.g. MIA before step 3)",
            f"finish it with `ped train --run {run} --resume`, or use --checkpoint last",
        )
    return run, path


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


# ---- config resolution (`ped train`) ---------------------------------------------------------------
def jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


def new_config(
    method_name: str,
    cache: Cache,
    method_options: dict[str, Any] | None,
    train_options: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """The resolved config: every option of the method and the engine (`train_options`, resolved by the
    caller), defaults included, and what the run needs of the (opened) cache."""
    method_cls = method_class(method_name)
    return {
        "method": method_name,
        "method_config": jsonable(asdict(method_cls.make_config(method_options))),
        "train": jsonable(train_options),
        "cache": str(cache.root.resolve()),
        "cache_meta_hash": sha256_file(cache.root / META),
        "data_info": jsonable(asdict(cache.data_info())),
        "seed": seed,
        "pedcli": __version__,
        "text": {"options": cache.meta.get("text", {}), "vocab": VOCAB},
    }


def resumed_config(
    run_dir: Path,
    method_name: str | None,
    cache: str | Path | None,
    method_options: dict[str, Any] | None,
    train_options: dict[str, Any],
    seed: int | None,
) -> dict[str, Any]:
    """The run's saved config, after checking that the caller asks for nothing else."""
    config = read_config(run_dir)
    given = {"method": method_name, "seed": seed}
    diffs = [
        f"{k}: saved {config[k]!r}, given {v!r}" for k, v in given.items() if v is not None and v != config[k]
    ]
    for section, values in (("method_config", method_options or {}), ("train", train_options)):
        saved = config[section]
        diffs += [
            f"{k}: saved {saved.get(k)!r}, given {v!r}"
            for k, v in jsonable(values).items()
            if saved.get(k) != v
        ]
    if diffs:
        raise PedError(
            f"--resume continues {run_dir} with its saved config, but these differ: {'; '.join(diffs)}",
            "drop those options to resume, or start a new run (another --run name) to change them",
        )
    cache = Path(cache) if cache is not None else Path(config["cache"])
    meta = cache / META
    if not meta.is_file() or sha256_file(meta) != config["cache_meta_hash"]:
        raise PedError(
            f"{cache} is not the cache {run_dir} was trained on (meta.json differs or is missing)",
            f"pass --cache with the original cache ({config['cache']})",
        )
    return config | {"cache": str(cache.resolve())}
