"""Project-folder conventions, so the usage lines need no paths: `ped preprocess`, `ped train --method mgel`,
`ped eval`, `ped query TEXT --gallery DIR`.

A project folder holds

  data/<dataset>/   datasets, found by their annotation file (the layouts of data/README.md)
  cache/<name>/     caches from `ped preprocess` (a folder with meta.json)
  runs/<name>/      runs from `ped train` (a folder with config.json): runs/mgel, runs/mgel-2, …

Every default choice comes back as a `Pick` whose `why` the CLI prints in one line ("newest of 3 under
runs/"), so a user always sees what a command chose. A choice that could mislead — two datasets under data/
— is refused with the candidates and the flag that picks one; among caches and runs the newest wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pedcli.data.formats import annotation_path, list_formats
from pedcli.errors import PedError

DATA_DIR = "data"
CACHE_DIR = "cache"
RUNS_DIR = "runs"
SYNTH = "synth"  # the synthetic set shares CUHK-PEDES's reid_raw.json; its records carry keypoints
_PEEK_BYTES = 1 << 16  # enough for the first record of any supported annotation file
# The layout files of a run (engine/runs.py) and of a cache (data/cache.py), named here so that importing
# this module (the CLI does, for `ped --help`) loads neither torch nor h5py.
RUN_CONFIG = "config.json"
CACHE_META = "meta.json"


@dataclass(frozen=True)
class Pick:
    """A default choice and the reason for it, printed as one line."""

    path: Path
    why: str

    def line(self, what: str) -> str:
        return f"{what} {self.path} ({self.why})"


@dataclass(frozen=True)
class Dataset:
    """A dataset folder: its annotation format and whether its records carry keypoints (pose maps)."""

    root: Path
    format: str
    keypoints: bool

    @property
    def pose_source(self) -> str:
        """Ground-truth keypoints when the records have them (the synthetic set), else BlazePose."""
        return "annotations" if self.keypoints else "blazepose"

    def flags(self) -> str:
        return f"--root {self.root} --dataset {self.format}"


def _first_record(path: Path) -> dict | None:
    """The first record of a JSON list, read from the file's head so a large file is not parsed whole."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(_PEEK_BYTES)
    start = head.find("{")
    if start < 0:
        return None
    try:
        record, _ = json.JSONDecoder().raw_decode(head, start)
    except json.JSONDecodeError:
        return None  # not JSON, or a first record longer than the head: preprocess reports the file
    return record if isinstance(record, dict) else None


def detect_dataset(root: Path, annotations: Path | None = None) -> Dataset | None:
    """The dataset at `root` by its annotation file, or None when no known annotation file is there.

    Several formats share a file name (reid_raw.json: CUHK-PEDES and the synthetic set); the first
    record's keypoints tell them apart. Two different annotation files in one folder are refused.
    """
    found: dict[str, Path] = {}
    for name in list_formats():
        try:
            found[name] = annotation_path(name, root, annotations)
        except PedError:
            continue
    if not found:
        return None
    first = _first_record(next(iter(found.values())))
    keypoints = bool(first and "keypoints" in first)
    if len(found) > 1 and len(set(found.values())) == 1:
        # one file, read by several formats: keypoints mean the synthetic set
        found = {n: p for n, p in found.items() if (n == SYNTH) == keypoints} or found
    if len(found) > 1:
        files = ", ".join(f"{p.name} ({n})" for n, p in sorted(found.items()))
        what = f"{annotations} may be in" if annotations else f"{root} holds annotation files of"
        raise PedError(
            f"{what} several formats: {files}",
            f"name the one to read: ped preprocess --root {root} --dataset FORMAT",
        )
    return Dataset(Path(root), next(iter(found)), keypoints)


def _no_dataset(where: str) -> PedError:
    return PedError(
        f"no dataset found: looked for an annotation file (the layouts of data/README.md) in {where}",
        f"make the synthetic set with `ped synth` (writes {DATA_DIR}/{SYNTH}), or place a benchmark under "
        f"{DATA_DIR}/ as data/README.md describes (e.g. {DATA_DIR}/CUHK-PEDES/reid_raw.json); "
        "or pass --root DIR",
    )


