"""The gallery feature cache of `ped query`: every image of a folder embedded once per model.

Layout (default root `GALLERY/.pedcli/`, or `--cache-dir`):
    files.json              relative path → [size, mtime_ns, sha256]: unchanged files are not re-hashed
    <model-key>/            one folder per (checkpoint content, method config); see `model_key`
      store.json            generation, feature keys (dtype, shape), unreadable contents (sha → reason)
      shas.<gen>.npy        S64 [N] content hashes, sorted: row r of every feature file is image shas[r]
      feat.<gen>.<key>.npy  one array per feature key (floats as float16), opened memory-mapped
      .lock                 every read and write of the store holds it (filelock)

Rows are keyed by file *content*, so renamed or copied files reuse their features and an edited file gets
new ones. A writer builds the next generation's files beside the current ones, then replaces store.json
(atomic rename), then deletes the old generation: a reader that opened its memory maps under the lock
keeps them valid (POSIX keeps unlinked files alive while mapped). Two processes may embed the same new
files at once; the second merge keeps one copy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from PIL import Image

from pedcli.engine.embed import embed_images, load_rgb, stack_padded
from pedcli.errors import PedError
from pedcli.fileio import atomic_path, sha256_bytes, sha256_file, write_json_atomic
from pedcli.models.methods.base import Features, Method

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CACHE_DIRNAME = ".pedcli"
STORE = "store.json"
MEMO = "files.json"
STORE_FORMAT = 1
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
LOCK_TIMEOUT_S = 600.0


def find_images(gallery: Path) -> list[Path]:
    """Image files under `gallery` (recursive, sorted), skipping hidden folders such as the cache."""
    if not gallery.is_dir():
        raise PedError(f"gallery folder {gallery} does not exist", "pass --gallery DIR with your images")
    found = []
    for dirpath, dirnames, filenames in os.walk(gallery):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, n) for n in sorted(filenames) if n.lower().endswith(IMAGE_SUFFIXES)]
    return found


def model_key(checkpoint_sha256: str, config: dict[str, Any]) -> str:
    """Folder name for one model: the checkpoint's content plus everything that shapes image features."""
    what = {
        "checkpoint": checkpoint_sha256,
        "method": config["method"],
        "method_config": config["method_config"],
        "data_info": config["data_info"],
    }
    return f"{config['method']}-{sha256_bytes(json.dumps(what, sort_keys=True).encode())[:16]}"


class HashMemo:
    """(path, size, mtime_ns) → sha256, so a warm query hashes only new or changed files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)
        self.entries: dict[str, list[Any]] = self._read()
        self.changed = False

    def _read(self) -> dict[str, list[Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}  # a lost or damaged memo only costs re-hashing
        return data if isinstance(data, dict) else {}

    def sha(self, file: Path, key: str) -> str:
        st = file.stat()
        hit = self.entries.get(key)
        if hit is not None and hit[:2] == [st.st_size, st.st_mtime_ns]:
            return str(hit[2])
        digest = sha256_file(file)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.changed = True
        return digest

    def save(self, keep: set[str] | None = None) -> None:
        """Merge with what other processes wrote meanwhile; `keep` drops entries of removed files."""
        if not self.changed:
            return
        with self.lock:
            merged = self._read() | self.entries
            if keep is not None:
                merged = {k: v for k, v in merged.items() if k in keep}
            write_json_atomic(self.path, merged)
        self.changed = False


@dataclass
class GalleryFeatures:
    """The current gallery: its image paths, each path's row in `features`, and what was skipped."""

    paths: list[Path]
    rows: np.ndarray  # int64 [len(paths)], row of each path in `features`
    features: dict[str, np.ndarray]  # memory-mapped store arrays (float16 floats), all store rows
    store_dir: Path
    generation: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    embedded: int = 0  # images encoded by this call (0 on a warm query)

    def gather(self, store_rows: np.ndarray) -> Features:
        """Float32 torch features of the given store rows (what a method's similarity expects)."""
        order = np.asarray(store_rows, dtype=np.int64)
        out = {}
        for key, arr in self.features.items():
            t = torch.from_numpy(np.ascontiguousarray(arr[order]))
            out[key] = t.float() if t.is_floating_point() else t
        return out


@dataclass
class _Store:
    generation: int
    shas: np.ndarray  # S64, sorted
    features: dict[str, np.ndarray]
    failed: dict[str, str]


