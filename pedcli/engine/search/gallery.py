"""The gallery feature cache of `ped query`: every image of a folder embedded once per model.

Layout of a cache root (`GALLERY/.pedcli/`; `--cache-dir DIR` → `DIR/<gallery slug>/`; a gallery folder this
user cannot write → `<user cache dir>/pedcli/galleries/<gallery slug>/`, see `cache_root`):
    catalog.sqlite         the catalogue (SQLite, WAL journal):
      files(kind, path, size, mtime_ns, ctime_ns, inode, sha)   the hash memo: a file is hashed again only
                           when its stat changes; ctime and inode catch a same-size replacement whose mtime
                           was restored (ctime cannot be set by a user)
      stores(model, generation, rows, keys)   per model: generation of its files, rows written, feature keys
      contents(model, sha, row, failed)       content → its feature row, or why it does not decode
    <model-key>/feat.<gen>.<key>.bin   raw row-major arrays (floats as float16), opened memory-mapped
    <model-key>/norms.<gen>.bin        float32 1/‖global‖ per row: the exact scan's normaliser
    <model-key>/<name>.<gen>.<...>     files derived from one generation (faiss index: retrieval/index.py)

Rows are keyed by file *content* (sha256), so renamed or copied files reuse their features and an edited
file gets new ones. A sync hashes the files, embeds the contents the store lacks (holding no lock), then
runs ONE write transaction: cut the row files back to the committed row count (bytes a killed writer
appended), append the new rows, record them and the memo, forget contents no longer in the gallery, commit.
Readers never wait (WAL) and map only committed rows, so an append never disturbs them. When dead rows
outnumber live ones (or a feature grows wider), the transaction writes the next generation instead and
deletes the old one's files after the commit; a reader that mapped them keeps them (POSIX keeps unlinked
mapped files alive). A killed sync leaves the catalogue as it was; its appended bytes or next-generation
files are removed by the next writer. A damaged catalogue or row file is rebuilt, with a message.
A `GalleryCache` kept by a process (`ped serve` syncs before every search) answers a sync whose directory
listing (paths, sizes, mtimes, ctimes, inodes) is that of its last clean sync without opening the catalogue.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pedcli.engine.distributed import DistContext
from pedcli.engine.embed import embed_images, load_rgb, stack_padded
from pedcli.errors import PedError
from pedcli.fileio import sha256_bytes, sha256_file
from pedcli.models.methods.base import Features, Method

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CACHE_DIRNAME = ".pedcli"
CATALOG = "catalog.sqlite"
CATALOG_FORMAT = 2  # PRAGMA user_version; 1 was the JSON store (store.json, files.json)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
LOCK_TIMEOUT_S = 600.0
DECODE_WORKERS = min(4, max(1, (os.cpu_count() or 1) - 1))  # JPEG decoding beside the encoder
COMPACT_MIN_DEAD = 1024  # dead rows are rewritten away only past this many (and past the live rows)
LEGACY_ROOT_FILES = ("files.json", "files.json.lock", "checkpoints.json", "checkpoints.json.lock")
SCHEMA = """
CREATE TABLE IF NOT EXISTS files(kind TEXT, path TEXT, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER,
                                 inode INTEGER, sha TEXT, PRIMARY KEY (kind, path));
