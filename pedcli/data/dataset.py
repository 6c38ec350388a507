"""Torch datasets over a preprocessed cache, the batch collate, and the identity-balanced sampler.

Items use the batch keys of `pedcli.models.methods.base` (its docstring is the contract):
`CaptionDataset` gives training pairs (image + caption, one item per caption), `ImageDataset` one item
per image (galleries), `TextDataset` caption arrays only (queries; no image is decoded).

Text arrays of the split are read into memory once (tens of MB for CUHK-PEDES); images and pose maps are
read per item from HDF5 files that each worker process opens itself, because an h5py handle inherited
across `fork` is not safe to use.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pedcli.data.cache import REBUILD, Cache, load_cache_info, open_h5, split_code
from pedcli.data.images import normalize_image
from pedcli.data.schema import FLIP_PERMUTATION, IGNORE_LABEL, SPLIT_CODE, DataInfo
from pedcli.errors import PedError

Item = dict[str, Any]

# text.h5 dataset → batch key (query uses it too); no bert_* rows in caches built without BERT
TEXT_BATCH_KEYS = {
    "tokens": "tokens",
    "length": "lengths",
    "phrases": "phrases",
    "n_phrases": "n_phrases",
    "bert_ids": "bert_ids",
    "bert_length": "bert_length",
    "bert_spans": "bert_spans",
    "n_spans": "n_spans",
}


class _LazyH5:
    """An HDF5 file opened on first use in each process (never shared across fork, dropped on pickling)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: h5py.File | None = None
        self._pid = -1

    def __getitem__(self, key: str) -> h5py.Dataset:
        if self._file is None or self._pid != os.getpid():
            self._file = open_h5(self.path)
            self._pid = os.getpid()
        return self._file[key]

    def row(self, key: str, i: int) -> np.ndarray:
        """Row `i` of dataset `key`; a damaged chunk is a PedError naming the part, not an OSError."""
        try:
            return self[key][i]
        except OSError as e:
            raise PedError(f"{self.path} is damaged: row {i} of '{key}' cannot be read ({e})", REBUILD) from e

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_file": None, "_pid": -1}


CacheLike = str | Path | Cache


def split_pids(cache: CacheLike, split: str) -> np.ndarray:
    """Sorted person ids of one split."""
    return load_cache_info(cache).split_pids(split)


def num_classes(cache: CacheLike) -> int:
    """Training identities: the size of an identity-classification head."""
    return len(split_pids(cache, "train"))


def data_info(cache: CacheLike) -> DataInfo:
    """What a method needs to build its layers, read from the cache."""
    return load_cache_info(cache).data_info()


def _labels(pid: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Per image: contiguous 0..C-1 over train identities (sorted pid), IGNORE_LABEL elsewhere."""
    train = code == SPLIT_CODE["train"]
    train_ids = np.unique(pid[train])
    return np.where(train, np.searchsorted(train_ids, pid), IGNORE_LABEL).astype(np.int64)


class _CacheSplit(Dataset):
    """Common part: the cache's image table, labels and the per-process readers of images and pose."""

    def __init__(self, cache: CacheLike, split: str, with_pose: bool | None) -> None:
        self.info: Cache = load_cache_info(cache)
        self.split = split
        self.image_pid, image_code = self.info.image_table
        self.image_label = _labels(self.image_pid, image_code)
        self.image_rows = np.flatnonzero(image_code == split_code(split))
        self.with_pose = self.info.has_pose if with_pose is None else with_pose
        if self.with_pose and not self.info.has_pose:
            raise PedError(
                f"{self.info.root} has no pose maps",
                "preprocess with --pose-source blazepose|annotations, or use a method that needs no pose",
            )
        self._images = _LazyH5(self.info.part("images"))
        self._pose = _LazyH5(self.info.part("pose")) if self.with_pose else None

    def _image_item(self, row: int, flip: bool) -> Item:
        """Image keys of one cache row: ImageNet-normalised CHW float image, pose maps, ids, flip flag."""
        img = self._images.row("images", row)
        if flip:
            img = img[:, ::-1]
        item: Item = {
            "image": normalize_image(img),
            "image_index": row,
            "flip": flip,
            "pid": self.image_pid[row],
            "label": self.image_label[row],
        }
        if self._pose is not None:
            maps = self._pose.row("maps", row).astype(np.float32)
            # a mirrored person swaps left and right: channel k takes keypoint FLIP_PERMUTATION[k]
            item["pose"] = np.ascontiguousarray(maps[list(FLIP_PERMUTATION), :, ::-1]) if flip else maps
        return item


class _TextRows:
    """The caption arrays of one split, in memory, plus each caption's image row."""

    def __init__(self, cache: Cache, image_rows: np.ndarray) -> None:
        with cache.read("text") as f:
            image_index = f["image_index"][:].astype(np.int64)
            self.caption_index = np.flatnonzero(np.isin(image_index, image_rows))
            self.image_index = image_index[self.caption_index]
            self.arrays = {
                key: f[name][:][self.caption_index].astype(np.int64)
                for name, key in TEXT_BATCH_KEYS.items()
                if name in f
            }

    def __len__(self) -> int:
        return len(self.caption_index)

    def item(self, i: int) -> Item:
        out: Item = {key: arr[i] for key, arr in self.arrays.items()}
        out["caption_index"] = self.caption_index[i]
        if "bert_length" in out:
            length = out.pop("bert_length")
            out["bert_mask"] = (np.arange(len(out["bert_ids"])) < length).astype(np.int64)
        return out


class CaptionDataset(_CacheSplit):
    """One item per caption of `split`: its image (flipped with probability `flip_prob`), pose maps when
    the cache has them (or `with_pose` says so), and the caption arrays. Training pairs and text queries."""

    def __init__(
        self, cache: CacheLike, split: str, *, flip_prob: float = 0.0, with_pose: bool | None = None
    ) -> None:
        super().__init__(cache, split, with_pose)
        self.flip_prob = flip_prob
        self.text = _TextRows(self.info, self.image_rows)
        self.pids = self.image_pid[self.text.image_index]  # per item, for IdentityBalancedSampler

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int) -> Item:
        # torch's RNG: DataLoader seeds it per worker, so a seeded loader flips reproducibly
        flip = self.flip_prob > 0 and bool(torch.rand(()) < self.flip_prob)
        return self._image_item(int(self.text.image_index[i]), flip) | self.text.item(i)


