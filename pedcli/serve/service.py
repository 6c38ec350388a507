"""The search behind `ped serve`: one trained run loaded once, one gallery kept in sync, searches by text
(the ranking of `ped query`) and by image ("more like this").

Images are known to the web layer only by a catalogue id (a hash of the file's path relative to the
gallery, stable across syncs); a request can never name a path. Every search first syncs the gallery
incrementally (an unchanged gallery costs one stat per file and no catalogue access), so new files are
found without a restart; concurrent searches share one sync. The searching itself is the library's
(`search_texts`, `similar_files` of `pedcli.engine.search.query`), shared with `ped query`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pedcli.engine.distributed import resolve_device
from pedcli.engine.runs import METRICS, load_run, resolve_checkpoint
from pedcli.engine.search.gallery import GalleryFeatures, Progress, encode_arrays
from pedcli.engine.search.query import (
    Hit,
    Match,
    QueryReport,
    QueryResult,
    encode_queries,
    files_by_row,
    open_cache,
    search_texts,
    similar_files,
    text_pipeline,
)
from pedcli.engine.search.report import to_json
from pedcli.errors import PedError
from pedcli.fileio import sha256_bytes
from pedcli.models.methods.base import Features, Method

MAX_TOP = 200


def catalogue_id(relative: str) -> str:
    """The id of a gallery file: 16 hex digits of the hash of its gallery-relative POSIX path."""
    return sha256_bytes(relative.encode("utf-8"))[:16]


def run_metrics(run_dir: Path) -> dict[str, float]:
    """The validation metrics of the run's best epoch (metrics.jsonl), {} when it has none."""
    best: dict[str, float] = {}
    try:
        lines = (run_dir / METRICS).read_text(encoding="utf-8").splitlines()
    except OSError:
        return best
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("best") and isinstance(record.get("val"), dict):
            best = {k: float(v) for k, v in record["val"].items()}
    ranks = sorted((k for k in best if k.startswith("R@") and k[2:].isdigit()), key=lambda k: int(k[2:]))
    return {k: best[k] for k in ranks} | best  # R@1, R@5, R@10 first, then mAP, mINP as written


@dataclass
class SyncState:
    """What the page shows while a sync runs: images embedded of the images to embed."""

    running: bool = False
    done: int = 0
    total: int = 0
    error: str = ""
    synced: bool = False  # at least one sync finished

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("running", "done", "total", "error", "synced")}


@dataclass
class Catalogue:
    """The gallery as last synced: each file's id, path and store row."""

    features: GalleryFeatures
    ids: list[str] = field(default_factory=list)
    by_id: dict[str, int] = field(default_factory=dict)  # id → index into features.paths
    by_row: dict[int, list[int]] = field(default_factory=dict)  # store row → files (same content, one row)

    @classmethod
    def of(cls, features: GalleryFeatures, gallery: Path) -> Catalogue:
        ids = [catalogue_id(p.relative_to(gallery).as_posix()) for p in features.paths]
        return cls(features, ids, {i: k for k, i in enumerate(ids)}, files_by_row(features))


