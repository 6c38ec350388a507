"""Frozen-trunk cache: while a stage freezes the CNN, compute `method.image_trunk` once per image and flip.

Each split's outputs live in memory-mapped .npy files `out<i>.npy` of shape [n_flips, n_images, ...] (one
per tensor the trunk returns) inside a folder named by a key over everything the outputs depend on: the
method and its config, a hash of the frozen weights, the cache's meta record (data, image size), the
split, the flips and the storage dtype. A key that exists is reused; a folder appears only complete
(built as `<key>.partial`, renamed at the end). Under `torchrun` every rank fills its share of the rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from pedcli.data.cache import Cache
from pedcli.data.dataset import ImageDataset, collate
from pedcli.engine.batching import LoaderOptions, move_batch, precision
from pedcli.engine.distributed import DistContext
from pedcli.engine.stages import frozen_children
from pedcli.fileio import write_json_atomic
from pedcli.models.methods.base import Method

TrunkOutput = torch.Tensor | tuple[torch.Tensor, ...]
META = "meta.json"


def frozen_weights_hash(method: Method) -> str:
    """sha256 over the parameters and buffers of the frozen submodules (the trunk's weights)."""
    h = hashlib.sha256()
    for child in frozen_children(method):
        for name, t in sorted(child.state_dict().items()):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def storage_dtype(device: torch.device) -> type[np.floating]:
    """float16 on CUDA (the bf16 autocast outputs lose nothing more), float32 on CPU (exact)."""
    return np.float16 if device.type == "cuda" else np.float32


def trunk_key(
    method: Method, cache_hash: str, split: str, flips: Sequence[bool], device: torch.device
) -> str:
    spec = {
        "method": method.name,
        "config": dataclasses.asdict(method.cfg),
        "weights": frozen_weights_hash(method),
        "cache": cache_hash,
        "split": split,
        "flips": list(flips),
        "dtype": np.dtype(storage_dtype(device)).name,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


class TrunkCache:
    """Read side: trunk outputs for a batch's (image_index, flip) pairs."""

    def __init__(self, folder: Path) -> None:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        self.folder = folder
        self.flips: list[bool] = meta["flips"]
        self.is_tuple: bool = meta["is_tuple"]
        rows = np.load(folder / "rows.npy")
        self._pos = np.full(int(rows.max()) + 1 if len(rows) else 0, -1, dtype=np.int64)
        self._pos[rows] = np.arange(len(rows))
        self._arrays = [np.load(folder / f"out{i}.npy", mmap_mode="r") for i in range(meta["n_outputs"])]

    def lookup(self, image_index: torch.Tensor, flip: torch.Tensor) -> TrunkOutput:
        """float32 CPU tensors, first dim = batch, exactly what `image_trunk` returned for those images."""
        idx = image_index.cpu().numpy()
        pos = self._pos[idx] if idx.max(initial=-1) < len(self._pos) else np.full(len(idx), -1)
        if (pos < 0).any():
            raise KeyError(f"images {idx[pos < 0][:5].tolist()} are not in the trunk cache {self.folder}")
        slot = flip.cpu().numpy().astype(np.int64)  # flips are [False] or [False, True]
        if slot.max(initial=0) >= len(self.flips):
            raise KeyError(
                f"flipped images asked for, but the trunk cache {self.folder} holds no flipped outputs"
            )
        outs = tuple(torch.from_numpy(np.asarray(a[slot, pos], dtype=np.float32)) for a in self._arrays)
        return outs if self.is_tuple else outs[0]


def _as_tuple(out: TrunkOutput) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@torch.no_grad()
def _fill(
    method: Method,
    ds: ImageDataset,
    arrays: list[np.ndarray],
    slot: int,
    ctx: DistContext,
    opts: LoaderOptions,
) -> None:
    """Compute this rank's rows (rank, rank + world, …) of one flip into the memory maps."""
    mine = list(range(ctx.rank, len(ds), ctx.world_size))
    loader = DataLoader(
        Subset(ds, mine), batch_size=opts.batch_size, collate_fn=collate, num_workers=opts.num_workers
    )
    done = 0
    for batch in loader:
        batch = move_batch(batch, ctx.device, opts.channels_last)
        with precision(ctx.device, opts.amp):
            outs = _as_tuple(method.image_trunk(batch))
        pos = mine[done : done + len(batch["image_index"])]
        for arr, out in zip(arrays, outs, strict=True):
            arr[slot, pos] = out.float().cpu().numpy().astype(arr.dtype)
        done += len(pos)


def open_trunk_cache(
    method: Method,
    cache: str | Path | Cache,
    split: str,
    flips: Sequence[bool],
    folder: Path,
    key: str,
    ctx: DistContext,
    opts: LoaderOptions,
) -> TrunkCache:
    """The cache for `key`, built first if absent. `method` must be in the frozen stage's state."""
    final = folder / key
    if not (final / META).is_file():
        modes = [(m, m.training) for m in method.modules()]
        method.eval()
        try:
            _build(method, cache, split, list(flips), final, ctx, opts)
        finally:
            for module, training in modes:  # exactly as before: frozen parts stay in eval mode
                module.training = training
    return TrunkCache(final)


def _build(
    method: Method,
    cache: str | Path | Cache,
    split: str,
    flips: list[bool],
    final: Path,
    ctx: DistContext,
    opts: LoaderOptions,
) -> None:
    tmp = final.with_name(final.name + ".partial")
    datasets = [ImageDataset(cache, split, flip=f) for f in flips]
    n = len(datasets[0])
    dtype = storage_dtype(ctx.device)
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with torch.no_grad(), precision(ctx.device, opts.amp):
            probe = method.image_trunk(move_batch(collate([datasets[0][0]]), ctx.device, opts.channels_last))
        outs = _as_tuple(probe)
        for i, t in enumerate(outs):
            shape = (len(flips), n, *t.shape[1:])
            np.lib.format.open_memmap(tmp / f"out{i}.npy", mode="w+", dtype=dtype, shape=shape)
        np.save(tmp / "rows.npy", datasets[0].image_rows)
        meta = {
            "flips": flips,
            "n_outputs": len(outs),
            "is_tuple": isinstance(probe, (tuple, list)),
            "split": split,
        }
        write_json_atomic(tmp / META, meta)
    ctx.barrier()
    n_out = json.loads((tmp / META).read_text(encoding="utf-8"))["n_outputs"]
    arrays = [np.load(tmp / f"out{i}.npy", mmap_mode="r+") for i in range(n_out)]
    for slot, ds in enumerate(datasets):
        _fill(method, ds, arrays, slot, ctx, opts)
    for arr in arrays:
        arr.flush()
    del arrays
    ctx.barrier()
    if ctx.is_main:
        tmp.rename(final)
    ctx.barrier()