class ImageDataset(_CacheSplit):
    """One item per image of `split` (gallery embedding); `flip=True` mirrors every image (and pose)."""

    def __init__(
        self, cache: CacheLike, split: str, *, flip: bool = False, with_pose: bool | None = None
    ) -> None:
        super().__init__(cache, split, with_pose)
        self.flip = flip
        self.pids = self.image_pid[self.image_rows]

    def __len__(self) -> int:
        return len(self.image_rows)

    def __getitem__(self, i: int) -> Item:
        return self._image_item(int(self.image_rows[i]), self.flip)


class TextDataset(Dataset):
    """One item per caption of `split`: caption arrays and ids only, no image decoded."""

    def __init__(self, cache: CacheLike, split: str) -> None:
        self.info = load_cache_info(cache)
        image_pid, image_code = self.info.image_table
        image_label = _labels(image_pid, image_code)
        self.text = _TextRows(self.info, np.flatnonzero(image_code == split_code(split)))
        self.pids = image_pid[self.text.image_index]
        self.labels = image_label[self.text.image_index]

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int) -> Item:
        return self.text.item(i) | {
            "image_index": self.text.image_index[i],
            "pid": self.pids[i],
            "label": self.labels[i],
        }


def collate(items: Sequence[Item]) -> dict[str, torch.Tensor]:
    """Stack items into the batch dict: arrays gain a batch dimension, scalars become [B] tensors."""
    return {key: torch.from_numpy(np.stack([it[key] for it in items])) for key in items[0]}


class IdentityBalancedSampler(Sampler[list[int]]):
    """Batches of P identities × K items (P = batch_size / K), so every batch holds positives and
    negatives for triplet / ranking losses.

    Each epoch every identity's items are shuffled and cut into groups of K (an identity with fewer than K
    items is topped up by repetition; a remainder shorter than K waits for another epoch); batches then
    draw P distinct identities among those with groups left, until fewer than P remain. The schedule
    depends only on (seed, epoch): call `set_epoch` each epoch. With `world_size` > 1 every rank computes
    the same schedule and takes batches rank, rank + world_size, … (all ranks get the same count).
    """

    def __init__(
        self,
        pids: Sequence[int] | np.ndarray,
        batch_size: int,
        instances_per_id: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        k = instances_per_id
        if k < 1 or batch_size % k or batch_size // k < 2:
            raise PedError(
                f"batch size {batch_size} does not hold at least 2 identities × {k} instances",
                "use a batch size that is a multiple of --instances-per-id and at least twice it",
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        pids = np.asarray(pids)
        self.ids, inverse = np.unique(pids, return_inverse=True)
        self.items_by_id = [np.flatnonzero(inverse == j) for j in range(len(self.ids))]
        self.p, self.k = batch_size // k, k
        if len(self.ids) < self.p:
            raise PedError(
                f"{len(self.ids)} identities cannot fill a batch of {self.p} identities × {k}",
                "lower the batch size or --instances-per-id",
            )
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _schedule(self) -> list[list[int]]:
        """All batches of this epoch (every rank's), computed once per epoch."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        groups: list[list[np.ndarray]] = []
        for items in self.items_by_id:
            order = rng.permutation(items)
            if len(order) < self.k:
                order = np.concatenate([order, rng.choice(items, self.k - len(order))])
            groups.append([order[i : i + self.k] for i in range(0, len(order) - self.k + 1, self.k)])
        available = list(range(len(groups)))
        batches: list[list[int]] = []
        while len(available) >= self.p:
            picked = rng.choice(len(available), self.p, replace=False)
            batches.append([int(i) for j in picked for i in groups[available[j]].pop()])
            for j in sorted(picked, reverse=True):  # swap-remove exhausted ids; descending keeps j valid
                if not groups[available[j]]:
                    available[j] = available[-1]
                    available.pop()
        self._cache = (self.epoch, batches)
        return batches

    def __len__(self) -> int:
        return len(self._schedule()) // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        mine = self._schedule()[self.rank :: self.world_size]
        return iter(mine[: len(self)])
