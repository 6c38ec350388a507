"""`ped query`: the gallery feature cache (incremental, corrupt files, concurrent writers), the indexes,
the text pipeline of the run, thresholds, and the JSON / HTML outputs."""

from __future__ import annotations

import base64
import json
import logging
import multiprocessing
import os
import sqlite3
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from query_workers import mean_colour, sync_gallery
from typer.testing import CliRunner

from pedcli.cli import app
from pedcli.data.cache import part_path
from pedcli.engine.embed import embed_images
from pedcli.engine.retrieval.index import FaissIndex, flat_search, top_k
from pedcli.engine.runs import load_run, read_config
from pedcli.engine.search import gallery as gallery_mod
from pedcli.engine.search import query as query_mod
from pedcli.engine.search.explain_view import View
from pedcli.engine.search.gallery import CACHE_DIRNAME, GalleryCache, find_images
from pedcli.engine.search.query import (
    QueryReport,
    QueryResult,
    query_gallery,
    read_queries,
    similar_files,
    text_pipeline,
)
from pedcli.engine.search.report import to_html, to_json
from pedcli.errors import PedError
from pedcli.text.vocab import UNK_ID

QUERY = "w3 w5 w7 w2"


def cache_images(cache: Path) -> np.ndarray:
    with h5py.File(part_path(cache, "images"), "r") as f:
        return f["images"][:]


