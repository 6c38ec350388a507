"""Shared fixtures. Keep each one small and documented; tests of several modules use them."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pedcli.data.cache import CACHE_FORMAT, META, part_digest, part_path
from pedcli.data.schema import KEYPOINTS, SPLIT_CODE
from pedcli.fileio import write_json_atomic

TINY_IMAGE_SIZE = (32, 16)  # H, W; pose maps are H/8 × W/8
TINY_IDS = {"train": (3, 5, 8, 13), "val": (21, 34), "test": (55, 89)}  # non-contiguous on purpose
TINY_IMAGES_PER_ID = 2
TINY_CAPTIONS_PER_IMAGE = 2


def write_tiny_cache(out: Path, *, with_pose: bool = True, seed: int = 0) -> Path:
    """Write a small random cache in the layout of pedcli/data/cache.py (a stand-in for `ped preprocess`).

    8 identities (4 train, 2 val, 2 test) × 2 images × 2 captions; random pixels, tokens and pose maps.
    """
    rng = np.random.default_rng(seed)
    h, w = TINY_IMAGE_SIZE
    rows = [(pid, split) for split, ids in TINY_IDS.items() for pid in ids for _ in range(TINY_IMAGES_PER_ID)]
    n, m = len(rows), len(rows) * TINY_CAPTIONS_PER_IMAGE
    length, n_phr, n_words, bert_len = 8, 3, 20, 10
    out.mkdir(parents=True, exist_ok=True)
    str_dt = h5py.string_dtype()
    with h5py.File(part_path(out, "images"), "w") as f:
        f["images"] = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
        f["pid"] = np.array([pid for pid, _ in rows], dtype=np.int64)
        f["split"] = np.array([SPLIT_CODE[s] for _, s in rows], dtype=np.uint8)
        f.create_dataset("path", data=[f"imgs/{i:03d}.jpg" for i in range(n)], dtype=str_dt)
        f["orig_size"] = np.tile(np.array([[2 * h, 2 * w]], dtype=np.int32), (n, 1))
        kp = rng.uniform(0, w, (n, len(KEYPOINTS), 3)).astype(np.float32)
        kp[..., 2] = 1.0
        f["keypoints"] = kp
    image_index = np.repeat(np.arange(n, dtype=np.int32), TINY_CAPTIONS_PER_IMAGE)
    lengths = rng.integers(3, length + 1, m).astype(np.int32)
    tokens = rng.integers(2, n_words, (m, length)).astype(np.int32)
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
    phrases = np.full((m, n_phr, 2), -1, dtype=np.int16)
    phrases[:, 0] = (0, 2)
    phrases[:, 1] = (2, 3)
    bert_length = lengths + 2
    bert_ids = rng.integers(1000, 2000, (m, bert_len)).astype(np.int32)
    bert_ids[np.arange(bert_len)[None, :] >= bert_length[:, None]] = 0
    bert_spans = np.full((m, 2, 2), -1, dtype=np.int16)
    bert_spans[:, 0, 0], bert_spans[:, 0, 1] = 1, bert_length - 1
    with h5py.File(part_path(out, "text"), "w") as f:
        f.create_dataset("caption", data=[f"caption {i}" for i in range(m)], dtype=str_dt)
        f["image_index"] = image_index
        f["tokens"], f["length"] = tokens, lengths
        f["phrases"], f["n_phrases"] = phrases, np.full(m, 2, dtype=np.int16)
        f["bert_ids"], f["bert_length"] = bert_ids, bert_length.astype(np.int32)
        f["bert_spans"], f["n_spans"] = bert_spans, np.ones(m, dtype=np.int16)
        vocab = ["<pad>", "<unk>"] + [f"w{i}" for i in range(2, n_words)]
        f.create_dataset("vocab", data=vocab, dtype=str_dt)
    parts = ["images", "text"]
    if with_pose:
        with h5py.File(part_path(out, "pose"), "w") as f:
            f["maps"] = rng.random((n, len(KEYPOINTS), h // 8, w // 8)).astype(np.float16)
            f["score"] = np.ones(n, dtype=np.float32)
            f.attrs["source"] = "annotations"
        parts.append("pose")
    write_json_atomic(
        out / META,
        {
            "format": CACHE_FORMAT,
            "dataset": "tiny",
            "options": {
                "image_size": [h, w],
                "pose_source": "annotations" if with_pose else "none",
                "bert_model": None,
            },
            "counts": {"images": n, "captions": m},
            "parts": {p: part_digest(part_path(out, p)) for p in parts},
        },
    )
    return out


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only tiny cache with pose maps, shared by the whole session (do not modify it)."""
    return write_tiny_cache(tmp_path_factory.mktemp("tiny_cache"))


@pytest.fixture(autouse=True)
def one_thread():
    """Small models train faster on one thread, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic benchmark for learning tests: 80 people (48 train / 12 val / 20 test), 128×64 images,
    pose maps from the annotated keypoints (PMA reads them; other methods ignore them). Read-only."""
    from pedcli.data.synth import generate
    from pedcli.engine.preprocess import PreprocessOptions, run_preprocess

    root = tmp_path_factory.mktemp("synth")
    generate(root / "raw", identities=80, seed=0, split_fractions=(0.6, 0.15, 0.25), progress=False)
    opts = PreprocessOptions(image_size=(128, 64), pose_source="annotations", workers=1)
    run_preprocess("synth", root / "raw", root / "cache", opts)
    return root / "cache"


TINY_BASELINE = {"embed_dim": 32, "hidden": 16, "word_dim": 16}


def tiny_train(cache: Path, run: Path, **options):
    """A tiny baseline run (2 epochs unless told otherwise) for engine and query mechanics."""
    from pedcli.engine.train import train

    opts = {"epochs": 2, "batch_size": 8} | options
    return train("baseline", cache, run, method_options=TINY_BASELINE, options=opts, seed=3, progress=False)


@pytest.fixture(scope="session")
def trained_run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny baseline run, one epoch per stage, read-only: for query and serve mechanics, not accuracy."""
    run = tmp_path_factory.mktemp("trained_run") / "run"
    tiny_train(tiny_cache, run, epochs=1)
    return run
