"""Embeddings files (round trip on the tiny cache), loose-image embedding, and `ped embed` / `ped eval`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from rich.console import Console
from toy_method import ToyMethod
from typer.testing import CliRunner

from pedcli.cli import app
from pedcli.cli_views import metrics_table
from pedcli.data.cache import load_cache_info, part_path
from pedcli.data.dataset import ImageDataset, TextDataset, collate, data_info
from pedcli.engine.embed import embed, embed_images, load_embeddings
from pedcli.engine.evaluate import evaluate
from pedcli.errors import PedError


@pytest.fixture(scope="module")
def method(tiny_cache: Path) -> ToyMethod:
    return ToyMethod(info=data_info(tiny_cache)).eval()


@pytest.fixture(scope="module")
def stored(tiny_cache: Path, method: ToyMethod, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "test.h5"
    # batches of 2 captions have different longest lengths (checked below): padding is exercised
    return embed(method, tiny_cache, "test", out, batch_size=2, dtype="float32", progress=False)


def whole_split(method: ToyMethod, cache: Path) -> tuple[dict, dict]:
    images, texts = ImageDataset(cache, "test"), TextDataset(cache, "test")
    with torch.inference_mode():
        image = method.encode_images(collate([images[i] for i in range(len(images))]))
        text = method.encode_texts(collate([texts[i] for i in range(len(texts))]))
    return text, image


def test_round_trip_features_and_ids(stored: Path, tiny_cache: Path, method: ToyMethod) -> None:
    text, image, emb = load_embeddings(stored)
    lengths = [int(item["lengths"]) for item in TextDataset(tiny_cache, "test")]
    assert len({max(lengths[i : i + 2]) for i in range(0, len(lengths), 2)}) > 1  # batches padded differently
    ref_text, ref_image = whole_split(method, tiny_cache)
    assert set(image) == {"global", "parts"} and set(text) == {"global", "words", "words_mask"}
    for key in image:
        assert torch.allclose(image[key], ref_image[key], atol=1e-6)
    for key in text:  # one batch pads to the split's longest caption, as the stored file does
        assert (
            torch.equal(text[key], ref_text[key])
            if key.endswith("mask")
            else torch.allclose(text[key], ref_text[key], atol=1e-6)
        )
    # identities and the caption → image link agree with the cache
    with h5py.File(part_path(tiny_cache, "images"), "r") as f:
        rows = np.flatnonzero(f["split"][:] == 2)
        assert emb.image_pid.tolist() == f["pid"][:][rows].tolist()
        assert emb.image_path == f["path"].asstr()[:][rows].tolist()
    with h5py.File(part_path(tiny_cache, "text"), "r") as f:
        cap_rows = np.flatnonzero(np.isin(f["image_index"][:], rows))
        assert emb.caption == f["caption"].asstr()[:][cap_rows].tolist()
        assert rows[emb.text_image_index].tolist() == f["image_index"][:][cap_rows].tolist()
    assert (emb.text_pid == emb.image_pid[emb.text_image_index]).all()
    assert (emb.attrs["method"], emb.attrs["split"]) == ("toy", "test")


def test_float16_storage(tiny_cache: Path, method: ToyMethod, stored: Path, tmp_path: Path) -> None:
    path = embed(method, tiny_cache, "test", tmp_path / "half.h5", dtype="float16", progress=False)
    with h5py.File(path, "r") as f:
        assert f["image/global"].dtype == np.float16 and f["text/words_mask"].dtype == bool
    half, full = load_embeddings(path)[1], load_embeddings(stored)[1]
    assert half["global"].dtype == torch.float32
    assert torch.allclose(half["global"], full["global"], rtol=1e-3, atol=1e-3)


def test_failed_write_keeps_the_old_file(tiny_cache: Path, method: ToyMethod, tmp_path: Path) -> None:
    out = tmp_path / "e.h5"
    out.write_bytes(b"previous")
    with pytest.raises(TypeError):
        embed(method, tiny_cache, "test", out, attrs={"bad": object()}, progress=False)
    assert out.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [out]  # no temporary left behind


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(PedError, match="no embeddings file"):
        load_embeddings(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(PedError, match="not a pedcli embeddings file"):
        load_embeddings(tmp_path / "other.h5")


def test_embed_images_matches_the_dataset(tiny_cache: Path, method: ToyMethod, stored: Path) -> None:
    with h5py.File(part_path(tiny_cache, "images"), "r") as f:
        rows = np.flatnonzero(f["split"][:] == 2)
        pixels = f["images"][:][rows]
    feats = embed_images(method, list(pixels), batch_size=3)
    assert torch.allclose(feats["global"], load_embeddings(stored)[1]["global"], atol=1e-5)
    # other sizes are resized to the method's image size first
    big = embed_images(method, [np.repeat(np.repeat(pixels[0], 2, 0), 2, 1)])
    assert big["parts"].shape == feats["parts"][:1].shape


def test_evaluate_on_stored_features(stored: Path, method: ToyMethod) -> None:
    text, image, emb = load_embeddings(stored)
    tp, ip = torch.from_numpy(emb.text_pid), torch.from_numpy(emb.image_pid)
    exact = evaluate(method, text, image, tp, ip)
    assert exact["scoring"] == "exact" and 0 < exact["t2i"]["mAP"] <= 100
    two = evaluate(method, text, image, tp, ip, rerank_top=len(ip), rerank="rvn")
    assert all(v == pytest.approx(0.0) for d in two["difference"].values() for v in d.values())
    assert two["t2i_before_rerank"] == pytest.approx(exact["t2i"])
    console = Console(record=True, width=140)
    console.print(metrics_table(two))
    shown = console.export_text()
    assert "t2i before re-ranking" in shown and "two-stage − exact" in shown
    with pytest.raises(PedError, match="unknown re-ranking"):
        evaluate(method, text, image, tp, ip, rerank="bogus")


def make_run(root: Path, cache: Path, method: ToyMethod) -> Path:
    """A run folder as `ped train` writes it, for the toy method."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = {
        "method": "toy",
        "method_config": dataclasses.asdict(method.cfg),
        "data_info": dataclasses.asdict(method.info),
        "cache": str(cache),
    }
    (run / "config.json").write_text(json.dumps(config))
    (run / "vocab.json").write_text(json.dumps(load_cache_info(cache).vocab))
    torch.save({"model": method.state_dict()}, run / "checkpoints" / "best.pt")
    return run