def save_image(path: Path, img: np.ndarray) -> Path:
    """A cache image scaled up 4× (a realistic file, not a 32×16 one), format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.kron(img, np.ones((4, 4, 1), np.uint8))).save(path)
    return path


def write_gallery(out: Path, cache: Path, n: int, start: int = 0) -> list[Path]:
    """n cache images as PNG and JPEG files, every second one in a subfolder."""
    images = cache_images(cache)[start : start + n]
    return [
        save_image(out / ("sub" if i % 2 else "") / f"img{start + i}.{'png' if i % 3 else 'jpg'}", img)
        for i, img in enumerate(images)
    ]


def ranked_paths(report: QueryReport, qi: int = 0) -> list[Path]:
    return [m.path for m in report.results[qi].matches]


def test_incremental_cache(trained_run: Path, tiny_cache: Path, tmp_path: Path, monkeypatch) -> None:
    gal = tmp_path / "gallery"
    files = write_gallery(gal, tiny_cache, 6)
    first = query_gallery(trained_run, gal, [QUERY], top=20)
    assert (first.embedded, first.gallery_size) == (6, 6)
    assert sorted(ranked_paths(first)) == sorted(files)

    hashed: list[Path] = []
    real = gallery_mod.sha256_file
    monkeypatch.setattr(gallery_mod, "sha256_file", lambda p: hashed.append(Path(p)) or real(p))
    again = query_gallery(trained_run, gal, [QUERY], top=20)
    assert again.embedded == 0 and hashed == []  # nothing re-embedded, nothing re-hashed
    assert [(m.path, m.score) for m in again.results[0].matches] == [
        (m.path, m.score) for m in first.results[0].matches
    ]

    files[0].unlink()  # removed
    write_gallery(gal / "new", tiny_cache, 1, start=10)  # added
    save_image(files[1], cache_images(tiny_cache)[12])  # changed content, same name
    third = query_gallery(trained_run, gal, [QUERY], top=20)
    assert third.embedded == 2 and third.gallery_size == 6
    assert sorted(ranked_paths(third)) == sorted(find_images(gal))
    assert files[0] not in ranked_paths(third)
    assert len(store_rows(gal / CACHE_DIRNAME)) == 6  # the removed file's and the changed file's old rows
    # were dropped


def test_corrupt_and_unreadable_files_are_skipped(
    trained_run: Path, tiny_cache: Path, tmp_path: Path
) -> None:
    gal = tmp_path / "gallery"
    good = write_gallery(gal, tiny_cache, 3)
    (gal / "broken.jpg").write_bytes(b"not an image at all")
    truncated = gal / "sub" / "truncated.png"
    truncated.write_bytes(good[1].read_bytes()[:60])
    report = query_gallery(trained_run, gal, [QUERY], top=10)
    assert sorted(ranked_paths(report)) == sorted(good)
    assert {p.name for p, _ in report.skipped} == {"broken.jpg", "truncated.png"}
    assert all("not a readable image" in reason for _, reason in report.skipped)
    # the failure is remembered by content: reported again without decoding, the search still answers
    result = CliRunner().invoke(app, ["query", QUERY, "--gallery", str(gal), "--run", str(trained_run)])
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.output and "truncated.png" in result.output


def test_json_schema_and_min_score(trained_run: Path, tiny_cache: Path, tmp_path: Path) -> None:
    gal = tmp_path / "gallery"
    write_gallery(gal, tiny_cache, 8)
    queries = tmp_path / "queries.txt"
    queries.write_text(f"# comment\n{QUERY}\n\nw9 w11\n")
    args = ["query", "--gallery", str(gal), "--run", str(trained_run), "--queries", str(queries), "--json"]
    result = CliRunner().invoke(app, [*args, "--top", "5"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == 1 and data["method"] == "baseline" and data["index"] == "flat"
    assert data["gallery_size"] == 8 and data["skipped"] == []
    assert [q["query"] for q in data["queries"]] == [QUERY, "w9 w11"]
    for q in data["queries"]:
        res = q["results"]
        assert [r["rank"] for r in res] == list(range(1, 6))
        scores = [r["score"] for r in res]
        assert scores == sorted(scores, reverse=True) and all(isinstance(s, float) for s in scores)
        assert all(Path(r["path"]).is_file() and Path(r["path"]).is_relative_to(gal.resolve()) for r in res)

    full = query_gallery(trained_run, gal, [QUERY], top=8).results[0].matches
    cut = (full[2].score + full[3].score) / 2 if full[2].score != full[3].score else full[2].score
    kept = query_gallery(trained_run, gal, [QUERY], top=8, min_score=cut).results[0].matches
    assert [m.path for m in kept] == [m.path for m in full if m.score >= cut]
    none = CliRunner().invoke(app, [*args[:-1], "--min-score", str(full[0].score + 1)])
    assert none.exit_code == 0 and "no match" in none.stdout


def test_concurrent_writers_share_one_store(tiny_cache: Path, tmp_path: Path) -> None:
    """Two processes fill the same empty cache at once (overlapping embeds): each answers every file with
    its own content's features, and the store ends with one row per content and one generation."""
    gal = tmp_path / "gallery"
    write_gallery(gal, tiny_cache, 9)
    root = tmp_path / "cache"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        jobs = pool.starmap_async(sync_gallery, [(str(gal), str(root), b) for b in (2, 3)])
        answers = jobs.get(timeout=300)  # a worker error that cannot be pickled would hang `starmap`
    expected = mean_colour(None, [np.asarray(Image.open(p).convert("RGB")) for p in find_images(gal)])
    for answer in answers:
        assert [p for p, _ in answer] == [str(p) for p in find_images(gal)]
        assert np.allclose([g for _, g in answer], expected["global"].numpy(), atol=0.1)  # float16 storage
    rows = store_rows(root, "model")
    assert sorted(rows.values()) == list(range(9))  # one row per content: no duplicate appended
    with sqlite3.connect(root / "catalog.sqlite") as db:
        gen, written = db.execute("SELECT generation, rows FROM stores").fetchone()
    assert written == 9 and {f.name.split(".")[1] for f in (root / "model").iterdir()} == {str(gen)}


def store_rows(root: Path, model: str | None = None) -> dict[str, int]:
    """content sha → feature row of the catalogue under `root` (of its only model unless named)."""
    with sqlite3.connect(root / "catalog.sqlite") as db:
        if model is None:
            (model,) = db.execute("SELECT model FROM stores").fetchone()
        got = db.execute("SELECT sha, row FROM contents WHERE model=? AND row IS NOT NULL", (model,))
        return dict(got.fetchall())