def pick_dataset(
    root: Path | None = None,
    dataset: str | None = None,
    annotations: Path | None = None,
    project: Path = Path("."),
) -> tuple[Dataset, str]:
    """The dataset to preprocess and why: `root` (format detected unless `dataset` names it), or the only
    dataset folder under data/. Several under data/ are refused: which one is meant is a guess."""
    if root is None and annotations is not None:
        root = Path(annotations).parent
    if root is not None:
        if dataset is not None:
            first = _first_record(annotation_path(dataset, root, annotations))
            return Dataset(root, dataset, bool(first and "keypoints" in first)), f"--dataset {dataset}"
        found = detect_dataset(root, annotations)
        if found is None:
            raise _no_dataset(str(root))
        return found, f"{found.format} annotation file found in it"
    data_dir = project / DATA_DIR
    subdirs = sorted(p for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
    candidates = [d for d in (detect_dataset(p) for p in subdirs) if d is not None]
    if dataset is not None:
        candidates = [d for d in candidates if d.format == dataset]
    if not candidates:
        raise _no_dataset(f"the folders under {data_dir}/" + (f" (format {dataset})" if dataset else ""))
    if len(candidates) > 1:
        listed = "".join(f"\n  ped preprocess {d.flags()}" for d in candidates)
        raise PedError(
            f"{len(candidates)} datasets under {data_dir}/: {', '.join(str(d.root) for d in candidates)}",
            f"pick one with --root:{listed}",
        )
    only = candidates[0]
    return only, f"the only dataset under {data_dir}/, format {only.format}"


def default_cache_dir(dataset: Dataset, project: Path = Path(".")) -> Path:
    """cache/<dataset folder name in lower case>: data/CUHK-PEDES → cache/cuhk-pedes."""
    return project / CACHE_DIR / dataset.root.resolve().name.lower()


def _newest(paths: list[Path], marker: str) -> list[Path]:
    """`paths` newest first, by the modification time of their `marker` file (written once, at creation)."""
    return sorted(paths, key=lambda p: ((p / marker).stat().st_mtime_ns, p.name), reverse=True)


def _choose(paths: list[Path], marker: str, what: str, where: Path, flag: str) -> Pick:
    ordered = _newest(paths, marker)
    if len(ordered) == 1:
        return Pick(ordered[0], f"the only {what} under {where}/")
    return Pick(ordered[0], f"newest of {len(ordered)} {what}s under {where}/; another with {flag}")


def list_caches(project: Path = Path(".")) -> list[Path]:
    folder = project / CACHE_DIR
    return sorted(p for p in folder.iterdir() if (p / CACHE_META).is_file()) if folder.is_dir() else []


def pick_cache(project: Path = Path(".")) -> Pick:
    """The only (or newest) cache under cache/."""
    caches = list_caches(project)
    if not caches:
        raise PedError(
            f"no cache under {project / CACHE_DIR}/ (a folder with {CACHE_META})",
            "run `ped preprocess` first, or pass --cache DIR",
        )
    return _choose(caches, CACHE_META, "cache", project / CACHE_DIR, "--cache DIR")


def list_runs(root: Path) -> list[Path]:
    """Run folders (with config.json) directly under `root`, newest first."""
    runs = [p for p in root.iterdir() if (p / RUN_CONFIG).is_file()] if root.is_dir() else []
    return _newest(runs, RUN_CONFIG)


def new_run_dir(method: str, project: Path = Path(".")) -> Pick:
    """runs/<method>, or the first free runs/<method>-2, -3, …: a new training never overwrites a run."""
    folder = project / RUNS_DIR
    n = 1
    while True:
        path = folder / (method if n == 1 else f"{method}-{n}")
        if not path.exists():
            break
        n += 1
    return Pick(path, "a new folder" + ("" if n == 1 else f"; {n - 1} earlier {method} run(s) kept"))


def pick_run(project: Path = Path("."), checkpoint: str = "best") -> Pick:
    """The newest run under runs/ that has `checkpoint` (a run still in its first epoch has none yet)."""
    from pedcli.engine.runs import CHECKPOINT_NAMES, checkpoint_path

    if checkpoint not in CHECKPOINT_NAMES:
        raise PedError(f"unknown checkpoint {checkpoint!r}", f"choose one of {', '.join(CHECKPOINT_NAMES)}")
    folder = project / RUNS_DIR
    runs = list_runs(folder)
    usable = [r for r in runs if checkpoint_path(r, checkpoint).is_file()]
    if not usable:
        have = f"{len(runs)} run(s) there, none with a {checkpoint} checkpoint yet" if runs else "none there"
        raise PedError(
            f"no trained run under {folder}/ ({have})",
            "train one with `ped train --method NAME`, or pass --run DIR",
        )
    return _choose(usable, RUN_CONFIG, "run", folder, "--run DIR")