class GalleryCache:
    """Per-model feature store of a gallery; `sync` brings it up to date and maps the current files."""

    def __init__(self, gallery: Path, cache_root: Path, key: str) -> None:
        self.gallery = gallery
        self.dir = cache_root / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.dir / ".lock"), timeout=LOCK_TIMEOUT_S)
        self.memo = HashMemo(cache_root / MEMO)

    # ---- reading and writing generations ------------------------------------------------------------
    def _read(self) -> _Store:
        """The current generation, memory-mapped; call with the lock held."""
        try:
            meta = json.loads((self.dir / STORE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return _Store(0, np.empty(0, dtype="S64"), {}, {})
        except json.JSONDecodeError as e:
            raise PedError(f"{self.dir / STORE} is damaged ({e})", f"delete {self.dir} to rebuild it") from e
        gen = meta["generation"]
        shas = np.load(self.dir / f"shas.{gen}.npy")
        feats = {k: np.load(self.dir / f"feat.{gen}.{k}.npy", mmap_mode="r") for k in meta["keys"]}
        return _Store(gen, shas, feats, dict(meta["failed"]))

    def _write(
        self, shas: np.ndarray, feats: dict[str, np.ndarray], failed: dict[str, str], old: int
    ) -> None:
        """Write generation old + 1 and switch store.json to it; call with the lock held."""
        gen = old + 1
        order = np.argsort(shas, kind="stable")
        _save_npy(self.dir / f"shas.{gen}.npy", shas[order])
        keys = {}
        for k, arr in feats.items():
            _save_npy(self.dir / f"feat.{gen}.{k}.npy", arr[order])
            keys[k] = {"dtype": str(arr.dtype), "shape": list(arr.shape[1:])}
        write_json_atomic(
            self.dir / STORE,
            {
                "format": STORE_FORMAT,
                "generation": gen,
                "keys": keys,
                "failed": failed,
                "rows": int(len(shas)),
            },
        )
        for f in self.dir.iterdir():  # every generation file is NAME.GEN.…: shas, feat, norms, faiss
            parts = f.name.split(".")
            if len(parts) > 2 and parts[1].isdigit() and int(parts[1]) < gen:
                f.unlink(missing_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[_Store]:
        with self.lock:
            yield self._read()

    # ---- the one public operation ---------------------------------------------------------------------
    def sync(
        self,
        method: Method,
        encode: Callable[[Method, Sequence[np.ndarray]], Features] | None = None,
        batch_size: int = 32,
        log: Callable[[str], None] = lambda _: None,
    ) -> GalleryFeatures:
        """Hash the gallery files (memo), embed contents the store lacks, merge, and map every path to its
        row. Unreadable files are skipped and listed, never fatal."""
        encode = encode or _encode_arrays
        paths, shas, skipped = self._hash_files()
        unread: dict[str, str] = {}  # vanished or unreadable since hashed: skipped now, not remembered
        embedded = 0
        for _attempt in range(3):  # a concurrent writer pruned rows we counted on: look again
            with self._locked() as store:
                missing = _missing(shas, store, unread)
                if not missing:
                    return self._mapped(store, paths, shas, skipped, embedded, unread)
            by_sha = {s: p for p, s in zip(paths, shas, strict=True)}
            new_feats, new_failed, new_unread = self._embed(
                [by_sha[s] for s in missing], missing, method, encode, batch_size, log
            )
            unread |= new_unread
            embedded += len(new_feats[0]) if new_feats is not None else 0
            with self._locked() as store:
                self._merge(store, set(shas), new_feats, new_failed)
                store = self._read()
                if not _missing(shas, store, unread):
                    return self._mapped(store, paths, shas, skipped, embedded, unread)
        raise PedError(f"the feature cache {self.dir} kept changing under this query", "run the query again")

    def _hash_files(self) -> tuple[list[Path], list[str], list[tuple[Path, str]]]:
        paths, shas, skipped = [], [], []
        for p in find_images(self.gallery):
            rel = p.relative_to(self.gallery).as_posix()
            try:
                shas.append(self.memo.sha(p, rel))
                paths.append(p)
            except OSError as e:
                skipped.append((p, f"cannot read the file ({e.strerror or e})"))
        self.memo.save(keep={p.relative_to(self.gallery).as_posix() for p in paths})
        return paths, shas, skipped

    def _embed(
        self,
        files: list[Path],
        shas: list[str],
        method: Method,
        encode: Callable[[Method, Sequence[np.ndarray]], Features],
        batch_size: int,
        log: Callable[[str], None],
    ) -> tuple[tuple[list[str], Features] | None, dict[str, str], dict[str, str]]:
        """Decode and encode `files` a batch at a time. Contents that do not decode go to `failed` (kept in
        the store: reported without decoding again); files that vanished or may not be read to `unread`."""
        done: list[str] = []
        parts: dict[str, list[torch.Tensor]] = {}
        failed: dict[str, str] = {}
        unread: dict[str, str] = {}
        log(f"embedding {len(files)} new image(s)")
        for s in range(0, len(files), batch_size):
            arrays, ok = [], []
            for f, sha in zip(files[s : s + batch_size], shas[s : s + batch_size], strict=True):
                try:
                    arrays.append(load_rgb(f))
                    ok.append(sha)
                except (FileNotFoundError, PermissionError) as e:
                    unread[sha] = f"cannot read the file ({e.strerror or e})"
                except DECODE_ERRORS as e:
                    failed[sha] = f"not a readable image ({type(e).__name__}: {e})"
            if arrays:
                for k, v in encode(method, arrays).items():
                    parts.setdefault(k, []).append(v)
                done += ok
        new = (done, {k: stack_padded(v) for k, v in parts.items()}) if done else None
        return new, failed, unread

    def _merge(
        self,
        store: _Store,
        keep: set[str],
        new: tuple[list[str], Features] | None,
        new_failed: dict[str, str],
    ) -> None:
        """Store rows of `keep` (the current gallery) plus the new ones; rows of removed files are dropped."""
        old = store.shas.astype(str)
        kept_rows = np.flatnonzero(np.isin(old, list(keep)))
        new_shas: list[str] = []
        new_idx: list[int] = []
        if new is not None:
            present = set(old[kept_rows])
            for i, s in enumerate(new[0]):
                if s not in present:
                    new_shas.append(s)
                    new_idx.append(i)
        feats: dict[str, np.ndarray] = {}
        keys = set(store.features) | (set(new[1]) if new is not None else set())
        for k in keys:
            blocks = []
            if k in store.features and len(kept_rows):
                blocks.append(torch.from_numpy(np.asarray(store.features[k][kept_rows])))
            if new is not None and new_idx:
                v = new[1][k][new_idx]
                blocks.append(v.half() if v.is_floating_point() else v)
            if blocks:
                feats[k] = stack_padded(blocks).numpy()
        shas = np.array(list(old[kept_rows]) + new_shas, dtype="S64")
        failed = {s: r for s, r in (store.failed | new_failed).items() if s in keep}
        if feats or failed != store.failed or len(shas) != len(old):
            self._write(shas, feats, failed, store.generation)

    def _mapped(
        self,
        store: _Store,
        paths: list[Path],
        shas: list[str],
        skipped: list[tuple[Path, str]],
        embedded: int,
        unread: dict[str, str],
    ) -> GalleryFeatures:
        """Each usable path's store row; paths whose content could not be decoded or read join `skipped`."""
        why = store.failed | unread
        bad = [s in why for s in shas]
        skipped = skipped + [(p, why[s]) for p, s, b in zip(paths, shas, bad, strict=True) if b]
        keep = [(p, s) for p, s, b in zip(paths, shas, bad, strict=True) if not b]
        wanted = np.array([s for _, s in keep], dtype="S64")
        rows = np.searchsorted(store.shas, wanted).astype(np.int64)
        if len(rows) and (rows.max() >= len(store.shas) or (store.shas[rows] != wanted).any()):
            raise PedError(
                f"the feature cache {self.dir} is inconsistent", f"delete {self.dir} to rebuild it"
            )
        return GalleryFeatures(
            [p for p, _ in keep], rows, store.features, self.dir, store.generation, skipped, embedded
        )


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def _missing(shas: list[str], store: _Store, unread: dict[str, str]) -> list[str]:
    """Contents of the gallery that the store has neither features nor a decode failure for."""
    wanted = np.unique(np.array(shas, dtype="S64"))
    absent = wanted[~np.isin(wanted, store.shas)].astype(str)
    return [s for s in absent if s not in store.failed and s not in unread]


def _encode_arrays(method: Method, arrays: Sequence[np.ndarray]) -> Features:
    """Gallery images → features, prepared exactly as `ped embed` prepares loose images (plus pose maps
    from BlazePose for methods that read them)."""
    pose = pose_maps(method, arrays) if method.needs_pose else None
    return embed_images(method, list(arrays), batch_size=len(arrays), pose=pose)


def pose_maps(method: Method, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """BlazePose confidence maps [N, 14, H/8, W/8] of loose images (the cache's stride)."""
    from pedcli.engine.preprocess import POSE_STRIDE
    from pedcli.pose.blazepose import BlazePose

    h, w = method.info.image_size
    pose = BlazePose(map_hw=(h // POSE_STRIDE, w // POSE_STRIDE))
    return np.stack([pose.estimate(a).maps for a in arrays]).astype(np.float32)
