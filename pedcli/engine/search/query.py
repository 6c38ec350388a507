"""`ped query`: rank the images of a folder by a sentence, with a trained run.

1. The run's method and its text pipeline (vocab.json + the text options in config.json): a query goes
   through exactly what the training captions went through.
2. The gallery's features from the per-model cache (`pedcli.engine.search.gallery`): only new or changed
   images are embedded; unreadable ones are reported and skipped.
3. A shortlist by cosine of the "global" features (`pedcli.engine.retrieval.index`: exact flat scan or faiss
   IVF), then the method's exact score of the shortlisted pairs (`pair_similarity`, the two-stage scoring of
   `ped eval --rerank-top`). For embedding methods (global cosine) the second stage changes nothing; for
   cross-attention methods it is the real score. A gallery no larger than the shortlist is scored whole.
4. `--min-score` cuts the ranking, so "no match" is an answer; `--top K` keeps the K best.

Steps 3–4 (and the explanation of the matches) are `search_texts`, and image→image search is
`similar_files`: `ped serve` calls the same two functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pedcli.data.dataset import TEXT_BATCH_KEYS
from pedcli.engine.distributed import setup, teardown
from pedcli.engine.embed import for_inference
from pedcli.engine.retrieval.index import choose_index, normalize_rows, search_store
from pedcli.engine.retrieval.scoring import shortlist_scores
from pedcli.engine.runs import VOCAB, load_run, resolve_checkpoint
from pedcli.engine.search.explain_view import View, views
from pedcli.engine.search.gallery import GalleryCache, GalleryFeatures, cache_root, checkpoint_sha, model_key
from pedcli.errors import PedError
from pedcli.models.methods.base import Batch, Features, Method, index_features
from pedcli.text.pipeline import TextPipeline
from pedcli.text.vocab import Vocab

DEFAULT_RERANK_TOP = 100


@dataclass
class Match:
    rank: int
    score: float
    path: Path
    view: View = field(default_factory=View)


@dataclass
class QueryResult:
    query: str
    matches: list[Match]
    phrases: list[str] = field(default_factory=list)  # the query's noun phrases, as the pipeline found them
    unknown: list[str] = field(default_factory=list)  # the query's words outside the run's vocabulary


@dataclass
class Hit:
    """One ranked gallery file: its index in `GalleryFeatures.paths`, its score and its explanation."""

    file: int
    score: float
    view: View = field(default_factory=View)


@dataclass
class QueryReport:
    run: Path
    checkpoint: Path
    method: str
    gallery: Path
    index: str
    gallery_size: int
    embedded: int
    results: list[QueryResult]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def text_pipeline(run_dir: Path, config: dict[str, Any]) -> TextPipeline:
    """The training-time text pipeline stored with the run."""
    text = config.get("text")
    if not isinstance(text, dict) or "options" not in text:
        raise PedError(f"{run_dir / 'config.json'} has no text options", "train the run with this pedcli")
    return TextPipeline.from_options(Vocab.load(run_dir / text.get("vocab", VOCAB)), text["options"])


def text_batch(arrays: dict[str, np.ndarray]) -> Batch:
    """The pipeline's text.h5 arrays → the text batch keys a method's `encode_texts` reads."""
    batch = {key: torch.from_numpy(arrays[name].astype(np.int64)) for name, key in TEXT_BATCH_KEYS.items()}
    length = batch.pop("bert_length")
    batch["bert_mask"] = (torch.arange(batch["bert_ids"].shape[1])[None] < length[:, None]).long()
    batch["caption_index"] = torch.arange(len(length))
    return batch


def phrase_texts(words: list[str], spans: np.ndarray, count: int) -> list[str]:
    return [" ".join(words[int(s) : int(e)]) for s, e in spans[:count]]


def encode_queries(
    method: Method, pipeline: TextPipeline, queries: Sequence[str], device: torch.device
) -> tuple[Features, list[list[str]]]:
    """Text features of the queries (CPU) and each query's noun phrases."""
    arrays = pipeline.encode(queries)
    words = pipeline.tokenize(queries)
    with torch.inference_mode():
        batch = {k: v.to(device) for k, v in text_batch(arrays).items()}
        feats = {k: v.detach().cpu() for k, v in method.encode_texts(batch).items()}
    phrases = [
        phrase_texts(w, arrays["phrases"][i], int(arrays["n_phrases"][i])) for i, w in enumerate(words)
    ]
    return feats, phrases