def test_a_file_unreadable_for_now_is_not_remembered(tiny_cache: Path, tmp_path: Path, monkeypatch) -> None:
    gal = tmp_path / "gallery"
    files = write_gallery(gal, tiny_cache, 3)
    real = gallery_mod.load_rgb

    def vanished(path: Path) -> np.ndarray:
        if path == files[2]:
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(gallery_mod, "load_rgb", vanished)
    cache = GalleryCache(gal, tmp_path / "c", "m")
    first = cache.sync(None, mean_colour)  # type: ignore[arg-type]
    assert set(first.paths) == set(files[:2]) and first.skipped == [
        (files[2], "cannot read the file (Permission denied)")
    ]
    monkeypatch.setattr(gallery_mod, "load_rgb", real)
    again = cache.sync(None, mean_colour)  # type: ignore[arg-type]
    assert set(again.paths) == set(files) and again.skipped == [] and again.embedded == 1


def test_query_uses_the_runs_text_pipeline(trained_run: Path) -> None:
    config = read_config(trained_run)
    pipeline = text_pipeline(trained_run, config)
    vocab = json.loads((trained_run / "vocab.json").read_text())
    assert pipeline.vocab.words == vocab
    tokens = pipeline.encode(["w3 qqqq"])["tokens"][0]
    assert tokens[:2].tolist() == [vocab.index("w3"), UNK_ID]


def test_store_rows_follow_content(trained_run: Path, tiny_cache: Path, tmp_path: Path) -> None:
    """Two files with the same bytes share one row; the features equal a direct encoding of the file."""
    gal = tmp_path / "gallery"
    a = write_gallery(gal, tiny_cache, 2)
    (gal / "copy.png").write_bytes(a[1].read_bytes())
    method, _ = load_run(trained_run)
    feats = GalleryCache(gal, tmp_path / "c", "k").sync(method)
    assert len(feats.paths) == 3 and len(set(feats.rows.tolist())) == 2
    direct = embed_images(method, [a[0]])["global"]
    got = feats.gather(feats.rows[feats.paths.index(a[0]) : feats.paths.index(a[0]) + 1])["global"]
    assert np.allclose(got.numpy(), direct.numpy(), atol=2e-3)  # float16 storage


def test_flat_and_faiss_search() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 16)).astype(np.float32)
    base = (np.repeat(centres, 50, 0) + 0.3 * rng.standard_normal((2000, 16))).astype(np.float16)
    q = centres[:5] + 0.1 * rng.standard_normal((5, 16)).astype(np.float32)
    scores, rows = flat_search(base, q, 7)
    b = base.astype(np.float32)
    brute = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    assert np.allclose(scores, -np.sort(-brute, axis=1)[:, :7], atol=2e-3)  # the 7 best, best first
    assert np.allclose(scores, np.take_along_axis(brute, rows, 1), atol=2e-3)
    index = FaissIndex.build(base)
    index.nprobe = index.index.nlist  # every list probed: the approximate index becomes exact
    _, found = index.search(q, 7)
    assert (np.sort(found, 1) == np.sort(rows, 1)).mean() > 0.95


@pytest.mark.parametrize("kind", ["flat", "faiss"])
def test_similar_files_is_one_index_search_of_top_plus_one(tmp_path: Path, monkeypatch, kind: str) -> None:
    """Image→image search by file (`ped serve`'s "more like this"): the index is asked for top + 1 rows,
    never for the whole store; the answer is the exact cosine ranking, the file itself left out and its
    copies first."""
    gal = tmp_path / "gallery"
    gal.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(np.full((16, 8, 3), rng.integers(0, 256, 3), np.uint8)).save(gal / f"i{i:02d}.png")
    (gal / "copy.png").write_bytes((gal / "i03.png").read_bytes())
    feats = GalleryCache(gal, tmp_path / "c", "k").sync(None, mean_colour)  # type: ignore[arg-type]
    asked: list[int] = []
    real = query_mod.search_store
    monkeypatch.setattr(query_mod, "search_store", lambda *a, **kw: asked.append(a[3]) or real(*a, **kw))
    k0 = feats.paths.index(gal / "i03.png")
    used, hits = similar_files(feats, k0, top=4, index=kind)
    assert used == kind and asked == [5]
    unit = np.asarray(feats.gather(feats.rows)["global"])
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    cosine = unit @ unit[k0]
    brute = sorted((k for k in range(len(feats.paths)) if k != k0), key=lambda k: -cosine[k])[:4]
    assert feats.paths[hits[0].file] == gal / "copy.png" and hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert [h.file for h in hits] == brute
    assert [h.score for h in hits] == pytest.approx([float(cosine[k]) for k in brute], abs=2e-3)


