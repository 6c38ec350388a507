"""`ped query` at gallery scale (1M and 10M images by default): warm latency, recall, cold open, memory, and
the cost of adding 1,000 images.

Synthetic features stand in for a gallery (scale is what is measured, not accuracy): float16 "global"
vectors drawn around one centre per identity (10 images each), like a trained model's embeddings, written
as the gallery store's memory-mapped row file; queries are noisy copies of random identities' centres.
Per size, with the `--index auto` choice (faiss = IVF-SQfp16 up to 2M, sq8 above;
see engine/retrieval/index.py):
- build s: the one-off index build (training the coarse quantiser + adding every row);
- open ms: opening the store's row file and the saved index (memory-mapped; page cache warm);
- query ms med/p95: everything `ped query` does per query after encoding the sentence (shortlist the
  default --rerank-top 100 rows through the index, re-score them exactly with the baseline from the
  float16 store, keep the top 10), one query at a time;
- recall@10: that top 10 against the exact top 10 of a flat scan;
- +1k: a query right after 1,000 images were appended (they are scanned exactly as the index's tail),
  and the cost of folding those 1,000 rows into the trained lists (load, add, save);
- peak RSS of the process.
Run: `make bench-query` (sizes 1M and 10M; `--sizes 1000000` for one).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from pedcli.engine.retrieval.index import FaissIndex, choose_index, flat_search, store_index
from pedcli.engine.search.gallery import GalleryFeatures
from pedcli.engine.search.query import DEFAULT_RERANK_TOP, rank_query, shortlist_rows
from pedcli.models.methods.base import DataInfo, create_method

_METHOD = create_method("baseline", DataInfo(num_classes=2, vocab_size=4), {"pretrained": "none"})
ADDED = 1000


def write_store(path: Path, n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Identity centres float32 [n/10 + ADDED, dim]; writes n + ADDED float16 rows to `path` (the last
    ADDED rows are the images added later)."""
    centres = rng.standard_normal((n // 10 + ADDED, dim), dtype=np.float32)
    total = n + ADDED
    ids = np.concatenate([np.arange(n) // 10, n // 10 + np.arange(ADDED)])
    with open(path, "wb") as f:
        for s in range(0, total, 100_000):
            block = centres[ids[s : s + 100_000]]
            block = block + 0.6 * rng.standard_normal(block.shape, dtype=np.float32)
            f.write(block.astype(np.float16).tobytes())
    return centres


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median, p95) milliseconds of `repeats` calls after one warm-up call."""
    fn(0)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times)), float(np.percentile(times, 95))


def top10(feats: GalleryFeatures, q: np.ndarray, kind: str, k: int) -> list[int]:
    """What `ped query` does after the text is encoded: shortlist DEFAULT_RERANK_TOP rows, score them
    exactly with the method (the baseline: cosine), keep the top k."""
    rows = shortlist_rows(feats, q, DEFAULT_RERANK_TOP, kind)[0]
    text = {"global": torch.from_numpy(q)}
    return [r for r, _ in rank_query(_METHOD, feats, text, rows, k, None, torch.device("cpu"))]


def bench_size(n: int, dim: int, n_queries: int, k: int, kind: str, rng: np.random.Generator) -> str:
    """One result line for a gallery of n images."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        row_file = store / "feat.1.global.bin"
        centres = write_store(row_file, n, dim, rng)
        kind = choose_index(kind, n)
        q = centres[rng.integers(0, n // 10, n_queries)]
        q = q + 0.6 * rng.standard_normal(q.shape, dtype=np.float32)
        full = np.memmap(row_file, dtype=np.float16, mode="r", shape=(n + ADDED, dim))

        def gallery(rows: int) -> GalleryFeatures:
            return GalleryFeatures([], np.arange(rows), {"global": full[:rows]}, store, 1)

        t = time.perf_counter()
        shortlist_rows(gallery(n), q[:1], 1, kind)  # builds and saves the index
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        opened = gallery(n)
        index = store_index(opened.features["global"], store / f"{kind}.1", kind, row_file)
        open_ms = (time.perf_counter() - t) * 1000
        feats = gallery(n)
        warm = timed(lambda i: top10(feats, q[i : i + 1], kind, k), n_queries)
        exact = flat_search(full[:n], q, k)[1]
        found = [top10(feats, q[i : i + 1], kind, k) for i in range(n_queries)]
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(exact, found, strict=True)])

        grown = gallery(n + ADDED)
        new_q = centres[n // 10 : n // 10 + 20] + 0.3 * rng.standard_normal((20, dim), dtype=np.float32)
        added = timed(lambda i: top10(grown, new_q[i : i + 1], kind, k), 19)
        hit = np.mean([n <= top10(grown, new_q[i : i + 1], kind, k)[0] for i in range(20)])
        t = time.perf_counter()
        (path,) = store.glob(f"{kind}.1.t*.index")
        writable = FaissIndex.load(path, writable=True)
        writable.add(full, n)
        writable.save(path)
        fold_s = time.perf_counter() - t
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return (
        f"{n:>10} {kind:>5} {build_s:>7.1f} {open_ms:>7.1f} {warm[0]:>7.1f}/{warm[1]:<7.1f} {recall:>9.3f}"
        f" {added[0]:>7.1f}/{added[1]:<7.1f} {hit:>6.2f} {fold_s:>6.1f} {peak_gb:>7.2f}"
        f"  (nlist {index.index.nlist}, nprobe {index.nprobe})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--index", default="auto", help="auto, faiss, sq8 or pq")
    ap.add_argument("--threads", type=int, default=1, help="torch + faiss threads (1: steady on a busy box)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    cols = ("N", "index", "build s", "open ms", "query ms med/p95", "recall@10", "+1k query med/p95",
            "found", "fold s", "peak GB")  # fmt: skip
    widths = (10, 5, 7, 7, 15, 9, 15, 6, 6, 7)
    print(" ".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True)), flush=True)
    for n in args.sizes:
        print(bench_size(n, args.dim, args.queries, args.k, args.index, rng), flush=True)


if __name__ == "__main__":
    main()
