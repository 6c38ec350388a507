"""The preprocessed cache: one folder, one HDF5 file per part, and a meta record.

    CACHE/
      meta.json   format, pedcli version, dataset, options, source hashes, counts, part digests and sizes
      images.h5   images   uint8  [N, H, W, 3]   resized (default 384×128), chunked one image, lzf
                  pid      int64  [N]            person id as annotated
                  split    uint8  [N]            0 train, 1 val, 2 test (schema.SPLITS)
                  path     str    [N]            image path relative to the dataset root
                  orig_size int32 [N, 2]         original (height, width)
                  keypoints float32 [N, 14, 3]   ground truth (x, y, visible) in resized pixels; NaN if none
      text.h5     caption      str   [M]        the caption as annotated
                  image_index  int32 [M]        row in images.h5 (the caption→image index)
                  tokens       int32 [M, L]     word ids (0 pad, 1 unknown), vocabulary built on train only
                  length       int32 [M]
                  phrases      int16 [M, P, 2]  noun phrases as [start, end) spans over `tokens`, -1 padded
                  n_phrases    int16 [M]
                  bert_ids     int32 [M, Lb]    word pieces incl. [CLS] … [SEP], 0 padded
                  bert_length  int32 [M]
                  bert_spans   int16 [M, S, 2]  comma-separated sub-sentences as [start, end) over bert_ids
                  n_spans      int16 [M]
                  vocab        str   [V]        id → word (0 "<pad>", 1 "<unk>")
      pose.h5     maps     float16 [N, 14, h, w] confidence maps in 0..1, KEYPOINTS order (h, w = H/8, W/8)
                  score    float32 [N]          person score of the pose source (1 for annotations)
                  attrs: source = "blazepose" | "annotations"   (no pose.h5 with --pose-source none)

Every part is written whole to a temporary file and renamed, so a part either exists complete or not at
all; meta.json is written last, with each part's content digest and byte size. Readers check `format`
and refuse a cache from another layout.

`Cache` is the cache opened once: meta.json read and checked (format, parts present at their recorded
size), then the image table and the vocabulary read on first use and kept. Stages pass it along instead
of the path; every reader here takes either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pedcli.data.schema import SPLIT_CODE, SPLITS, DataInfo
from pedcli.errors import PedError, refuse

CACHE_FORMAT = 1
META = "meta.json"
PARTS = ("images", "text", "pose")
REBUILD = "run the same `ped preprocess` command again: it rebuilds missing or damaged parts"


def part_path(cache: str | Path, part: str) -> Path:
    return Path(cache) / f"{part}.h5"


def open_h5(path: str | Path) -> h5py.File:
    """An HDF5 part opened for reading; a truncated or foreign file is a PedError, not an OSError."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        refuse(f"{path} is missing", REBUILD)
    except OSError as e:
        raise PedError(f"{path} is damaged and cannot be read as HDF5 ({e})", REBUILD) from e


def part_digest(path: str | Path) -> str:
    """sha256 of a part's content: every dataset's name, dtype, shape and values, and every attribute.

    Not of the file's bytes: HDF5 may leave uninitialised padding in its metadata blocks, so two files
    with the same content can differ byte for byte. This digest is what meta.json records and checks."""
    h = hashlib.sha256()
    with open_h5(path) as f:
        for key in sorted(f.attrs):
            h.update(f"attr:{key}={f.attrs[key]!r}".encode())
        for name in sorted(f):
            ds = f[name]
            h.update(f"{name}:{ds.dtype}:{ds.shape}".encode())
            rows = ds.chunks[0] if ds.chunks else max(len(ds), 1)  # read a chunk of rows at a time
            for i in range(0, len(ds), rows):
                try:
                    block = ds[i : i + rows]
                except OSError as e:
                    raise PedError(f"{path} is damaged: '{name}' cannot be read ({e})", REBUILD) from e
                if ds.dtype.kind == "O":  # variable-length strings
                    block = np.frombuffer(b"\x00".join(block.tolist()), np.uint8)
                h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()


def split_code(split: str) -> int:
    if split not in SPLIT_CODE:
        refuse(f"unknown split '{split}'", f"choose one of: {', '.join(SPLITS)}")
    return SPLIT_CODE[split]