def shortlist_rows(
    gallery: GalleryFeatures, query_global: np.ndarray, k: int, index: str
) -> list[np.ndarray]:
    """Per query, up to k store rows of the current gallery, best cosine first (`search_store`: rows of
    images no longer in the gallery are masked)."""
    gen = gallery.generation
    rows = search_store(
        gallery.features["global"],
        gallery.alive,
        query_global,
        k,
        index,
        gallery.inv_norms,
        index_prefix=gallery.store_dir / f"{index}.{gen}",
        owner=gallery.store_dir / f"feat.{gen}.global.bin",
    )
    return [r[r >= 0] for r in rows]


def rank_query(
    method: Method,
    gallery: GalleryFeatures,
    text: Features,
    rows: np.ndarray,
    top: int,
    min_score: float | None,
    device: torch.device,
) -> list[tuple[int, float]]:
    """(store row, exact score) of the best `top` shortlisted rows scoring at least `min_score`."""
    if len(rows) == 0:
        return []
    shortlist = torch.arange(len(rows))[None]  # the one query against every row gathered
    scores = shortlist_scores(method, text, gallery.gather(rows), shortlist, device=device)[0].numpy()
    order = np.lexsort((rows, -scores))
    ranked = [(int(rows[i]), float(scores[i])) for i in order]
    if min_score is not None:
        ranked = [(r, s) for r, s in ranked if s >= min_score]
    return ranked[:top]


def query_gallery(
    run: str | Path,
    gallery: str | Path,
    queries: Sequence[str],
    *,
    top: int = 10,
    min_score: float | None = None,
    index: str = "auto",
    rerank_top: int = DEFAULT_RERANK_TOP,
    cache_dir: str | Path | None = None,
    checkpoint: str = "best",
    batch_size: int = 32,
    device: str | None = None,
    explain: bool = False,
) -> QueryReport:
    """Rank the images under `gallery` for each query (see the module docstring)."""
    queries = [q.strip() for q in queries if q.strip()]
    if not queries:
        raise PedError("no query given", 'pass a sentence, e.g. ped query "a woman in a red shirt" ...')
    if top < 1 or rerank_top < 1:
        raise PedError("--top and --rerank-top must be at least 1")
    gallery = Path(gallery)
    if not gallery.is_dir():
        raise PedError(f"gallery folder {gallery} does not exist", "pass --gallery DIR with your images")
    run_dir, ckpt = resolve_checkpoint(run, checkpoint)
    ctx = setup(device)  # under torchrun, the ranks share the embedding of new gallery images
    dev = ctx.device
    method, config = load_run(run, checkpoint, device=dev)
    for_inference(method)
    pipeline = text_pipeline(run_dir, config)
    unknown = pipeline.unknown_words(queries)  # a query of unknown words only is refused here
    try:
        cache = open_cache(gallery, cache_dir, ckpt, config)
        feats = cache.sync(method, batch_size=batch_size, device=dev, ctx=ctx)
    finally:
        teardown(ctx)
    text, phrases = encode_queries(method, pipeline, queries, dev)
    kind, hits = search_texts(
        method,
        feats,
        text,
        phrases,
        top=top,
        min_score=min_score,
        rerank_top=rerank_top,
        index=index,
        device=dev,
        explain=explain,
    )
    results = [
        QueryResult(q, [Match(i + 1, h.score, feats.paths[h.file], h.view) for i, h in enumerate(f)], ph, u)
        for q, f, ph, u in zip(queries, hits, phrases, unknown, strict=True)
    ]
    return QueryReport(
        run_dir,
        ckpt,
        config["method"],
        gallery,
        kind,
        len(feats.paths),
        feats.embedded,
        results,
        feats.skipped,
    )