def test_top_k_orders_ties_by_index() -> None:
    vals, cols = top_k(np.array([[0.5, 0.9, 0.5, 0.1, 0.9]], np.float32), 4)
    assert cols.tolist() == [[1, 4, 0, 2]] and np.allclose(vals, [[0.9, 0.9, 0.5, 0.5]])


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def having(self, tag: str, cls: str | None = None) -> list[dict[str, str | None]]:
        return [
            a for t, a in self.tags if t == tag and (cls is None or cls in (a.get("class") or "").split())
        ]


def test_html_page_is_self_contained(trained_run: Path, tiny_cache: Path, tmp_path: Path) -> None:
    gal = tmp_path / "gallery"
    write_gallery(gal, tiny_cache, 4)
    report = query_gallery(trained_run, gal, [QUERY, "w4"], top=3, explain=True)
    grid = np.linspace(0, 1, 6).reshape(3, 2)
    report.results[0].matches[0].view = View(grid, grid > 0.5, "attention", [("w3 w5", "stripe 1", 0.8)])
    report.results.append(QueryResult("nothing", [], []))
    page = _Page()
    page.feed(to_html(report))
    assert len(page.having("section", "query")) == 3 and len(page.having("figure", "match")) == 6
    imgs = page.having("img")  # one per match, plus the attention copy beside the explained one
    assert len(imgs) == 7 and all(a["src"].startswith("data:image/jpeg;base64,") for a in imgs)
    assert imgs[1]["alt"] == f"attention on {imgs[0]['alt']}" and imgs[1]["src"] == imgs[0]["src"]
    assert base64.b64decode(imgs[0]["src"].split(",", 1)[1])[:2] == b"\xff\xd8"  # a JPEG
    assert len(page.having("div", "cell")) == 6 and len(page.having("div", "sel")) == 3
    assert not [a for _, a in page.tags if (a.get("href") or "").startswith("http")]
    assert to_json(report)["queries"][2]["results"] == []


def test_bad_input_is_a_clear_error(trained_run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["query", QUERY, "--gallery", str(tmp_path / "nope"), "--run", str(trained_run)]
    )
    assert result.exit_code == 2 and "nope does not exist" in " ".join(result.output.split())
    with pytest.raises(PedError, match="no query"):
        query_gallery(trained_run, tmp_path, ["  "])
    (tmp_path / "q.txt").write_text("# only a comment\n")
    with pytest.raises(PedError, match="holds no query"):
        read_queries(tmp_path / "q.txt")


class DeviceProbe:
    """A stand-in accelerator: the engine is told to use the `meta` device, and this wrapper of a CPU
    method records the device of every tensor handed to the model, then runs the real method on zeros of
    the same shape on the CPU (meta tensors hold no data; the test checks placement, not scores)."""

    MODEL_CALLS = ("encode_images", "encode_texts", "similarity", "pair_similarity", "shortlist_similarity")

    def __init__(self, method: object) -> None:
        self.method = method
        self.seen: list[tuple[str, str]] = []

    def __getattr__(self, name: str):
        real = getattr(self.method, name)
        if name not in self.MODEL_CALLS:
            return real

        def call(*args):
            cpu = []
            for a in args:
                if isinstance(a, dict):
                    self.seen += [(name, str(v.device)) for v in a.values() if isinstance(v, torch.Tensor)]
                    a = {k: torch.zeros_like(v, device="cpu") if isinstance(v, torch.Tensor) else v
                         for k, v in a.items()}  # fmt: skip
                elif isinstance(a, torch.Tensor):
                    self.seen.append((name, str(a.device)))
                    a = torch.zeros_like(a, device="cpu")
                cpu.append(a)
            return real(*cpu)

        return call