class SearchService:
    """A run and a gallery, ready to answer searches (thread-safe: the web layer calls it from a pool)."""

    def __init__(
        self,
        run: str | Path,
        gallery: str | Path,
        *,
        checkpoint: str = "best",
        cache_dir: str | Path | None = None,
        device: str | None = None,
        batch_size: int = 32,
    ) -> None:
        self.gallery = Path(gallery).resolve()
        if not self.gallery.is_dir():
            raise PedError(f"gallery folder {gallery} does not exist", "pass --gallery DIR with your images")
        self.run_dir, self.checkpoint = resolve_checkpoint(run, checkpoint)
        self.device = resolve_device(device)
        self.method, self.config = load_run(run, checkpoint, device=self.device)
        self.pipeline = text_pipeline(self.run_dir, self.config)
        self.metrics = run_metrics(self.run_dir)
        self.batch_size = batch_size
        self.cache = open_cache(self.gallery, cache_dir, self.checkpoint, self.config)
        self.state = SyncState()
        self._catalogue: Catalogue | None = None
        self._synced_at = -1.0  # perf_counter at the start of the last finished sync
        self._sync_lock = threading.Lock()
        self._model_lock = threading.Lock()  # one model call at a time: 2 shared cores, no oversubscription

    # ---- syncing ------------------------------------------------------------------------------------
    def sync(self, progress: Progress | None = None) -> Catalogue:
        """The gallery as of now: embeds new files; a sync that started after this call began is reused."""
        asked = time.perf_counter()
        with self._sync_lock:
            if self._catalogue is not None and self._synced_at >= asked:
                return self._catalogue
            started = time.perf_counter()
            self.state = SyncState(running=True, synced=self._catalogue is not None)

            def count(done: int, total: int) -> None:
                self.state.done, self.state.total = done, total
                if progress is not None:
                    progress(done, total)

            try:
                feats = self.cache.sync(
                    self.method, encode=self._encode, batch_size=self.batch_size, progress=count
                )
            except Exception as e:
                self.state.error = str(e)
                self.state.running = False
                raise
            if self._catalogue is None or feats is not self._catalogue.features:  # else: nothing changed
                self._catalogue = Catalogue.of(feats, self.gallery)
            self._synced_at = started
            self.state = SyncState(done=self.state.done, total=self.state.total, synced=True)
            return self._catalogue

    def _encode(self, method: Method, arrays: Sequence[np.ndarray]) -> Features:
        """The library's gallery encoder, holding the model lock (searches run beside a sync)."""
        with self._model_lock:
            return encode_arrays(method, arrays, device=self.device)

    # ---- searching ----------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The page header: gallery size, method, run, its validation metrics, and the sync state."""
        cat = self._catalogue
        return {
            "method": self.config["method"],
            "run": self.run_dir.name,
            "gallery": self.gallery.name,
            "gallery_size": len(cat.ids) if cat is not None else None,
            "skipped": len(cat.features.skipped) if cat is not None else 0,
            "metrics": self.metrics,
            "sync": self.state.to_dict(),
        }

    def search(self, query: str, top: int = 10, min_score: float | None = None) -> dict[str, Any]:
        """Rank the gallery for one sentence: `ped query --json`'s fields, each result with id and view."""
        query = query.strip()
        if not query:
            raise PedError("no query given", "pass a sentence, e.g. ?q=a woman in a red shirt")
        top = _check_top(top)
        cat = self.sync()
        unknown = self.pipeline.unknown_words([query])[0]  # refuses a query of unknown words only
        with self._model_lock:
            text, phrases = encode_queries(self.method, self.pipeline, [query], self.device)
            kind, (hits,) = search_texts(
                self.method,
                cat.features,
                text,
                phrases,
                top=top,
                min_score=min_score,
                device=self.device,
                explain=True,
                by_row=cat.by_row,
            )
        return self._answer(cat, query, phrases[0], hits, kind, unknown)

    def similar(self, image_id: str, top: int = 10) -> dict[str, Any]:
        """Images whose global feature is closest (cosine) to that of image `image_id`, itself excluded
        (`similar_files`: one index search)."""
        top = _check_top(top)
        cat = self.sync()
        k0 = cat.by_id.get(image_id)
        if k0 is None:
            raise KeyError(image_id)
        kind, hits = similar_files(cat.features, k0, top, by_row=cat.by_row)
        name = cat.features.paths[k0].relative_to(self.gallery).as_posix()
        return self._answer(cat, f"more like {name}", [], hits, kind) | {"similar_to": image_id}

    def _answer(
        self,
        cat: Catalogue,
        query: str,
        phrases: list[str],
        hits: list[Hit],
        kind: str,
        unknown: list[str] | None = None,
    ) -> dict[str, Any]:
        """`ped query --json` for one query (report.to_json), plus each result's id, name and view."""
        feats = cat.features
        ranked = [Match(i + 1, h.score, feats.paths[h.file], h.view) for i, h in enumerate(hits)]
        result = QueryResult(query, ranked, phrases, unknown or [])
        report = QueryReport(
            self.run_dir,
            self.checkpoint,
            self.config["method"],
            self.gallery,
            kind,
            len(feats.paths),
            feats.embedded,
            [result],
            feats.skipped,
        )
        out = to_json(report)
        for r, h in zip(out["queries"][0]["results"], hits, strict=True):
            r |= {"id": cat.ids[h.file], "name": feats.paths[h.file].relative_to(self.gallery).as_posix()}
            r["view"] = h.view.to_dict()
        return out

    def image_path(self, image_id: str) -> Path | None:
        """The file of a catalogue id, or None: the only way the web layer finds a file."""
        cat = self._catalogue
        if cat is None or image_id not in cat.by_id:
            return None
        return cat.features.paths[cat.by_id[image_id]]


def _check_top(top: int) -> int:
    if not 1 <= top <= MAX_TOP:
        raise PedError(f"top must be between 1 and {MAX_TOP}, not {top}")
    return top