CREATE TABLE IF NOT EXISTS stores(model TEXT PRIMARY KEY, generation INTEGER, rows INTEGER, keys TEXT);
CREATE TABLE IF NOT EXISTS contents(model TEXT, sha TEXT, row INTEGER, failed TEXT, PRIMARY KEY (model, sha));
"""

Encoder = Callable[[Method, Sequence[np.ndarray]], Features]
Progress = Callable[[int, int], None]  # (new images decoded and embedded so far, new images to embed)
Listing = tuple[tuple[str, tuple[int, int, int, int] | str], ...]  # (path, stat key or why not) per file


class DamagedStore(Exception):
    """The catalogue or a row file cannot be read as written; the cache is rebuilt."""


def _listing(gallery: Path) -> Listing:
    """Each image file's gallery-relative POSIX path and stat key (or why it cannot be stat'ed)."""
    out: list[tuple[str, tuple[int, int, int, int] | str]] = []
    for rel in image_names(gallery):
        try:
            out.append((rel, stat_key(os.stat(os.path.join(gallery, rel)))))
        except OSError as e:
            out.append((rel, str(e.strerror or e)))
    return tuple(out)


def image_names(gallery: Path) -> list[str]:
    """Gallery-relative POSIX paths of the image files under `gallery` (recursive, sorted), skipping
    hidden folders such as the cache. Plain strings: a search of `ped serve` lists the gallery every time."""
    if not gallery.is_dir():
        raise PedError(f"gallery folder {gallery} does not exist", "pass --gallery DIR with your images")
    found = []
    for dirpath, dirnames, filenames in os.walk(gallery):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, gallery)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        found += [prefix + n for n in sorted(filenames) if n.lower().endswith(IMAGE_SUFFIXES)]
    return found


def find_images(gallery: Path) -> list[Path]:
    """Image files under `gallery` (recursive, sorted), skipping hidden folders such as the cache."""
    return [gallery / rel for rel in image_names(gallery)]


def model_key(checkpoint_sha256: str, config: dict[str, Any]) -> str:
    """Folder name for one model: the checkpoint's content plus everything that shapes image features."""
    what = {
        "checkpoint": checkpoint_sha256,
        "method": config["method"],
        "method_config": config["method_config"],
        "data_info": config["data_info"],
    }
    return f"{config['method']}-{sha256_bytes(json.dumps(what, sort_keys=True).encode())[:16]}"


def gallery_slug(gallery: Path) -> str:
    """One folder per gallery in a shared cache dir, so galleries never evict each other's rows."""
    resolved = gallery.resolve()
    return f"{resolved.name}-{sha256_bytes(str(resolved).encode())[:12]}"


def can_write(folder: Path) -> bool:
    """Whether this process may create files in `folder` (made if absent): tried, since permission bits,
    read-only mounts and ACLs all decide it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def cache_root(gallery: Path, cache_dir: Path | None) -> Path:
    """Where the gallery's feature cache lives: `--cache-dir`, else inside the gallery, else (a gallery
    this user cannot write: a mounted evidence folder, a shared drive) the per-user cache dir, said so."""
    if cache_dir is not None:
        root = Path(cache_dir) / gallery_slug(gallery)
        if not can_write(root):
            raise PedError(f"the cache dir {cache_dir} cannot be written", "pass a writable --cache-dir")
        return root
    own = gallery / CACHE_DIRNAME
    if can_write(own):
        return own
    root = Path(platformdirs.user_cache_dir("pedcli")) / "galleries" / gallery_slug(gallery)
    if not can_write(root):
        raise PedError(
            f"neither {gallery} nor the user cache dir {root.parent} can be written",
            "pass a writable --cache-dir",
        )
    log.info(f"{gallery} is read-only: its feature cache is kept in {root}")
    return root


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
    inv_norms: np.ndarray | None = None  # float32 1/‖global‖ of every store row (None: computed on use)

    @cached_property
    def alive(self) -> np.ndarray:
        """bool [store rows]: the rows of this gallery's images. Built once per gallery state, not per
        query: at 10M rows building it took ~14 ms of each query (benchmarks/bench_query.py)."""
        mask = np.zeros(len(self.features["global"]), dtype=bool)
        mask[self.rows] = True
        return mask

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
    """One committed state of a model's store, its row files mapped."""

    generation: int
    rows: int  # rows written to the row files, live or dead
    keys: dict[str, tuple[str, tuple[int, ...]]]  # feature key → (dtype, row shape)
    contents: dict[str, int]  # sha → row
    failed: dict[str, str]  # sha → why it does not decode
    features: dict[str, np.ndarray]
    inv_norms: np.ndarray


class Catalog:
    """The SQLite catalogue of one cache root (see the module docstring); autocommit, explicit BEGINs."""

    def __init__(self, root: Path) -> None:
        self.path = root / CATALOG
        try:
            self.db = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT_S, isolation_level=None)
            self._wal()
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, CATALOG_FORMAT):
                raise DamagedStore(f"catalogue format {version}, this pedcli writes {CATALOG_FORMAT}")
            if version == 0:
                with self.write():  # IF NOT EXISTS: racing creators agree
                    for statement in SCHEMA.split(";"):
                        self.db.execute(statement)
                    self.db.execute(f"PRAGMA user_version={CATALOG_FORMAT}")
        except sqlite3.DatabaseError as e:
            raise damage(self.path, e) from e

    def _wal(self) -> None:
        """Switch to the WAL journal. Two processes creating the catalogue at once may see SQLITE_BUSY
        here without the busy timeout applying (SQLite's deadlock avoidance), so wait and retry."""
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot (never waits for a writer)."""
        self.db.execute("BEGIN")
        try:
            yield self.db
        finally:
            self.db.execute("COMMIT")

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """The one writer of this catalogue (waits up to LOCK_TIMEOUT_S for another); rolled back on error."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def memo(self, kind: str) -> dict[str, tuple[tuple[int, int, int, int], str]]:
        """path → (stat key, sha256) of every memoised file of `kind`."""
        with self.read() as db:
            got = db.execute(
                "SELECT path, size, mtime_ns, ctime_ns, inode, sha FROM files WHERE kind=?", (kind,)
            )
            return {p: ((s, m, c, i), sha) for p, s, m, c, i, sha in got}

    def close(self) -> None:
        self.db.close()


