"""The gallery store's catalogue (SQLite): a killed sync leaves nothing behind, a same-size replacement
with its mtime restored is seen (issue 10 item 14), a damaged cache is rebuilt (item 11), and no file of an
old generation stays beside the store (item 13). The stand-in encoder (mean RGB) keeps these fast."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from query_workers import mean_colour

from pedcli.engine.search import gallery as gallery_mod
from pedcli.engine.search.gallery import GalleryCache, GalleryFeatures, find_images
from pedcli.engine.search.query import shortlist_rows

TESTS = Path(__file__).parent


def write_images(folder: Path, n: int, start: int = 0, suffix: str = "png") -> list[Path]:
    """n small images of distinct flat colours (image i has colour 10 * i + 5 in every channel)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        path = folder / f"img{i:02d}.{suffix}"
        Image.fromarray(np.full((16, 8, 3), 10 * i + 5, np.uint8)).save(path)
        out.append(path)
    return out


def sync(gal: Path, root: Path) -> GalleryFeatures:
    return GalleryCache(gal, root, "model").sync(None, mean_colour, 2)  # type: ignore[arg-type]


def colours(feats: GalleryFeatures) -> dict[str, float]:
    """file name → its stored global feature's first value (the file's colour)."""
    glob = feats.gather(feats.rows)["global"][:, 0].tolist()
    return {p.name: round(g, 1) for p, g in zip(feats.paths, glob, strict=True)}


def expected(gal: Path) -> dict[str, float]:
    """file name → its colour, for every file that decodes."""
    out = {}
    for p in find_images(gal):
        try:
            out[p.name] = float(np.asarray(Image.open(p))[0, 0, 0])
        except OSError:
            continue
    return out


def committed(root: Path) -> tuple[int, int, int]:
    """(generation, rows written, live rows) of the model's store, as the catalogue says."""
    with sqlite3.connect(root / "catalog.sqlite") as db:
        gen, rows = db.execute("SELECT generation, rows FROM stores WHERE model='model'").fetchone()
        (live,) = db.execute("SELECT COUNT(*) FROM contents WHERE row IS NOT NULL").fetchone()
    return gen, rows, live


def row_file_sizes(root: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in (root / "model").iterdir()}


