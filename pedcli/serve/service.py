"""The search behind `ped serve`: one trained run loaded once, one gallery kept in sync, searches by text
(the ranking of `ped query`) and by image ("more like this").

Images are known to the web layer only by a catalogue id (a hash of the file's path relative to the
gallery, stable across syncs); a request can never name a path. Every search first syncs the gallery
incrementally (the hash memo makes an unchanged gallery cost one stat per file), so new files are found
without a restart; concurrent searches share one sync.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pedcli.engine.distributed import resolve_device
from pedcli.engine.embed import embed_images
from pedcli.engine.explain_view import View, views
from pedcli.engine.gallery import (
    GalleryCache,
    GalleryFeatures,
    cache_root,
    checkpoint_sha,
    find_images,
    model_key,
    pose_maps,
)
from pedcli.engine.index import flat_search
from pedcli.engine.query import (
    DEFAULT_RERANK_TOP,
    Match,
    QueryReport,
    QueryResult,
    choose_index,
    encode_queries,
    rank_query,
    shortlist_rows,
    text_pipeline,
)
from pedcli.engine.report import to_json
from pedcli.engine.runs import METRICS, load_run, resolve_checkpoint
from pedcli.errors import PedError
from pedcli.fileio import sha256_bytes
from pedcli.models.methods.base import Features, Method

Progress = Callable[[int, int], None]  # (images embedded so far, images to embed)
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
        by_row: dict[int, list[int]] = {}
        for k, r in enumerate(features.rows):
            by_row.setdefault(int(r), []).append(k)
        return cls(features, ids, {i: k for k, i in enumerate(ids)}, by_row)


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
        log: Callable[[str], None] = lambda _: None,
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
        root = cache_root(self.gallery, None if cache_dir is None else Path(cache_dir), log)
        key = model_key(checkpoint_sha(root, self.checkpoint), self.config)
        self.cache = GalleryCache(self.gallery, root, key)
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
            first = self._catalogue is None
            self.state = SyncState(
                running=True, total=len(find_images(self.gallery)) if first else 0, synced=not first
            )
            try:
                feats = self.cache.sync(
                    self.method, encode=self._encoder(progress), batch_size=self.batch_size
                )
            except Exception as e:
                self.state.error = str(e)
                self.state.running = False
                raise
            self._catalogue = Catalogue.of(feats, self.gallery)
            self._synced_at = started
            self.state = SyncState(done=self.state.done, total=self.state.total, synced=True)
            return self._catalogue

    def _encoder(self, progress: Progress | None) -> Callable[[Method, Sequence[np.ndarray]], Features]:
        """Gallery images → features as `ped query` makes them, counting the images for the progress bars."""

        def encode(method: Method, arrays: Sequence[np.ndarray]) -> Features:
            pose = pose_maps(method, arrays) if method.needs_pose else None
            with self._model_lock:
                out = embed_images(
                    method, list(arrays), batch_size=len(arrays), pose=pose, device=self.device
                )
            self.state.done += len(arrays)
            self.state.total = max(self.state.total, self.state.done)
            if progress is not None:
                progress(self.state.done, self.state.total)
            return out

        return encode

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
        feats = cat.features
        unknown = self.pipeline.unknown_words([query])[0]  # refuses a query of unknown words only
        with self._model_lock:
            text, phrases = encode_queries(self.method, self.pipeline, [query], self.device)
            rows = np.empty(0, dtype=np.int64)
            kind = choose_index("auto", len(feats.rows))
            if len(feats.rows):
                rows = shortlist_rows(
                    feats, text["global"].float().numpy(), max(top, DEFAULT_RERANK_TOP), kind
                )[0]
            ranked = rank_query(self.method, feats, text, rows, top, min_score, self.device)
            matched = [(k, s, r) for r, s in ranked for k in cat.by_row[r]][:top]
            shown = [View() for _ in matched]
            if matched:
                picked = feats.gather(np.array([r for _, _, r in matched]))
                shown = views(self.method.explain(text, picked), len(matched), phrases[0])
        matches = [(k, s, v) for (k, s, _), v in zip(matched, shown, strict=True)]
        return self._answer(cat, query, phrases[0], matches, kind, unknown)

    def similar(self, image_id: str, top: int = 10) -> dict[str, Any]:
        """Images whose global feature is closest (cosine) to that of image `image_id`, itself excluded.
        Image→image has no exact pair score in the methods, so the cosine is the score."""
        top = _check_top(top)
        cat = self.sync()
        k0 = cat.by_id.get(image_id)
        if k0 is None:
            raise KeyError(image_id)
        feats = cat.features
        base = feats.features["global"]
        row0 = int(feats.rows[k0])
        scores, rows = flat_search(base, np.asarray(base[row0 : row0 + 1], dtype=np.float32), base.shape[0])
        matches = [  # rows of other gallery states (not in by_row) never show
            (k, float(s), View())
            for s, r in zip(scores[0], rows[0], strict=True)
            for k in cat.by_row.get(int(r), [])
            if k != k0
        ][:top]
        name = feats.paths[k0].relative_to(self.gallery).as_posix()
        return self._answer(cat, f"more like {name}", [], matches, "flat") | {"similar_to": image_id}

    def _answer(
        self,
        cat: Catalogue,
        query: str,
        phrases: list[str],
        matches: list[tuple[int, float, View]],
        kind: str,
        unknown: list[str] | None = None,
    ) -> dict[str, Any]:
        """`ped query --json` for one query (report.to_json), plus each result's id, name and view."""
        feats = cat.features
        ranked = [Match(i + 1, s, feats.paths[k], v) for i, (k, s, v) in enumerate(matches)]
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
        for r, (k, _, v) in zip(out["queries"][0]["results"], matches, strict=True):
            r |= {"id": cat.ids[k], "name": feats.paths[k].relative_to(self.gallery).as_posix()}
            r["view"] = v.to_dict()
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
