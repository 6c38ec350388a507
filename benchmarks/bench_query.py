"""Warm `ped query` search latency over 10k / 100k / 1M cached gallery embeddings, flat vs faiss.

Synthetic features stand in for a gallery (scale is what is measured, not accuracy): float16 "global"
vectors drawn around one centre per identity (10 images each), like a trained model's embeddings; queries
are noisy copies of random identities' centres. Measured per size, warm (index built, features and index
on the page cache): median / p95 ms of one query's search, flat and faiss; faiss's recall@10 against the
exact flat result; "query ms": everything `ped query` does per query after encoding the sentence (open
the cached index of the `--index auto` choice, shortlist the default --rerank-top, score those exactly with
the baseline method, keep the top 10); and the one-off faiss build (s) and memory-mapped load (ms).
Run: `make bench-query`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from pedcli.engine.gallery import GalleryFeatures
from pedcli.engine.index import FaissIndex, choose_index, flat_search, inverse_norms
from pedcli.engine.query import DEFAULT_RERANK_TOP, rank_query, shortlist_rows
from pedcli.models.methods.base import DataInfo, create_method


def synthetic(n: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(gallery float16 [n, dim], identity centres float32 [n/10, dim])."""
    centres = rng.standard_normal((max(1, n // 10), dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float16)
    for s in range(0, n, 100_000):
        ids = np.arange(s, min(n, s + 100_000)) // 10
        out[s : s + len(ids)] = centres[ids] + 0.6 * rng.standard_normal((len(ids), dim), dtype=np.float32)
    return out, centres


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median, p95) milliseconds of `repeats` calls after one warm-up call."""
    fn(0)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times)), float(np.percentile(times, 95))


def bench_size(n: int, dim: int, n_queries: int, k: int, rng: np.random.Generator) -> str:
    """One result line for a gallery of n items."""
    base, centres = synthetic(n, dim, rng)
    q = centres[rng.integers(0, len(centres), n_queries)]
    q = q + 0.6 * rng.standard_normal(q.shape, dtype=np.float32)
    inv = inverse_norms(base)  # cached per store generation by `ped query`, like the faiss index
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "faiss.1.ivf.index"  # where `ped query` caches it (generation 1)
        t = time.perf_counter()
        FaissIndex.build(base).save(path)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        index = FaissIndex.load(path)
        load_ms = (time.perf_counter() - t) * 1000
        flat = timed(lambda i: flat_search(base, q[i : i + 1], k, inv), min(n_queries, 10))
        approx = timed(lambda i: index.search(q[i : i + 1], k), n_queries)
        exact = flat_search(base, q, k, inv)[1]
        found = index.search(q, k)[1]
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(exact, found, strict=True)])
        kind = choose_index("auto", n)
        whole = timed(lambda i: warm_query(base, Path(tmp), q[i : i + 1], k, kind), min(n_queries, 20))
    return (
        f"{n:>9} {flat[0]:>9.1f}/{flat[1]:<8.1f} {approx[0]:>9.2f}/{approx[1]:<9.2f} {recall:>9.3f}"
        f" {kind:>6} {whole[0]:>8.1f}/{whole[1]:<8.1f} {build_s:>7.1f} {load_ms:>7.1f}"
        f"  (nlist {index.index.nlist}, nprobe {index.nprobe})"
    )


_METHOD = create_method("baseline", DataInfo(num_classes=2, vocab_size=4), {"pretrained": "none"})


def warm_query(base: np.ndarray, store: Path, q: np.ndarray, k: int, kind: str) -> None:
    """What `ped query` does after the text is encoded: open the cached index, shortlist
    DEFAULT_RERANK_TOP rows, score them exactly with the method (the baseline: cosine), keep the top k."""
    feats = GalleryFeatures([], np.arange(len(base)), {"global": base}, store, 1)
    rows = shortlist_rows(feats, q, DEFAULT_RERANK_TOP, kind)[0]
    text = {"global": torch.from_numpy(q)}
    rank_query(_METHOD, feats, text, rows, k, None, torch.device("cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512, help="the baseline's embed_dim")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch + faiss threads (1: steady on a busy box)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    cols = ("N", "flat ms med/p95", "faiss ms med/p95", "recall@10", "auto", "query ms med/p95", "build s",
            "load ms")  # fmt: skip
    widths = (9, 18, 19, 9, 6, 17, 7, 7)
    print(" ".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True)))
    for n in args.sizes:
        print(bench_size(n, args.dim, args.queries, args.k, rng), flush=True)


if __name__ == "__main__":
    main()