def test_device_reaches_every_encoder_call(
    trained_run: Path, tiny_cache: Path, tmp_path: Path, monkeypatch
) -> None:
    """`--device` is used for the gallery sync of `ped query` (it used to embed on the CPU), the query's
    text and its re-scoring, and for `ped embed` and `ped eval`."""
    import pedcli.engine.distributed as distributed_mod
    import pedcli.engine.embed as embed_mod
    import pedcli.engine.evaluate as evaluate_mod
    import pedcli.engine.search.query as query_mod

    probes: list[DeviceProbe] = []

    def probed_run(*args, **kwargs):
        method, config = load_run(*args, **{**kwargs, "device": torch.device("cpu")})
        probes.append(DeviceProbe(method))
        return probes[-1], config

    for mod in (distributed_mod, evaluate_mod):
        monkeypatch.setattr(mod, "resolve_device", lambda _d: torch.device("meta"))
    for mod in (query_mod, embed_mod, evaluate_mod):
        monkeypatch.setattr(mod, "load_run", probed_run)
    gal = tmp_path / "gallery"
    write_gallery(gal, tiny_cache, 3)
    report = query_gallery(trained_run, gal, [QUERY], top=3, device="cuda")
    assert report.embedded == 3 and len(report.results[0].matches) == 3
    embed_mod.embed_run(trained_run, tiny_cache, "test", tmp_path / "e.h5", device="cuda")
    evaluate_mod.evaluate_run(trained_run, cache=tiny_cache, device="cuda", rerank="none")
    query_calls, embed_calls, eval_calls = ({n for n, _ in p.seen} for p in probes)
    assert {"encode_images", "encode_texts"} <= query_calls
    assert query_calls & {"pair_similarity", "shortlist_similarity"}  # the exact re-scoring
    assert {"encode_images", "encode_texts"} <= embed_calls
    assert {"encode_images", "encode_texts", "similarity"} <= eval_calls
    assert {d for p in probes for _, d in p.seen} == {"meta"}


def test_read_only_gallery_keeps_its_cache_in_the_user_cache_dir(
    trained_run: Path, tiny_cache: Path, tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10 item 7: a gallery folder the user cannot write used to make every query fail."""
    gal = tmp_path / "gallery"
    write_gallery(gal, tiny_cache, 3)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if os.geteuid() == 0:  # root may write anywhere: stand in for a read-only mount
        real = gallery_mod.can_write
        monkeypatch.setattr(gallery_mod, "can_write", lambda d: not d.is_relative_to(gal) and real(d))
    else:
        for d in (gal, gal / "sub"):
            d.chmod(0o555)
    try:
        with caplog.at_level(logging.INFO, logger="pedcli"):
            first = query_gallery(trained_run, gal, [QUERY], top=3)
        again = query_gallery(trained_run, gal, [QUERY], top=3)
    finally:
        for d in (gal, gal / "sub"):
            d.chmod(0o755)
    assert first.embedded == 3 and again.embedded == 0 and not (gal / CACHE_DIRNAME).exists()
    (root,) = (tmp_path / "xdg" / "pedcli" / "galleries").glob("gallery-*")
    assert (root / "catalog.sqlite").is_file()
    log = [r.getMessage() for r in caplog.records]
    assert any("read-only" in line and str(root) in line for line in log), log


def test_html_never_replaces_a_file_it_did_not_write(
    trained_run: Path, tiny_cache: Path, tmp_path: Path
) -> None:
    """Issue 10 item 13: `--html` used to overwrite any file, e.g. an image of the gallery."""
    gal = tmp_path / "gallery"
    photo = write_gallery(gal, tiny_cache, 2)[0]
    before = photo.read_bytes()
    args = ["query", QUERY, "--gallery", str(gal), "--run", str(trained_run), "--html"]
    refused = CliRunner().invoke(app, [*args, str(photo)])
    assert refused.exit_code == 2 and "--force" in refused.output and photo.read_bytes() == before
    page = tmp_path / "page.html"
    assert CliRunner().invoke(app, [*args, str(page)]).exit_code == 0
    assert CliRunner().invoke(app, [*args, str(page)]).exit_code == 0  # an earlier page is replaced
    forced = CliRunner().invoke(app, [*args, str(photo), "--force"])
    assert forced.exit_code == 0 and photo.read_bytes().startswith(b"<!DOCTYPE html>")