class Cache:
    """A preprocessed cache opened once (see the module docstring); build it with `load_cache_info`."""

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root = root
        self.meta = meta

    @property
    def has_pose(self) -> bool:
        return self.meta["options"].get("pose_source", "none") != "none"

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.meta["options"]["image_size"]
        return int(h), int(w)

    @property
    def bert_model(self) -> str | None:
        return self.meta["options"].get("bert_model")

    def part(self, name: str) -> Path:
        return part_path(self.root, name)

    @contextlib.contextmanager
    def read(self, name: str) -> Iterator[h5py.File]:
        """A part opened for reading; damaged files give a PedError naming the part and the fix."""
        with open_h5(self.part(name)) as f:
            try:
                yield f
            except (OSError, KeyError) as e:
                raise PedError(f"{self.part(name)} is damaged ({e})", REBUILD) from e

    @cached_property
    def image_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(pid int64 [N], split code uint8 [N]) of every image."""
        with self.read("images") as f:
            return f["pid"][:].astype(np.int64), f["split"][:]

    @cached_property
    def vocab(self) -> list[str]:
        """id → word, the vocabulary the captions were tokenised with."""
        with self.read("text") as f:
            return f["vocab"].asstr()[:].tolist()

    def split_pids(self, split: str) -> np.ndarray:
        """Sorted person ids of one split."""
        pid, code = self.image_table
        return np.unique(pid[code == split_code(split)])

    def data_info(self) -> DataInfo:
        """What a method needs to build its layers."""
        return DataInfo(
            num_classes=len(self.split_pids("train")),
            vocab_size=len(self.vocab),
            image_size=self.image_size,
            bert_model=self.bert_model,
        )

    def damaged_parts(self) -> list[str]:
        """Parts named in meta.json that are missing or whose content digest differs (reads every part)."""
        bad = []
        for name, digest in self.meta.get("parts", {}).items():
            try:
                ok = self.part(name).is_file() and part_digest(self.part(name)) == digest
            except PedError:
                ok = False
            if not ok:
                bad.append(name)
        return bad

    def check_fits(self, vocab: Sequence[str], image_size: Sequence[int], trained_on: str) -> None:
        """Refuse a cache whose word ids or image size differ from those a model was trained with: its
        tokens would be read through the wrong vocabulary, its images at the wrong size."""
        fix = f"use the cache the run was trained on ({trained_on}), or preprocess this data with it"
        if tuple(image_size) != self.image_size:
            refuse(
                f"{self.root} holds {self.image_size[0]}x{self.image_size[1]} images, the run was trained "
                f"on {image_size[0]}x{image_size[1]}",
                fix,
            )
        if list(vocab) != self.vocab:
            same = sum(a == b for a, b in zip(vocab, self.vocab, strict=False))
            refuse(
                f"{self.root} has another vocabulary than the run ({len(self.vocab)} vs {len(vocab)} words, "
                f"{same} ids mean the same word): its captions would be scored through the wrong words",
                fix,
            )


def _read_meta(root: Path) -> dict[str, Any]:
    meta_path = root / META
    if not meta_path.is_file():
        hint = (
            "the cache is incomplete: run the same `ped preprocess` command again to finish it"
            if root.is_dir()
            else "build it with `ped preprocess --dataset ... --root ... --out CACHE`"
        )
        refuse(f"no preprocessed cache at {root} ({META} missing)", hint)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PedError(f"{meta_path} is damaged (not valid JSON: {e})", REBUILD) from e
    if not isinstance(meta, dict) or not isinstance(meta.get("options"), dict):
        refuse(f"{meta_path} is damaged (no 'options' record)", REBUILD)
    return meta


def load_cache_info(cache: str | Path | Cache) -> Cache:
    """Open a cache: read and check its meta record; a clear error if it is missing, partial, damaged
    or foreign. A `Cache` given is returned as it is (callers pass either)."""
    if isinstance(cache, Cache):
        return cache
    root = Path(cache)
    meta = _read_meta(root)
    if meta.get("format") != CACHE_FORMAT:
        refuse(
            f"{root} has cache format {meta.get('format')}, this pedcli reads format {CACHE_FORMAT}",
            "rebuild it with this version's `ped preprocess`",
        )
    for part in meta.get("parts", {}):
        path = part_path(root, part)
        if not path.is_file():
            refuse(f"{path} is missing", REBUILD)
    return Cache(root, meta)
