"""The gallery index kept up to date in place: appended rows are found at once (exact tail) and folded
into the trained lists without a rebuild, removed rows are masked, and the quantiser is retrained only
after the stated growth; the compressed kinds shortlist what the exact scan finds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pedcli.engine.retrieval import index as index_mod
from pedcli.engine.retrieval.index import FaissIndex, choose_index, flat_search, search_store


def clustered(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 20), d)).astype(np.float32)
    return (centres[np.arange(n) // 20] + 0.3 * rng.standard_normal((n, d))).astype(np.float16)


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """Rows of every index build (a fold-in is not a build)."""
    seen: list[int] = []
    real = FaissIndex.build.__func__

    def counted(cls, base, kind="faiss", seed=0):
        seen.append(base.shape[0])
        return real(cls, base, kind, seed)

    monkeypatch.setattr(FaissIndex, "build", classmethod(counted))
    return seen


def search(base: np.ndarray, alive: np.ndarray, q: np.ndarray, tmp: Path, kind: str = "faiss") -> np.ndarray:
    owner = tmp / "feat.1.global.bin"
    owner.touch()
    return search_store(base, alive, q, 5, kind, index_prefix=tmp / f"{kind}.1", owner=owner)


def saved(tmp: Path) -> FaissIndex:
    (path,) = tmp.glob("faiss.1.t*.index")
    return FaissIndex.load(path)


def test_appended_rows_are_found_then_folded_in(tmp_path: Path, builds: list[int], monkeypatch) -> None:
    store = clustered(4000)
    monkeypatch.setattr(index_mod, "FOLD_MIN", 500)
    base = store[:3000]
    search(base, np.ones(3000, bool), base[:1].astype(np.float32), tmp_path)
    assert builds == [3000]
    grown = store[:3300]  # 300 appended rows: below the fold limit, scanned exactly
    rows = search(grown, np.ones(3300, bool), grown[3100:3101].astype(np.float32), tmp_path)
    assert rows[0, 0] == 3100 and saved(tmp_path).ntotal == 3000
    rows = search(store, np.ones(4000, bool), store[3900:3901].astype(np.float32), tmp_path)
    assert rows[0, 0] == 3900 and builds == [3000]  # 1000 appended rows: folded in, no rebuild
    index = saved(tmp_path)
    assert index.ntotal == 4000 and index.index.nlist == index_mod.ivf_lists(3000)
    assert [f.name for f in tmp_path.glob("*.index")] == ["faiss.1.t3000.index"]


def test_removed_rows_are_masked(tmp_path: Path) -> None:
    base = clustered(3000)
    alive = np.ones(3000, bool)
    q = base[40:41].astype(np.float32)
    assert 40 in search(base, alive, q, tmp_path)[0]
    alive[40:60] = False  # the query's whole identity is gone, in the index and in the flat scan
    for kind in ("faiss", "flat"):
        found = search(base, alive, q, tmp_path, kind)[0]
        assert len(found) == 5 and not set(found) & set(range(40, 60))


def test_fast_scan_pq_masks_removed_rows_and_takes_new_ones(tmp_path: Path) -> None:
    """`auto`'s choice for many millions: its selector, in-place adds and wider probing work as IVF's."""
    store = clustered(12_500)
    index = FaissIndex.build(store[:12_000], "pq")
    assert index.nprobe == min(index.index.nlist, 2 * index_mod.default_nprobe(index.index.nlist))
    q = store[40:41].astype(np.float32)
    alive = np.ones(12_500, bool)
    assert set(index.search(q, 5, alive)[1][0]) <= set(range(40, 60))  # the query's identity (4-bit codes)
    alive[40:60] = False
    found = index.search(q, 5, alive)[1][0]
    assert len(found) == 5 and not set(found) & set(range(40, 60))
    index.add(store, 12_000)
    index.save(tmp_path / "pq.index")
    reopened = FaissIndex.load(tmp_path / "pq.index")
    new = store[12_300:12_301].astype(np.float32)
    assert reopened.ntotal == 12_500 and set(reopened.search(new, 5)[1][0]) <= set(range(12_300, 12_320))


def test_retrained_only_after_the_stated_growth(tmp_path: Path, builds: list[int]) -> None:
    store = clustered(16_384 * 4 + 64, d=8)
    alive = np.ones(len(store), bool)
    q = store[:1].astype(np.float32)
    search(store[:16_384], alive[:16_384], q, tmp_path)
    search(store[: 16_384 * 2], alive[: 16_384 * 2], q, tmp_path)  # 2×: folded in
    assert builds == [16_384]
    search(store, alive, q, tmp_path)  # 4× (RETRAIN_GROWTH) the rows it trained on: retrained
    assert builds == [16_384, len(store)]


@pytest.mark.parametrize("kind", ["faiss", "sq8", "pq"])
def test_every_kind_shortlists_the_exact_neighbours(tmp_path: Path, kind: str) -> None:
    base = clustered(10_000)
    q = base[::1000].astype(np.float32) + 0.05
    exact = flat_search(base, q, 5)[1]
    index = FaissIndex.build(base, kind)
    index.nprobe = index.index.nlist  # every list probed: only the codes' precision differs
    found = index.search(q, 50)[1]  # a shortlist, re-scored exactly by `ped query`
    assert np.mean([len(set(e) & set(f)) / 5 for e, f in zip(exact, found, strict=True)]) >= 0.95


def test_auto_compresses_only_very_large_galleries() -> None:
    assert [choose_index("auto", n) for n in (1000, 1_000_000, 10_000_000)] == ["flat", "faiss", "pq"]
