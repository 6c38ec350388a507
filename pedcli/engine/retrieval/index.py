"""Nearest-neighbour search over the gallery's "global" features (cosine), exact or approximate.

`flat`: exact; the float16 store is scanned in chunks (converted and L2-normalised per chunk), so memory
stays bounded and nothing is built. `faiss`: an inverted-file index (IVF, √N-ish lists, float16 scalar
quantiser) over the L2-normalised vectors with inner product, ids = store rows; `sq8` (8-bit scalar
quantiser, 1/2 the size) and `pq` (product quantiser of D/4 4-bit codes scanned with SIMD table lookups,
"fast scan": D/8 bytes a vector, 1/16) are the compressed variants for galleries of many millions: the
shortlist they return is re-scored exactly from the memory-mapped store by `ped query`, so compression
costs recall of the shortlist only. IVF rather than HNSW because it trains on a sample and recall is
tuned at query time by `nprobe`.

The index is built once per store generation and then kept up to date in place (`search_store`): rows the
store appended since are scanned exactly (a "tail") and, once the tail exceeds `fold_limit`, added to the
trained inverted lists; rows of removed images are masked at search time (an id selector), never
re-indexed; the coarse quantiser is retrained only when the store has grown `RETRAIN_GROWTH`× since
training. `auto` picks flat up to `FLAT_LIMIT` items, faiss up to `COMPRESS_ABOVE`, pq above: at 10M
sq8 scanned the 256 lists of 0.95 recall in 35 ms a query, pq's whole query with 512 lists took 8.5 ms
(benchmarks/bench_query.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pedcli.errors import PedError
from pedcli.fileio import atomic_path

FACTORY = {"faiss": "SQfp16", "sq8": "SQ8", "pq": "PQ{m}x4fs"}  # the IVF index's vector codes, m = D/4
INDEX_KINDS = ("auto", "flat", *FACTORY)
FLAT_LIMIT = 50_000
COMPRESS_ABOVE = 2_000_000  # `auto` chooses pq above: 10M float16 vectors of 256-d would be 5 GB
RETRAIN_GROWTH = 4  # rebuild (retrain the coarse quantiser) once the store has 4× the rows it trained on
PQ_MIN = 10_000  # below this a product quantiser's codes train on too few images (and flat is fast)
FOLD_MIN = 20_000  # tail rows scanned exactly before they are added to the index (or 2% of the index)
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
    """IVF over unit vectors with inner product (= cosine); ids are store rows."""

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
    def build(cls, base: np.ndarray, kind: str = "faiss", seed: int = 0) -> FaissIndex:
        """Train on a sample of `base` and add all of its rows (ids 0..N-1)."""
        faiss = cls._faiss()
        n, d = base.shape
        if kind == "pq" and n < PQ_MIN:
            raise PedError(f"--index pq needs at least {PQ_MIN:,} images ({n:,} here)", "use --index faiss")
        if kind == "pq" and d % 4:
            raise PedError(f"--index pq needs a feature width divisible by 4, not {d}", "use --index sq8")
        nlist = ivf_lists(n)
        codes = FACTORY[kind].format(m=d // 4)
        index = cls(faiss.index_factory(d, f"IVF{nlist},{codes}", faiss.METRIC_INNER_PRODUCT))
        if hasattr(index.index, "do_polysemous_training"):
            index.index.do_polysemous_training = False  # Hamming pre-filter codes we never use: slow to train
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, min(n, max(nlist * TRAIN_PER_LIST * 4, 16_384)), replace=False))
        index.index.train(normalize_rows(base[sample]))
        index.add(base, 0)
        index.nprobe = index.default_nprobe()
        return index

    def add(self, base: np.ndarray, start: int, chunk: int = FLAT_CHUNK) -> None:
        """Add rows start.. of `base` to the trained lists (ids = their row numbers)."""
        for s in range(start, base.shape[0], chunk):
            block = normalize_rows(base[s : s + chunk])
            self.index.add_with_ids(block, np.arange(s, s + len(block), dtype=np.int64))

    @classmethod
    def load(cls, path: Path, writable: bool = False) -> FaissIndex:
        """Memory-mapped, read-only unless asked: opening costs no read of the lists (a 1M index loads in
        ~1 ms), and processes querying one gallery share the page cache."""
        faiss = cls._faiss()
        flags = 0 if writable else faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
        index = cls(faiss.read_index(str(path), flags))
        index.nprobe = index.default_nprobe()
        return index

    def default_nprobe(self) -> int:
        """`default_nprobe` of this index's lists, twice that for fast-scan codes (`pq`), whose scan of a
        list costs a fraction of the others'."""
        fast = isinstance(self.index, self._faiss().IndexIVFFastScan)
        return min(self.index.nlist, default_nprobe(self.index.nlist) * (2 if fast else 1))

    def save(self, path: Path) -> None:
        with atomic_path(path, suffix=".index") as tmp:
            self._faiss().write_index(self.index, str(tmp))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nprobe(self) -> int:
        return int(self.index.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.index.nprobe = max(1, min(value, self.index.nlist))

    def search(
        self, queries: np.ndarray, k: int, alive: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) [Q, k] among the rows `alive` marks (bool per id; all when None); rows are -1
        where the probed lists held fewer than k of them."""
        faiss = self._faiss()
        params = faiss.SearchParametersIVF()
        params.nprobe = self.nprobe
        if alive is not None:
            bits = np.packbits(alive[: self.ntotal], bitorder="little")
            params.sel = selector = faiss.IDSelectorBitmap(self.ntotal, faiss.swig_ptr(bits))  # noqa: F841
        return self.index.search(normalize_rows(queries), max(1, min(k, self.ntotal)), params=params)


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: 4·√nlist, at least 8 (benchmarks/bench_query.py, recall@10 after the exact
    re-scoring: at 1M, nlist 1024, 128 lists gave 0.978 and 64 gave 0.94; at 10M, nlist 4096, with sq8
    codes, 512 gave 0.99 in 64 ms, 256 gave 0.954 in 35 ms and 128 gave 0.906 in 20 ms). A fixed fraction
    of the lists would scan 10× the vectors at 10× the gallery; the lists needed grow more slowly."""
    return min(nlist, max(8, round(4 * math.sqrt(nlist))))


def choose_index(kind: str, n: int) -> str:
    if kind not in INDEX_KINDS:
        raise PedError(f"unknown index {kind!r}", f"choose one of {', '.join(INDEX_KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if n <= FLAT_LIMIT else "faiss" if n <= COMPRESS_ABOVE else "pq"


def fold_limit(indexed: int) -> int:
    """Tail rows scanned exactly before they are added to the index."""
    return max(FOLD_MIN, indexed // 50)


def store_index(base: np.ndarray, prefix: Path, kind: str, owner: Path) -> FaissIndex:
    """The index of the store rows `base`, kept at PREFIX.t<rows trained on>.index: loaded; built when
    absent or when the store has RETRAIN_GROWTH× the rows it trained on; the tail folded in past
    `fold_limit`. A file derived from a generation whose `owner` (its feature file) was deleted meanwhile
    is removed again, so no old generation's file outlives it."""
    n = base.shape[0]
    saved = {int(f.name.rsplit(".t", 1)[1][:-6]): f for f in prefix.parent.glob(f"{prefix.name}.t*.index")}
    trained = max(saved, default=0)
    if trained and n < RETRAIN_GROWTH * trained:
        index = _opened(saved[trained])
        if n - index.ntotal <= fold_limit(index.ntotal):
            return index
        index = FaissIndex.load(saved[trained], writable=True)
        index.add(base, index.ntotal)
    else:
        index, trained = FaissIndex.build(base, kind), n
    path = prefix.parent / f"{prefix.name}.t{trained}.index"
    index.save(path)
    for old in saved.values():
        if old != path:
            old.unlink(missing_ok=True)
    if not owner.exists():
        path.unlink(missing_ok=True)
    return index


_OPENED: dict[Path, tuple[tuple[int, int, int], FaissIndex]] = {}


def _opened(path: Path) -> FaissIndex:
    """`FaissIndex.load(path)`, kept open for later searches of this process (`ped serve`, several
    queries) until the file is replaced."""
    st = path.stat()
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _OPENED.get(path)
    if hit is None or hit[0] != key:
        hit = _OPENED[path] = (key, FaissIndex.load(path))
    return hit[1]


def search_store(
    base: np.ndarray,
    alive: np.ndarray,
    queries: np.ndarray,
    k: int,
    kind: str,
    inv_norms: np.ndarray | None = None,
    index_prefix: Path | None = None,
    owner: Path | None = None,
) -> np.ndarray:
    """Rows [Q, ≤k] (-1 padded) of the k best `alive` store rows per query, best cosine first: an exact
    scan (`flat`), or the store's index (`store_index`) merged with an exact scan of its tail."""
    if kind == "flat":
        fetch = min(base.shape[0], k + int((~alive).sum()))  # dead rows never win
        scores, rows = flat_search(base, queries, fetch, inv_norms)
        return _alive_first(scores, rows, alive, k)
    assert index_prefix is not None and owner is not None
    index = store_index(base, index_prefix, kind, owner)
    scores, rows = index.search(queries, k, None if alive.all() else alive)  # no selector cost unless needed
    start = index.ntotal
    if start < base.shape[0]:
        tail_alive = alive[start:]
        fetch = min(len(tail_alive), k + int((~tail_alive).sum()))
        inv = None if inv_norms is None else inv_norms[start:]
        t_scores, t_rows = flat_search(base[start:], queries, fetch, inv)
        t_scores = np.where(tail_alive[t_rows], t_scores, -np.inf)
        scores = np.concatenate([np.where(rows >= 0, scores, -np.inf), t_scores], 1)
        rows = np.concatenate([rows, t_rows + start], 1)
    return _alive_first(scores, rows, alive, k)


def _alive_first(scores: np.ndarray, rows: np.ndarray, alive: np.ndarray, k: int) -> np.ndarray:
    """The k best-scoring live rows per query, -1 where there are fewer."""
    ok = (rows >= 0) & alive[np.maximum(rows, 0)]
    scores = np.where(ok, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(rows, order, 1)
    return np.where(np.take_along_axis(ok, order, 1), out, -1)
