"""Warm `ped query` search latency over 10k / 100k / 1M cached gallery embeddings, flat vs faiss.

Synthetic features stand in for a gallery (scale is what is measured, not accuracy): float16 "global"
vectors drawn around one centre per identity (10 images each), like a trained model's embeddings; queries
are noisy copies of random identities' centres. Measured per size, warm (index built and loaded, features
on the page cache): median / p95 latency of one query's search, the one-off faiss build and load times,
and faiss's recall@10 against the exact flat result. Run: `make bench-query` (or with --sizes 10000).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from pedcli.engine.index import FaissIndex, flat_search, inverse_norms


def synthetic(n: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(gallery float16 [n, dim], identity centres float32 [n/10, dim])."""
    centres = rng.standard_normal((max(1, n // 10), dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float16)
    for s in range(0, n, 100_000):
        ids = np.arange(s, min(n, s + 100_000)) // 10
        out[s : s + len(ids)] = centres[ids] + 0.6 * rng.standard_normal((len(ids), dim), dtype=np.float32)
    return out, centres


def timed(fn, repeats: int) -> tuple[float, float]:  # noqa: ANN001
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
    t = time.perf_counter()
    built = FaissIndex.build(base)
    build_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.index"
        built.save(path)
        t = time.perf_counter()
        index = FaissIndex.load(path)
        load_s = time.perf_counter() - t
    flat = timed(lambda i: flat_search(base, q[i : i + 1], k, inv), min(n_queries, 10))
    approx = timed(lambda i: index.search(q[i : i + 1], k), n_queries)
    exact = flat_search(base, q, k, inv)[1]
    found = index.search(q, k)[1]
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(exact, found, strict=True)])
    return (
        f"{n:>9} {flat[0]:>9.1f}/{flat[1]:<8.1f} {approx[0]:>9.2f}/{approx[1]:<9.2f} {recall:>9.3f}"
        f" {build_s:>8.1f} {load_s:>7.2f}  (nlist {index.index.nlist}, nprobe {index.nprobe})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512, help="baseline embed_dim")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    cols = ("N", "flat ms med/p95", "faiss ms med/p95", "recall@10", "build s", "load s")
    print(" ".join(f"{c:>{w}}" for c, w in zip(cols, (9, 18, 19, 9, 8, 7), strict=True)))
    for n in args.sizes:
        print(bench_size(n, args.dim, args.queries, args.k, rng), flush=True)


if __name__ == "__main__":
    main()