def open_cache(
    gallery: Path,
    cache_dir: str | Path | None,
    checkpoint: Path,
    config: dict[str, Any],
) -> GalleryCache:
    """The gallery's feature cache for this model (checkpoint content + config), rooted by `cache_root`."""
    root = cache_root(gallery, None if cache_dir is None else Path(cache_dir))
    return GalleryCache(gallery, root, model_key(checkpoint_sha(root, checkpoint), config))


def files_by_row(gallery: GalleryFeatures) -> dict[int, list[int]]:
    """Store row → the indices of the gallery files holding that content (copies share a row)."""
    out: dict[int, list[int]] = {}
    for k, r in enumerate(gallery.rows):
        out.setdefault(int(r), []).append(k)
    return out


def search_texts(
    method: Method,
    gallery: GalleryFeatures,
    text: Features,
    phrases: Sequence[list[str]],
    *,
    top: int = 10,
    min_score: float | None = None,
    rerank_top: int = DEFAULT_RERANK_TOP,
    index: str = "auto",
    device: torch.device | None = None,
    explain: bool = False,
    by_row: dict[int, list[int]] | None = None,
) -> tuple[str, list[list[Hit]]]:
    """(index used, per query its best `top` files): shortlist by global cosine, exact rescoring, files
    of one content each listed, explanations of the matches when asked. `by_row`: `files_by_row`'s
    answer, when the caller keeps it."""
    device = device or torch.device("cpu")
    kind = choose_index(index, len(gallery.rows))
    n = len(next(iter(text.values())))
    shortlists = [np.empty(0, dtype=np.int64)] * n
    if len(gallery.rows):
        shortlists = shortlist_rows(gallery, text["global"].float().numpy(), max(top, rerank_top), kind)
    by_row = files_by_row(gallery) if by_row is None else by_row
    out = []
    for qi in range(n):
        t = index_features(text, slice(qi, qi + 1))
        ranked = rank_query(method, gallery, t, shortlists[qi], top, min_score, device)
        hits = [Hit(k, s) for r, s in ranked for k in by_row[r]][:top]
        if explain and hits:
            picked = gallery.gather(gallery.rows[[h.file for h in hits]])
            on_dev = {k: v.to(device) for k, v in t.items()}, {k: v.to(device) for k, v in picked.items()}
            for h, v in zip(hits, views(method.explain(*on_dev), len(hits), phrases[qi]), strict=True):
                h.view = v
        out.append(hits)
    return kind, out


def similar_files(
    gallery: GalleryFeatures,
    file: int,
    top: int = 10,
    index: str = "auto",
    by_row: dict[int, list[int]] | None = None,
) -> tuple[str, list[Hit]]:
    """(index used, the `top` files whose global feature is closest by cosine to that of file `file`,
    itself left out): one index search of k = top + 1 rows (the file's own row is among the best), not
    a scan of the store. Image→image has no exact pair score in the methods, so the cosine is the score;
    copies of the file (same content, same row) come first with score 1."""
    kind = choose_index(index, len(gallery.rows))
    row = gallery.rows[file : file + 1]
    query = np.asarray(gallery.features["global"][row], dtype=np.float32)
    rows = shortlist_rows(gallery, query, top + 1, kind)[0]
    unit = normalize_rows(np.asarray(gallery.features["global"][rows], dtype=np.float32))
    scores = unit @ normalize_rows(query)[0]
    order = np.lexsort((rows, -scores))  # exact cosines, ties by row: the order does not depend on the index
    by_row = files_by_row(gallery) if by_row is None else by_row
    hits = [Hit(k, float(scores[i])) for i in order for k in by_row[int(rows[i])] if k != file]
    return kind, hits[:top]


def read_queries(path: str | Path) -> list[str]:
    """One query per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise PedError(f"cannot read the queries file {path} ({e.strerror})", "pass a text file") from e
    out = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not out:
        raise PedError(f"{path} holds no query", "write one sentence per line")
    return out