@pytest.mark.parametrize("where", ["embedding", "commit"])
def test_a_killed_sync_leaves_nothing_behind(tmp_path: Path, where: str) -> None:
    gal, root = tmp_path / "gallery", tmp_path / "cache"
    write_images(gal, 3)
    sync(gal, root)
    before = committed(root), row_file_sizes(root)
    write_images(gal, 6, start=3)
    done = subprocess.run(
        [sys.executable, str(TESTS / "query_workers.py"), str(gal), str(root), where],
        env={**os.environ, "PYTHONPATH": str(TESTS)},
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == -9, done.stderr.decode()[-2000:]  # killed, as arranged
    assert committed(root) == before[0]  # the catalogue is as it was: the killed sync is not half-visible
    assert sorted(colours(sync_readonly(gal, root))) == sorted(p.name for p in find_images(gal)[:3])
    feats = sync(gal, root)
    assert colours(feats) == expected(gal) and feats.embedded == 6
    gen, rows, live = committed(root)
    assert rows == live == 9  # the killed writer's appended bytes were cut, not kept as rows
    sizes = row_file_sizes(root)
    assert sizes == {f"feat.{gen}.global.bin": 9 * 3 * 2, f"norms.{gen}.bin": 9 * 4}


def sync_readonly(gal: Path, root: Path) -> GalleryFeatures:
    """What a reader maps now, without embedding: the committed rows of the files it already knows."""
    cache = GalleryCache(gal, root, "model")
    catalog = gallery_mod.Catalog(root)
    try:
        store = cache._read(catalog)
    finally:
        catalog.close()
    paths = [p for p in find_images(gal) if p.name in {f"img{i:02d}.png" for i in range(3)}]
    shas = [gallery_mod.sha256_file(p) for p in paths]
    return cache._mapped(store, paths, shas, [], 0, {})


def test_same_size_replacement_with_restored_mtime_is_seen(tmp_path: Path) -> None:
    """Issue 10 item 14: the memo used to key on size and mtime only and kept the old features."""
    gal, root = tmp_path / "gallery", tmp_path / "cache"
    target = write_images(gal, 3, suffix="bmp")[1]  # BMP: same pixels size, same file size
    assert colours(sync(gal, root))["img01.bmp"] == 15
    st = target.stat()
    Image.fromarray(np.full((16, 8, 3), 200, np.uint8)).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    again = sync(gal, root)
    assert colours(again)["img01.bmp"] == 200 and again.embedded == 1


@pytest.mark.parametrize("damage", ["catalogue", "row files"])
def test_a_damaged_store_is_rebuilt(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 10 item 11: a damaged store used to be fatal (or a traceback); now it is rebuilt, with a
    message. Every file of the kind is damaged, so the test holds whatever the store's layout."""
    gal, root = tmp_path / "gallery", tmp_path / "cache"
    write_images(gal, 4)
    sync(gal, root)
    for f in (f for f in root.rglob("*") if f.is_file()):
        if damage == "catalogue" and f.suffix in (".sqlite", ".json"):
            f.write_bytes(b"this is not a catalogue " * 50)
        elif damage == "row files" and f.suffix in (".bin", ".npy"):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with caplog.at_level(logging.INFO, logger="pedcli"):
        feats = sync(gal, root)
    log = [r.getMessage() for r in caplog.records]
    assert colours(feats) == expected(gal) and feats.embedded == 4
    assert any("damaged" in line and "rebuilding" in line for line in log), log
    assert sync(gal, root).embedded == 0  # and the rebuilt store is kept


def test_no_old_generation_file_stays(tmp_path: Path, monkeypatch) -> None:
    """Issue 10 item 13: files derived from an old generation (the flat scan's norms, the faiss index),
    even those a slow reader makes after the store moved on, do not stay beside the store."""
    gal, root = tmp_path / "gallery", tmp_path / "cache"
    files = write_images(gal, 8)
    stale = sync(gal, root)
    query = np.ones((1, 3), np.float32)
    for kind in ("flat", "faiss"):
        shortlist_rows(stale, query, 3, kind)
    monkeypatch.setattr(gallery_mod, "COMPACT_MIN_DEAD", 0)
    for f in files[:6]:
        f.unlink()
    fresh = sync(gal, root)
    assert fresh.generation > stale.generation and committed(root)[1:] == (2, 2)  # compacted
    for kind in ("flat", "faiss"):  # the slow reader, still on the old generation
        shortlist_rows(stale, query, 3, kind)
        shortlist_rows(fresh, query, 3, kind)
    left = {f.name.split(".")[1] for f in (root / "model").iterdir()}
    assert left == {str(fresh.generation)}, sorted(f.name for f in (root / "model").iterdir())
    assert colours(fresh) == expected(gal)


def test_decoding_in_worker_processes_gives_the_same_store(tmp_path: Path) -> None:
    """Many new files are decoded by DataLoader workers; rows, order and skipped files are as in-process."""
    gal = tmp_path / "gallery"
    write_images(gal, 10)
    (gal / "broken.jpg").write_bytes(b"not an image")
    runs = {}
    for workers in (0, 2):
        cache = GalleryCache(gal, tmp_path / f"cache{workers}", "model")
        runs[workers] = cache.sync(None, mean_colour, 2, workers=workers)  # type: ignore[arg-type]
    assert colours(runs[2]) == colours(runs[0]) == expected(gal)
    assert [(p.name, why[:20]) for p, why in runs[2].skipped] == [("broken.jpg", "not a readable image")]


@pytest.mark.slow
def test_two_ranks_sync_one_store(tmp_path: Path) -> None:
    """`ped query` under torchrun (2 CPU ranks, gloo): the ranks split the new images, rank 0 commits one
    store, byte-identical to a single process's, and both ranks answer with it."""
    import json
    import socket

    import torch.multiprocessing as tmp
    from query_workers import sync_rank

    gal = tmp_path / "gallery"
    write_images(gal, 10)
    single = sync(gal, tmp_path / "one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.spawn(sync_rank, args=(2, port, str(gal), str(tmp_path / "two")), nprocs=2)
    ranks = [json.loads((tmp_path / f"two.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["colours"] for r in ranks] == [colours(single)] * 2 == [expected(gal)] * 2
    assert sum(r["encoded"] for r in ranks) == 10 and min(r["encoded"] for r in ranks) > 0  # split
    assert row_file_sizes(tmp_path / "two") == row_file_sizes(tmp_path / "one")
    for name in row_file_sizes(tmp_path / "one"):
        assert (tmp_path / "two" / "model" / name).read_bytes() == (
            tmp_path / "one" / "model" / name
        ).read_bytes()


def test_an_unchanged_gallery_is_synced_without_the_catalogue(tmp_path: Path, monkeypatch) -> None:
    """Issue 12: every search of `ped serve` syncs; an unchanged listing (names, sizes, mtimes, ctimes,
    inodes) is answered from the last sync without opening the catalogue, and any change to the listing,
    even a same-size replacement with its mtime restored, still goes through the catalogue."""
    gal, root = tmp_path / "gallery", tmp_path / "cache"
    files = write_images(gal, 4, suffix="bmp")
    cache = GalleryCache(gal, root, "model")
    first = cache.sync(None, mean_colour, 2)  # type: ignore[arg-type]
    opened: list[Path] = []
    real = gallery_mod._open_catalog
    monkeypatch.setattr(gallery_mod, "_open_catalog", lambda r: opened.append(r) or real(r))
    again = cache.sync(None, mean_colour, 2)  # type: ignore[arg-type]
    assert opened == [] and again.embedded == 0 and colours(again) == colours(first) == expected(gal)
    st = files[1].stat()
    Image.fromarray(np.full((16, 8, 3), 200, np.uint8)).save(files[1])
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = cache.sync(None, mean_colour, 2)  # type: ignore[arg-type]
    assert opened and colours(changed)["img01.bmp"] == 200 and changed.embedded == 1
    opened.clear()
    files[2].unlink()
    gone = cache.sync(None, mean_colour, 2)  # type: ignore[arg-type]
    assert opened and colours(gone) == expected(gal) and "img02.bmp" not in colours(gone)


def test_sync_reports_progress_per_batch(tmp_path: Path) -> None:
    """`ped serve`'s progress bars hear of each batch of new images (undecodable ones count as done)."""
    gal = tmp_path / "gallery"
    write_images(gal, 5)
    (gal / "broken.jpg").write_bytes(b"not an image")
    seen: list[tuple[int, int]] = []
    cache = GalleryCache(gal, tmp_path / "cache", "model")
    cache.sync(None, mean_colour, 2, workers=0, progress=lambda d, t: seen.append((d, t)))  # type: ignore[arg-type]
    assert seen == [(2, 6), (4, 6), (6, 6)]
    seen.clear()
    cache.sync(None, mean_colour, 2, workers=0, progress=lambda d, t: seen.append((d, t)))  # type: ignore[arg-type]
    assert seen == []  # nothing new