def test_cli_embed_then_eval(tiny_cache: Path, method: ToyMethod, tmp_path: Path) -> None:
    run = make_run(tmp_path, tiny_cache, method)
    runner = CliRunner()
    emb = tmp_path / "emb.h5"
    res = runner.invoke(app, ["embed", "--run", str(run), "--out", str(emb), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert load_embeddings(emb)[2].attrs["run"] == str(run.resolve())
    out = tmp_path / "metrics.json"
    args = ["eval", "--run", str(run), "--embeddings", str(emb), "--out", str(out), "--device", "cpu"]
    res = runner.invoke(app, [*args, "--rerank-top", "2", "--rerank", "kreciprocal"])
    assert res.exit_code == 0, res.output
    record = json.loads(out.read_text())
    assert record["rerank_top"] == 2 and record["rerank"]["name"] == "kreciprocal"
    assert set(record["difference"]) == {"t2i", "i2t"}
    # encoding the run's cache now gives the exact metrics of the stored (float16) features
    res = runner.invoke(app, ["eval", "--run", str(run), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["t2i"] == pytest.approx(record["exact"]["t2i"], abs=1e-3)
    bad = runner.invoke(app, [*args, "--cache", str(tiny_cache)])
    assert bad.exit_code == 2 and "either --cache or --embeddings" in bad.output


@pytest.mark.slow
def test_two_ranks_write_the_features_of_one(tiny_cache: Path, method: ToyMethod, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 ped embed ...` (gloo, CPU): the ranks share the batches and rank 0
    writes one file, identical to a single process's (batches of 3 split unevenly over the ranks)."""
    import socket

    import torch.multiprocessing as tmp
    from embed_workers import embed_rank

    from pedcli.engine.embed import embed_run

    run = make_run(tmp_path, tiny_cache, method)
    one = embed_run(run, None, "train", tmp_path / "one.h5", batch_size=3, device="cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.spawn(embed_rank, args=(2, port, str(run), str(tmp_path / "two.h5")), nprocs=2)
    a, b = load_embeddings(one), load_embeddings(tmp_path / "two.h5")
    for group in (0, 1):
        assert a[group].keys() == b[group].keys()
        assert all(torch.equal(a[group][k], b[group][k]) for k in a[group])
    assert a[2].caption == b[2].caption and a[2].image_path == b[2].image_path
    assert (a[2].text_pid == b[2].text_pid).all() and (a[2].image_pid == b[2].image_pid).all()
    shares = [json.loads((tmp_path / f"two.h5.rank{r}.json").read_text()) for r in (0, 1)]
    for kind, n in (("images", len(a[2].image_path)), ("captions", len(a[2].caption))):
        assert sum(s[kind] for s in shares) == n and min(s[kind] for s in shares) > 0  # split, not repeated