def damage(path: Path, e: sqlite3.DatabaseError) -> Exception:
    """`DamagedStore` for a damaged database file; any other database error (a lock held too long, a full
    disk) as a clear error instead, since rebuilding would not help."""
    if getattr(e, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return DamagedStore(f"{path}: {e}")
    return PedError(f"the gallery cache {path} cannot be used ({e})", "run the query again")


def stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def checkpoint_sha(root: Path, checkpoint: Path) -> str:
    """sha256 of a checkpoint, memoised in the catalogue so that it is hashed once, not on every query."""
    catalog = _open_catalog(root)
    path = str(checkpoint.resolve())
    key = stat_key(checkpoint.stat())
    hit = catalog.memo("checkpoint").get(path)
    if hit is not None and hit[0] == key:
        catalog.close()
        return hit[1]
    sha = sha256_file(checkpoint)
    with catalog.write() as db:
        db.execute("INSERT OR REPLACE INTO files VALUES ('checkpoint', ?, ?, ?, ?, ?, ?)", (path, *key, sha))
    catalog.close()
    return sha


def _open_catalog(root: Path) -> Catalog:
    """The catalogue at `root`; a damaged one (and every row file it described) is removed and rebuilt."""
    try:
        return Catalog(root)
    except DamagedStore as e:
        log.warning(f"the gallery cache {root} is damaged ({e}): rebuilding it")
        _wipe(root)
        return Catalog(root)


def _wipe(root: Path) -> None:
    """Remove the catalogue and the model folders of a cache root (everything in it is ours)."""
    for f in root.iterdir():
        if f.is_dir():
            shutil.rmtree(f, ignore_errors=True)
        elif f.name.startswith(CATALOG):
            f.unlink(missing_ok=True)


class GalleryCache:
    """Per-model feature store of a gallery; `sync` brings it up to date and maps the current files."""

    def __init__(self, gallery: Path, root: Path, key: str) -> None:
        self.gallery = gallery
        self.root = root
        self.key = key
        self.dir = root / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self._last: tuple[Listing, GalleryFeatures] | None = None  # the last clean sync of this object

    # ---- the one public operation ---------------------------------------------------------------------
    def sync(
        self,
        method: Method,
        encode: Encoder | None = None,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        workers: int = DECODE_WORKERS,
        ctx: DistContext | None = None,
        progress: Progress | None = None,
    ) -> GalleryFeatures:
        """Hash the gallery files (memo), embed on `device` the contents the store lacks (decoded by
        `workers` processes when there are many; under `torchrun` (`ctx`) each rank embeds its share and
        rank 0 commits; `progress` hears of each batch), and map every path to its row. Unreadable files
        are skipped and listed, never fatal; a damaged cache is rebuilt.

        A gallery whose listing (paths, sizes, mtimes, ctimes, inodes) is what this object's last clean
        sync saw is answered from that sync without opening the catalogue: its rows are committed and
        never rewritten in place, and a compaction by another process leaves mapped files readable."""
        encode = encode or partial(encode_arrays, device=device)
        ctx = ctx or DistContext()
        listing = _listing(self.gallery)
        last = self._last
        if last is not None and last[0] == listing and not ctx.distributed and self._alive(last[1]):
            return last[1]
        try:
            return self._sync(listing, method, encode, batch_size, workers, ctx, progress)
        except DamagedStore as e:
            log.warning(f"the gallery cache {self.root} is damaged ({e}): rebuilding it")
            self._last = None
            _wipe(self.root)
            self.dir.mkdir(parents=True, exist_ok=True)
            return self._sync(listing, method, encode, batch_size, workers, ctx, progress)

    def _alive(self, feats: GalleryFeatures) -> bool:
        """Whether the generation `feats` maps is still the current one (its global row file exists), so
        derived files such as the faiss index are kept for it."""
        return "global" not in feats.features or self._file(feats.generation, "global").exists()

    def _sync(
        self,
        listing: Listing,
        method: Method,
        encode: Encoder,
        batch_size: int,
        workers: int,
        ctx: DistContext,
        progress: Progress | None,
    ) -> GalleryFeatures:
        with _catalog(self.root) as catalog:
            paths, shas, memo, skipped = self._hash_files(catalog, listing)
            store = self._read(catalog)
        missing = ctx.broadcast(_missing(shas, store))  # rank 0's view: every rank splits the same list
        mine = _rank_share(missing, batch_size, ctx)
        new, failed, unread = self._embed(paths, shas, mine, method, encode, batch_size, workers, progress)
        if ctx.distributed:
            new, failed, unread = _joined(ctx.gather((new, failed, unread)))
        dead = (set(store.contents) | set(store.failed)) - set(shas)
        if (missing or memo or dead) and ctx.is_main:
            with _catalog(self.root) as catalog:
                try:
                    store = self._commit(catalog, set(shas), new, failed, memo)
                except FileNotFoundError as e:  # a row file vanished under the write lock
                    raise DamagedStore(str(e)) from e
        if ctx.distributed:
            ctx.barrier()  # rank 0 has committed
            if not ctx.is_main:
                with _catalog(self.root) as catalog:
                    store = self._read(catalog)
        embedded = len(new[0]) if new is not None else 0
        out = self._mapped(store, paths, shas, skipped, embedded, unread)
        clean = not skipped and not unread and not ctx.distributed  # nothing to retry next time
        self._last = (listing, replace(out, embedded=0)) if clean else None
        return out

    # ---- hashing and embedding (no lock held) ---------------------------------------------------------
    def _hash_files(
        self, catalog: Catalog, listing: Listing
    ) -> tuple[list[Path], list[str], dict[str, Any], list[tuple[Path, str]]]:
        """(paths, their sha256, memo changes {rel path: (stat key, sha) or None = forget}, skipped) of
        the files of `listing`."""
        known = catalog.memo("image")
        paths, shas, skipped, memo = [], [], [], {}
        for rel, key in listing:
            p = self.gallery / rel
            try:
                if isinstance(key, str):
                    raise OSError(key)
                hit = known.pop(rel, None)
                if hit is not None and hit[0] == key:
                    sha = hit[1]
                else:
                    sha = sha256_file(p)
                    memo[rel] = (key, sha)
                shas.append(sha)
                paths.append(p)
            except OSError as e:
                skipped.append((p, f"cannot read the file ({e.strerror or e})"))
        memo |= dict.fromkeys(known)  # files gone since the last sync
        return paths, shas, memo, skipped

    def _embed(
        self,
        paths: list[Path],
        shas: list[str],
        missing: list[str],
        method: Method,
        encode: Encoder,
        batch_size: int,
        workers: int,
        progress: Progress | None = None,
    ) -> tuple[tuple[list[str], Features] | None, dict[str, str], dict[str, str]]:
        """Decode (in DataLoader workers when there are a few batches) and encode the files of the
        `missing` contents a batch at a time. Contents that do not decode go to `failed` (kept in the
        store: reported without decoding again); files that vanished or may not be read to `unread`
        (skipped now, not remembered)."""
        if not missing:
            return None, {}, {}
        by_sha = {s: p for p, s in zip(paths, shas, strict=True)}
        files = [by_sha[s] for s in missing]
        done: list[str] = []
        parts: dict[str, list[torch.Tensor]] = {}
        failed: dict[str, str] = {}
        unread: dict[str, str] = {}
        log.info(f"embedding {len(files)} new image(s)")
        # starting workers costs ~1 s; a daemon process (a pool's worker) may not start any
        many = len(files) >= 4 * batch_size and not multiprocessing.current_process().daemon
        procs = workers if many else 0
        loader = DataLoader(_Decoded(files), batch_size=batch_size, num_workers=procs, collate_fn=list)
        for batch in tqdm(loader, desc="images", unit="batch", disable=len(loader) < 4):
            arrays, ok = [], []
            for i, rgb, (why, reason) in batch:
                sha = missing[i]
                if rgb is not None:
                    arrays.append(rgb)
                    ok.append(sha)
                else:
                    (unread if why == "unread" else failed)[sha] = reason
            if arrays:
                for k, v in encode(method, arrays).items():
                    parts.setdefault(k, []).append(v)
                done += ok
            if progress is not None:
                progress(len(done) + len(failed) + len(unread), len(files))
        new = (done, {k: stack_padded(v) for k, v in parts.items()}) if done else None
        return new, failed, unread

    # ---- reading and writing the store ----------------------------------------------------------------
    def _read(self, catalog: Catalog) -> _Store:
        """The committed store, mapped. A generation switch between reading the catalogue and opening the
        files (a compaction deleted them) is read again; files missing under a steady catalogue are damage."""
        for _attempt in range(3):
            with catalog.read() as db:
                store = self._load(db)
            try:
                return self._map(store)
            except FileNotFoundError:
                continue
        raise DamagedStore(f"the row files of {self.dir} are missing")

    def _load(self, db: sqlite3.Connection) -> _Store:
        got = db.execute("SELECT generation, rows, keys FROM stores WHERE model=?", (self.key,)).fetchone()
        gen, rows, keys = got if got is not None else (0, 0, "{}")
        contents, failed = {}, {}
        for sha, row, why in db.execute("SELECT sha, row, failed FROM contents WHERE model=?", (self.key,)):
            if row is None:
                failed[sha] = why
            else:
                contents[sha] = row
        shapes = {k: (d, tuple(s)) for k, (d, s) in json.loads(keys).items()}
        return _Store(gen, rows, shapes, contents, failed, {}, np.empty(0, np.float32))

    def _map(self, store: _Store) -> _Store:
        store.features = {
            k: _open_rows(self._file(store.generation, k), dtype, (store.rows, *shape))
            for k, (dtype, shape) in store.keys.items()
        }
        if "global" in store.keys:
            store.inv_norms = _open_rows(self._file(store.generation, None), "float32", (store.rows,))
        return store

    def _file(self, generation: int, key: str | None) -> Path:
        """A row file: feat.<gen>.<key>.bin, or norms.<gen>.bin for key None."""
        return self.dir / (f"feat.{generation}.{key}.bin" if key is not None else f"norms.{generation}.bin")

    def _commit(
        self,
        catalog: Catalog,
        keep: set[str],
        new: tuple[list[str], Features] | None,
        new_failed: dict[str, str],
        memo: dict[str, Any],
    ) -> _Store:
        """The one write transaction of a sync (see the module docstring); returns the store it committed,
        mapped before the commit so that no compaction can remove its files first."""
        old_generation = None
        with catalog.write() as db:
            store = self._load(db)
            self._tidy(store)
            dead = [s for s in store.contents if s not in keep]
            db.executemany("DELETE FROM contents WHERE model=? AND sha=?", [(self.key, s) for s in dead])
            db.executemany(
                "DELETE FROM contents WHERE model=? AND sha=?",
                [(self.key, s) for s in store.failed if s not in keep],
            )
            live = {s: r for s, r in store.contents.items() if s in keep}
            add_shas, add = _new_rows(new, live, store.failed)
            keys = _widest(store.keys, add)
            compact = keys != store.keys or (
                len(dead) + store.rows - len(store.contents) > max(COMPACT_MIN_DEAD, len(live))
            )
            if compact:
                old_generation = store.generation
                store = self._rewrite(self._map(store), live, keys)
                db.executemany(
                    "UPDATE contents SET row=? WHERE model=? AND sha=?",
                    [(r, self.key, s) for s, r in store.contents.items()],
                )
            if add_shas:
                first = self._append(store, add)
                db.executemany(
                    "INSERT OR REPLACE INTO contents VALUES (?, ?, ?, NULL)",
                    [(self.key, s, first + i) for i, s in enumerate(add_shas)],
                )
            db.executemany(
                "INSERT OR IGNORE INTO contents VALUES (?, ?, NULL, ?)",
                [(self.key, s, why) for s, why in new_failed.items()],
            )
            db.executemany(
                "DELETE FROM files WHERE kind='image' AND path=?",
                [(p,) for p, v in memo.items() if v is None],
            )
            db.executemany(
                "INSERT OR REPLACE INTO files VALUES ('image', ?, ?, ?, ?, ?, ?)",
                [(p, *v[0], v[1]) for p, v in memo.items() if v is not None],
            )
            db.execute(
                "INSERT OR REPLACE INTO stores VALUES (?, ?, ?, ?)",
                (self.key, store.generation, store.rows, json.dumps(store.keys)),
            )
            committed = self._map(self._load(db))
        if old_generation is not None:
            self._drop(lambda gen: gen == old_generation)
        return committed

    def _tidy(self, store: _Store) -> None:
        """Remove what no committed state refers to: files of other generations (a finished compaction's
        old ones, a killed one's new ones, derived files made for them) and bytes past the committed rows
        (a killed writer's append), and the files of the JSON store this catalogue replaced. Call with
        the write lock held."""
        self._drop(lambda gen: gen != store.generation)
        for f in [*self.dir.glob("*.npy"), self.dir / "store.json", self.dir / ".lock"]:
            f.unlink(missing_ok=True)
        for name in LEGACY_ROOT_FILES:
            (self.root / name).unlink(missing_ok=True)
        for k, (dtype, shape) in [*store.keys.items(), *([(None, ("float32", ()))] if store.keys else [])]:
            path = self._file(store.generation, k)
            size = store.rows * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if path.is_file() and path.stat().st_size > size:
                os.truncate(path, size)

    def _drop(self, which: Callable[[int], bool]) -> None:
        """Delete the generation files (every name is NAME.GEN.…) of the generations `which` picks."""
        for f in self.dir.iterdir():
            parts = f.name.split(".")
            if len(parts) > 2 and parts[1].isdigit() and which(int(parts[1])):
                f.unlink(missing_ok=True)

    def _rewrite(self, store: _Store, live: dict[str, int], keys: dict[str, Any]) -> _Store:
        """Generation + 1 holding only the live rows (renumbered), each feature padded to `keys`' shape."""
        order = sorted(live, key=live.__getitem__)
        rows = np.array([live[s] for s in order], dtype=np.int64)
        gen = store.generation + 1
        out = _Store(gen, 0, keys, {s: i for i, s in enumerate(order)}, store.failed, {}, np.empty(0))
        block = {k: _fit(np.asarray(store.features[k][rows]), keys[k]) for k in store.features}
        if len(rows):
            self._append(out, block, norms=store.inv_norms[rows] if "global" in store.keys else None)
        return out

    def _append(self, store: _Store, block: dict[str, np.ndarray], norms: np.ndarray | None = None) -> int:
        """Append rows to the row files (flushed to disk before the commit that names them); their first
        row number. Features are padded to the store's shapes; the norms are computed unless given."""
        n = len(next(iter(block.values())))
        arrays = {k: _fit(v, store.keys[k]) for k, v in block.items()}
        if "global" in arrays:
            arrays[None] = norms if norms is not None else _inverse_norms(arrays["global"])  # type: ignore[index]
        for k, arr in arrays.items():
            with open(self._file(store.generation, k), "ab") as f:
                f.write(np.ascontiguousarray(arr).tobytes())
                f.flush()
                os.fsync(f.fileno())
        first = store.rows
        store.rows += n
        return first

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
        keep = [(p, s) for p, s in zip(paths, shas, strict=True) if s not in why]
        skipped = skipped + [(p, why[s]) for p, s in zip(paths, shas, strict=True) if s in why]
        absent = [p for p, s in keep if s not in store.contents]
        if absent:
            raise DamagedStore(f"no row for {absent[0]}")
        rows = np.array([store.contents[s] for _, s in keep], dtype=np.int64)
        return GalleryFeatures(
            [p for p, _ in keep],
            rows,
            store.features,
            self.dir,
            store.generation,
            skipped,
            embedded,
            store.inv_norms if "global" in store.keys else None,
        )


class _Decoded(Dataset):
    """Files → (index, RGB array or None, (kind, reason) of a failure): decoding runs in the DataLoader's
    worker processes. `unread` (vanished, no permission) is not remembered; `failed` (not an image) is."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, tuple[str, str]]:
        try:
            return i, load_rgb(self.files[i]), ("", "")
        except (FileNotFoundError, PermissionError) as e:
            return i, None, ("unread", f"cannot read the file ({e.strerror or e})")
        except DECODE_ERRORS as e:
            return i, None, ("failed", f"not a readable image ({type(e).__name__}: {e})")


@contextlib.contextmanager
def _catalog(root: Path) -> Iterator[Catalog]:
    """The catalogue, open for one step of a sync (closed while embedding: DataLoader workers fork, and a
    forked SQLite connection must not be used, nor kept across the fork); database damage → DamagedStore."""
    catalog = _open_catalog(root)
    try:
        yield catalog
    except sqlite3.DatabaseError as e:
        raise damage(catalog.path, e) from e
    finally:
        catalog.close()


def _rank_share(missing: list[str], batch_size: int, ctx: DistContext) -> list[str]:
    """This rank's contiguous block of whole batches of `missing` (all of it for one process)."""
    batches = -(-len(missing) // batch_size)
    lo, hi = (batches * r // ctx.world_size * batch_size for r in (ctx.rank, ctx.rank + 1))
    return missing[lo:hi]


def _joined(
    parts: list[tuple[tuple[list[str], Features] | None, dict[str, str], dict[str, str]]],
) -> tuple[tuple[list[str], Features] | None, dict[str, str], dict[str, str]]:
    """The ranks' `_embed` results as one, in rank order."""
    done = [p[0] for p in parts if p[0] is not None]
    new = None
    if done:
        new = (
            [s for d in done for s in d[0]],
            {k: stack_padded([d[1][k] for d in done]) for k in done[0][1]},
        )
    failed = {k: v for p in parts for k, v in p[1].items()}
    unread = {k: v for p in parts for k, v in p[2].items()}
    return new, failed, unread


def _open_rows(path: Path, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The first shape[0] rows of a row file, memory-mapped (FileNotFoundError when it is gone)."""
    need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    size = path.stat().st_size if need or path.exists() else 0
    if size < need:
        raise DamagedStore(f"{path} holds {size} bytes, {need} were committed")
    if need == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def _new_rows(
    new: tuple[list[str], Features] | None, live: dict[str, int], failed: dict[str, str]
) -> tuple[list[str], dict[str, np.ndarray]]:
    """The embedded contents no other writer stored meanwhile, as numpy blocks (floats as float16)."""
    if new is None:
        return [], {}
    pick = [i for i, s in enumerate(new[0]) if s not in live and s not in failed]
    block = {}
    for k, v in new[1].items():
        v = v[pick]
        block[k] = (v.half() if v.is_floating_point() else v).numpy()
    return [new[0][i] for i in pick], block if pick else {}


def _widest(keys: dict[str, Any], block: dict[str, np.ndarray]) -> dict[str, Any]:
    """Stored keys widened to hold `block` (e.g. a batch padded to more words than the stored rows)."""
    out = dict(keys)
    for k, v in block.items():
        shape = tuple(v.shape[1:])
        if k in out:
            shape = tuple(max(a, b) for a, b in zip(out[k][1], shape, strict=True))
        out[k] = (str(v.dtype), shape)
    return out


def _fit(arr: np.ndarray, spec: tuple[str, tuple[int, ...]]) -> np.ndarray:
    """`arr` zero-padded to the row shape of `spec` and cast to its dtype."""
    dtype, shape = spec
    pad = [(0, 0)] + [(0, want - have) for have, want in zip(arr.shape[1:], shape, strict=True)]
    padded = np.pad(arr, pad) if any(p for _, p in pad) else arr
    return padded.astype(dtype, copy=False)


def _inverse_norms(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows.astype(np.float32), axis=1)
    return np.where(norms > 0, 1.0 / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


def _missing(shas: list[str], store: _Store) -> list[str]:
    """Contents of the gallery that the store has neither features nor a decode failure for (each once)."""
    return [s for s in dict.fromkeys(shas) if s not in store.contents and s not in store.failed]


def encode_arrays(
    method: Method, arrays: Sequence[np.ndarray], device: str | torch.device = "cpu"
) -> Features:
    """Gallery images → features on `device`, prepared exactly as `ped embed` prepares loose images (plus
    pose maps from BlazePose for methods that read them)."""
    pose = pose_maps(method, arrays) if method.needs_pose else None
    return embed_images(method, list(arrays), batch_size=len(arrays), device=device, pose=pose)


def pose_maps(method: Method, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """BlazePose confidence maps [N, 14, H/8, W/8] of loose images (the cache's stride)."""
    from pedcli.engine.preprocess import POSE_STRIDE
    from pedcli.pose.blazepose import BlazePose

    h, w = method.info.image_size
    pose = BlazePose(map_hw=(h // POSE_STRIDE, w // POSE_STRIDE))
    return np.stack([pose.estimate(a).maps for a in arrays]).astype(np.float32)
