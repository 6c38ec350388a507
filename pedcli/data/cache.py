"""The preprocessed cache: one folder, one HDF5 file per part, and a meta record.

    CACHE/
      meta.json   format, pedcli version, dataset, options, source hashes, counts, part hashes
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
all; meta.json is written last. Readers check `format` and refuse a cache from another layout.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pedcli.errors import PedError

CACHE_FORMAT = 1
META = "meta.json"
PARTS = ("images", "text", "pose")


def part_path(cache: str | Path, part: str) -> Path:
    return Path(cache) / f"{part}.h5"


def part_digest(path: str | Path) -> str:
    """sha256 of a part's content: every dataset's name, dtype, shape and values, and every attribute.

    Not of the file's bytes: HDF5 may leave uninitialised padding in its metadata blocks, so two files
    with the same content can differ byte for byte. This digest is what meta.json records and checks."""
    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        for key in sorted(f.attrs):
            h.update(f"attr:{key}={f.attrs[key]!r}".encode())
        for name in sorted(f):
            ds = f[name]
            h.update(f"{name}:{ds.dtype}:{ds.shape}".encode())
            rows = ds.chunks[0] if ds.chunks else max(len(ds), 1)  # read a chunk of rows at a time
            for i in range(0, len(ds), rows):
                block = ds[i : i + rows]
                if ds.dtype.kind == "O":  # variable-length strings
                    block = np.frombuffer(b"\x00".join(block.tolist()), np.uint8)
                h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class CacheInfo:
    root: Path
    meta: dict[str, Any]

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


def load_cache_info(cache: str | Path) -> CacheInfo:
    """Read and check a cache's meta record; a clear error if it is missing, partial or foreign."""
    root = Path(cache)
    meta_path = root / META
    if not meta_path.is_file():
        hint = (
            "the cache is incomplete: run the same `ped preprocess` command again to finish it"
            if root.is_dir()
            else "build it with `ped preprocess --dataset ... --root ... --out CACHE`"
        )
        raise PedError(f"no preprocessed cache at {root} ({META} missing)", hint)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PedError(f"{meta_path} is not valid JSON ({e})", "delete the cache and preprocess again") from e
    if meta.get("format") != CACHE_FORMAT:
        raise PedError(
            f"{root} has cache format {meta.get('format')}, this pedcli reads format {CACHE_FORMAT}",
            "rebuild it with this version's `ped preprocess`",
        )
    for part in meta.get("parts", {}):
        if not part_path(root, part).is_file():
            raise PedError(f"{part_path(root, part)} is missing", "run `ped preprocess` again to rebuild it")
    return CacheInfo(root=root, meta=meta)
