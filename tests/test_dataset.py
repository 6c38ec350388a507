"""Torch datasets over a cache (batch keys, labels, flip) and the identity-balanced sampler."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import TINY_CAPTIONS_PER_IMAGE, TINY_IDS, TINY_IMAGE_SIZE, TINY_IMAGES_PER_ID, write_tiny_cache
from torch.utils.data import DataLoader

from pedcli.data import cache as cache_module
from pedcli.data.cache import load_cache_info
from pedcli.data.dataset import (
    IGNORE_LABEL,
    CaptionDataset,
    IdentityBalancedSampler,
    ImageDataset,
    TextDataset,
    collate,
    data_info,
    num_classes,
    split_pids,
)
from pedcli.data.images import IMAGENET_MEAN, IMAGENET_STD
from pedcli.data.schema import KEYPOINTS
from pedcli.errors import PedError

H, W = TINY_IMAGE_SIZE
TEXT_KEYS = {"tokens", "lengths", "phrases", "n_phrases", "bert_ids", "bert_mask", "bert_spans", "n_spans"}
IMAGE_KEYS = {"image", "pose", "image_index", "flip", "pid", "label"}


def test_caption_batch_keys_shapes_dtypes(tiny_cache: Path) -> None:
    ds = CaptionDataset(tiny_cache, "train")
    n_train = len(TINY_IDS["train"]) * TINY_IMAGES_PER_ID * TINY_CAPTIONS_PER_IMAGE
    assert len(ds) == n_train
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert set(batch) == IMAGE_KEYS | TEXT_KEYS | {"caption_index"}
    assert batch["image"].shape == (4, 3, H, W) and batch["image"].dtype == torch.float32
    assert batch["pose"].shape == (4, len(KEYPOINTS), H // 8, W // 8) and batch["pose"].dtype == torch.float32
    assert batch["flip"].dtype == torch.bool and not batch["flip"].any()
    for key in TEXT_KEYS | {"image_index", "pid", "label", "caption_index"}:
        assert batch[key].dtype == torch.long, key
    assert batch["phrases"].shape[-1] == 2 and batch["bert_spans"].shape[-1] == 2
    assert torch.equal(batch["bert_mask"].sum(1), (batch["bert_ids"] != 0).sum(1))


def test_caption_items_match_the_cache(tiny_cache: Path) -> None:
    ds = CaptionDataset(tiny_cache, "test")
    with h5py.File(tiny_cache / "text.h5") as t, h5py.File(tiny_cache / "images.h5") as im:
        for i in range(len(ds)):
            item = ds[i]
            c = int(item["caption_index"])
            assert item["image_index"] == t["image_index"][c]
            assert np.array_equal(item["tokens"], t["tokens"][c])
            assert item["pid"] == im["pid"][item["image_index"]] and item["pid"] in TINY_IDS["test"]
            expected = (im["images"][item["image_index"]] / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
            np.testing.assert_allclose(item["image"], expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)


def test_labels_contiguous_over_train_ids(tiny_cache: Path) -> None:
    train = CaptionDataset(tiny_cache, "train")
    labels = {int(train[i]["pid"]): int(train[i]["label"]) for i in range(len(train))}
    assert labels == {pid: j for j, pid in enumerate(sorted(TINY_IDS["train"]))}
    val = TextDataset(tiny_cache, "val")
    assert {int(val[i]["label"]) for i in range(len(val))} == {IGNORE_LABEL}
    assert num_classes(tiny_cache) == len(TINY_IDS["train"])
    assert split_pids(tiny_cache, "val").tolist() == sorted(TINY_IDS["val"])


def test_data_info(tiny_cache: Path) -> None:
    info = data_info(tiny_cache)
    assert info.num_classes == len(TINY_IDS["train"])
    assert info.vocab_size == 20 and info.image_size == TINY_IMAGE_SIZE


def test_a_cache_opened_once_is_shared_by_every_reader(
    tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = load_cache_info(tiny_cache)
    assert load_cache_info(cache) is cache
    opened: list[str] = []
    real = cache_module.open_h5
    monkeypatch.setattr(cache_module, "open_h5", lambda path: opened.append(Path(path).name) or real(path))
    datasets = [CaptionDataset(cache, "train"), ImageDataset(cache, "test"), TextDataset(cache, "val")]
    assert all(ds.info is cache for ds in datasets)
    assert data_info(cache).vocab_size == 20 and split_pids(cache, "val").tolist() == sorted(TINY_IDS["val"])
    # the image table and the vocabulary are read once; each dataset reads only its own caption rows
    assert opened.count("images.h5") == 1 and opened.count("text.h5") == 1 + 2


def test_flip_mirrors_image_and_swaps_pose_channels(tiny_cache: Path) -> None:
    plain = CaptionDataset(tiny_cache, "train")[0]
    flipped = CaptionDataset(tiny_cache, "train", flip_prob=1.0)[0]
    assert flipped["flip"] and not plain["flip"]
    np.testing.assert_array_equal(flipped["image"], plain["image"][:, :, ::-1])
    for k, name in enumerate(KEYPOINTS):
        mirror = name.replace("left", "#").replace("right", "left").replace("#", "right")
        np.testing.assert_array_equal(flipped["pose"][k], plain["pose"][KEYPOINTS.index(mirror)][:, ::-1])
    assert np.array_equal(flipped["tokens"], plain["tokens"])  # text untouched


def test_flip_prob_half_flips_some(tiny_cache: Path) -> None:
    torch.manual_seed(0)
    ds = CaptionDataset(tiny_cache, "train", flip_prob=0.5)
    flips = [bool(ds[i % len(ds)]["flip"]) for i in range(64)]
    assert 10 < sum(flips) < 54


def test_image_dataset_one_item_per_image(tiny_cache: Path) -> None:
    ds = ImageDataset(tiny_cache, "val")
    assert len(ds) == len(TINY_IDS["val"]) * TINY_IMAGES_PER_ID
    batch = collate([ds[i] for i in range(len(ds))])
    assert set(batch) == IMAGE_KEYS
    assert sorted(set(batch["pid"].tolist())) == sorted(TINY_IDS["val"])
    assert len(set(batch["image_index"].tolist())) == len(ds)
    mirrored = ImageDataset(tiny_cache, "val", flip=True)[0]
    np.testing.assert_array_equal(mirrored["image"], ds[0]["image"][:, :, ::-1])


def test_text_dataset_has_no_image_keys(tiny_cache: Path) -> None:
    ds = TextDataset(tiny_cache, "test")
    item = ds[0]
    assert "image" not in item and "pose" not in item
    assert set(item) == TEXT_KEYS | {"caption_index", "image_index", "pid", "label"}
    assert len(ds) == len(CaptionDataset(tiny_cache, "test"))


def test_cache_without_pose(tmp_path: Path) -> None:
    cache = write_tiny_cache(tmp_path / "c", with_pose=False)
    assert "pose" not in CaptionDataset(cache, "train")[0]
    with pytest.raises(PedError, match="no pose maps"):
        CaptionDataset(cache, "train", with_pose=True)


def test_unknown_split(tiny_cache: Path) -> None:
    with pytest.raises(PedError, match="unknown split"):
        ImageDataset(tiny_cache, "dev")


def test_dataset_survives_pickling_after_use(tiny_cache: Path) -> None:
    """Workers started by spawn receive a pickled dataset: the open h5py handle must not travel."""
    ds = CaptionDataset(tiny_cache, "train")
    first = ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[0]["image"], first["image"])


def test_dataloader_with_worker_processes(tiny_cache: Path) -> None:
    ds = ImageDataset(tiny_cache, "train")
    ds[0]  # the parent opens its handle before forking; workers must open their own
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    indices = torch.cat([b["image_index"] for b in loader])
    assert sorted(indices.tolist()) == sorted(ds.image_rows.tolist())


# ---- sampler ----------------------------------------------------------------------------------------


def make_pids(seed: int = 0) -> np.ndarray:
    """30 identities with 1 to 7 items each, in shuffled order."""
    rng = np.random.default_rng(seed)
    pids = np.repeat(np.arange(100, 130), rng.integers(1, 8, 30))
    return rng.permutation(pids)


def test_sampler_batches_are_p_ids_by_k() -> None:
    pids = make_pids()
    sampler = IdentityBalancedSampler(pids, batch_size=12, instances_per_id=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        counts = Counter(pids[batch].tolist())
        assert len(counts) == 4 and set(counts.values()) == {3}
    used = [i for b in batches for i in b]
    assert len(used) >= 0.5 * len(pids)  # most items appear in an epoch


def test_sampler_singletons_are_topped_up() -> None:
    pids = np.array([0, 1, 1, 2, 2, 2, 3])
    batches = list(IdentityBalancedSampler(pids, batch_size=4, instances_per_id=2, seed=0))
    for batch in batches:
        assert sorted(Counter(pids[batch].tolist()).values()) == [2, 2]


def test_sampler_deterministic_per_epoch() -> None:
    pids = make_pids()
    a = IdentityBalancedSampler(pids, batch_size=8, seed=3)
    b = IdentityBalancedSampler(pids, batch_size=8, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    assert list(IdentityBalancedSampler(pids, batch_size=8, seed=4)) != first


def test_sampler_rank_split() -> None:
    pids = make_pids()
    whole = list(IdentityBalancedSampler(pids, batch_size=8, seed=5))
    ranks = [
        list(IdentityBalancedSampler(pids, batch_size=8, seed=5, rank=r, world_size=3)) for r in range(3)
    ]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(whole) // 3
    assert [ranks[r][i] for i in range(len(ranks[0])) for r in range(3)] == whole[: 3 * len(ranks[0])]


def test_sampler_rejects_bad_sizes() -> None:
    with pytest.raises(PedError, match="batch size"):
        IdentityBalancedSampler(make_pids(), batch_size=7, instances_per_id=2)
    with pytest.raises(PedError, match="identities"):
        IdentityBalancedSampler(np.array([1, 1, 2, 2]), batch_size=8, instances_per_id=2)


def test_sampler_drives_a_dataloader(tiny_cache: Path) -> None:
    ds = CaptionDataset(tiny_cache, "train")
    sampler = IdentityBalancedSampler(ds.pids, batch_size=4, instances_per_id=2, seed=0)
    for batch in DataLoader(ds, batch_sampler=sampler, collate_fn=collate):
        assert sorted(Counter(batch["pid"].tolist()).values()) == [2, 2]
        assert (batch["label"] >= 0).all()
