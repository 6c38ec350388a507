"""Nearest-neighbour search over the gallery's "global" features (cosine), exact or approximate.

`flat`: exact; the float16 store is scanned in chunks (converted and L2-normalised per chunk), so memory
stays bounded and nothing is built. `faiss`: an inverted-file index (IVF, √N-ish lists, float16 scalar
quantiser) over the L2-normalised vectors with inner product; built once per store generation and saved
beside the features, so later queries only load it. IVF rather than HNSW because it builds in seconds on
two cores for 1M vectors (HNSW takes many minutes) and recall is tuned at query time by `nprobe`.
`auto` picks flat up to `FLAT_LIMIT` items (exact and still fast there), faiss above.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pedcli.errors import PedError
from pedcli.fileio import atomic_path

INDEX_KINDS = ("auto", "flat", "faiss")
FLAT_LIMIT = 50_000
FLAT_CHUNK = 65_536
TRAIN_PER_LIST = 64  # k-means training points per inverted list


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """float32 copy with unit L2 rows (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, columns) [Q, k] of each row's k largest, best first (ties: lower column first)."""
    k = min(k, scores.shape[1])
    part = (
        np.argpartition(-scores, k - 1, axis=1)[:, :k]
        if k < scores.shape[1]
        else np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
    )
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(part, order, axis=1)


def inverse_norms(base: np.ndarray, chunk: int = FLAT_CHUNK) -> np.ndarray:
    """float32 [N]: 1 / ‖row‖ (0 for zero rows), so a flat scan needs no per-query normalisation."""
    out = np.empty(base.shape[0], dtype=np.float32)
    for s in range(0, base.shape[0], chunk):
        norms = torch.from_numpy(np.array(base[s : s + chunk])).float().norm(dim=1)
        out[s : s + chunk] = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-12), 0.0).numpy()
    return out


@torch.inference_mode()
def flat_search(
    base: np.ndarray, queries: np.ndarray, k: int, inv_norms: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of `queries` [Q, D] over `base` [N, D] (float16 or float32, e.g. a memmap), in
    chunks of the stored dtype (torch's float16 matmul accumulates in float32)."""
    inv = inverse_norms(base) if inv_norms is None else inv_norms
    q = torch.from_numpy(normalize_rows(queries))
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for s in range(0, base.shape[0], FLAT_CHUNK):
        chunk = torch.from_numpy(np.array(base[s : s + FLAT_CHUNK]))
        scores = (q.to(chunk.dtype) @ chunk.T).float() * torch.from_numpy(np.array(inv[s : s + FLAT_CHUNK]))
        vals, cols = top_k(scores.numpy(), k)
        best_s, merged = top_k(np.concatenate([best_s, vals], 1), k)
        best_i = np.take_along_axis(np.concatenate([best_i, cols + s], 1), merged, axis=1)
    return best_s, best_i


def ivf_lists(n: int) -> int:
    """Inverted lists for n vectors: the power of two nearest √n, with enough training points per list."""
    return max(1, min(2 ** round(math.log2(max(n, 1)) / 2), n // TRAIN_PER_LIST))


class FaissIndex:
    """IVF + float16 scalar quantiser, inner product over unit vectors (= cosine)."""

    def __init__(self, index: object) -> None:
        self.index = index

    @staticmethod
    def _faiss():
        try:
            import faiss
        except ImportError:
            raise PedError(
                "the approximate index needs faiss, which is not installed",
                "pip install faiss-cpu (or pedcli[index]), or pass --index flat",
            ) from None
        return faiss

    @classmethod
    def build(cls, base: np.ndarray, seed: int = 0, chunk: int = FLAT_CHUNK) -> FaissIndex:
        faiss = cls._faiss()
        n, d = base.shape
        nlist = ivf_lists(n)
        index = faiss.index_factory(d, f"IVF{nlist},SQfp16", faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, min(n, nlist * TRAIN_PER_LIST * 4), replace=False))
        index.train(normalize_rows(base[sample]))
        for s in range(0, n, chunk):
            index.add(normalize_rows(base[s : s + chunk]))
        index.nprobe = default_nprobe(nlist)
        return cls(index)

    @classmethod
    def load(cls, path: Path) -> FaissIndex:
        """Memory-mapped, read-only: opening costs no read of the lists (a 1M index loads in ~1 ms), and
        processes querying one gallery share the page cache."""
        faiss = cls._faiss()
        index = cls(faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY))
        index.nprobe = default_nprobe(index.index.nlist)
        return index

    def save(self, path: Path) -> None:
        with atomic_path(path, suffix=".index") as tmp:
            self._faiss().write_index(self.index, str(tmp))

    @property
    def nprobe(self) -> int:
        return int(self.index.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.index.nprobe = max(1, min(value, self.index.nlist))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) [Q, k]; rows are -1 where the probed lists held fewer than k vectors."""
        return self.index.search(normalize_rows(queries), min(k, self.index.ntotal))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: 1/8 of them, at least 8 (benchmarks/bench_query.py: recall@10 of 1/16 was
    0.99 at 100k but 0.94 at 1M; 1/8 costs a few ms more)."""
    return min(nlist, max(8, nlist // 8))


def choose_index(kind: str, n: int) -> str:
    if kind not in INDEX_KINDS:
        raise PedError(f"unknown index {kind!r}", f"choose one of {', '.join(INDEX_KINDS)}")
    return ("flat" if n <= FLAT_LIMIT else "faiss") if kind == "auto" else kind


def cached_faiss(base: np.ndarray, path: Path) -> FaissIndex:
    """The index saved at `path`, or a new one built from `base` and saved there (atomically)."""
    if path.is_file():
        return FaissIndex.load(path)
    index = FaissIndex.build(base)
    index.save(path)
    return index
