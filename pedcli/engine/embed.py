"""Encode a cache split (or a folder of images) with a trained method, and store / load the features.

Embeddings file (one HDF5, written whole to a temporary file and renamed):
    image/<key>       every tensor of `encode_images` (floating tensors as float16 or float32)
    text/<key>        every tensor of `encode_texts`
    image_pid int64 [Ni], image_path str [Ni]      (path relative to the dataset root, as in the cache)
    text_pid int64 [Nt], caption str [Nt]
    text_image_index int32 [Nt]                    row of the caption's image in image/* of this file
    attrs: method, split, cache, pedcli version, and what the caller adds (run, checkpoint sha256, config)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from pedcli import __version__
from pedcli.data.cache import Cache, load_cache_info
from pedcli.data.dataset import ImageDataset, TextDataset, collate
from pedcli.data.images import load_rgb, normalize_image, resize_rgb
from pedcli.engine.batching import move_batch
from pedcli.engine.distributed import DistContext, setup, teardown
from pedcli.engine.runs import VOCAB, load_run, resolve_checkpoint
from pedcli.errors import PedError
from pedcli.fileio import atomic_path, check_output, sha256_file
from pedcli.models.methods.base import Batch, Features, Method
from pedcli.text.vocab import Vocab

EMBEDDINGS_FORMAT = 1
FLOAT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class Embeddings:
    """Features of one split plus what a report needs to name each row."""

    text: Features
    image: Features
    text_pid: np.ndarray
    image_pid: np.ndarray
    text_image_index: np.ndarray
    caption: list[str] = field(default_factory=list)
    image_path: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)


def stack_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate batch outputs along dim 0, zero-padding any other dim that varies between batches
    (e.g. words padded to each batch's longest caption; their `*_mask` pads with 0 = absent alike)."""
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    padded = []
    for p in parts:
        pad: list[int] = []
        for d in reversed(range(1, p.dim())):
            pad += [0, shape[d - 1] - p.shape[d]]
        padded.append(torch.nn.functional.pad(p, pad) if any(pad) else p)
    return torch.cat(padded)


@torch.inference_mode()
def encode_batches(
    encode: Any,
    batches: Iterable[Batch],
    device: str | torch.device,
    desc: str,
    total: int | None = None,
    progress: bool = True,
) -> Features:
    """Run `encode` (a method's encode_images / encode_texts) over batches; CPU features, one dict. Image
    maps go in channels_last (NHWC), the layout training uses and `for_inference` gives the weights."""
    device = torch.device(device)
    out: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(batches, desc=desc, total=total, disable=not progress, unit="batch"):
        for key, value in encode(move_batch(batch, device, channels_last=True)).items():
            out.setdefault(key, []).append(value.detach().cpu())
    if "global" not in out:
        raise PedError(f"the method's {desc} features have no 'global' entry", "fix the method's encoder")
    return {key: stack_padded(parts) for key, parts in out.items()}


def for_inference(method: Method) -> Method:
    """Eval mode with channels_last (NHWC) convolution weights, as training runs them: faster on CPU
    (`benchmarks/bench_backbone.py`) and on tensor cores."""
    method.eval()
    return method.to(memory_format=torch.channels_last)


def encode_split(
    method: Method,
    cache: str | Path | Cache,
    split: str,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    workers: int = 0,
    progress: bool = True,
    ctx: DistContext | None = None,
) -> Embeddings:
    """Encode every image and caption of a cache split with `method` (in eval mode). Under `torchrun`
    (`ctx`), each rank encodes its share of the batches and every rank returns the whole split."""
    method.eval()
    ctx = ctx or DistContext(device=torch.device(device))
    cache = load_cache_info(cache)
    images, texts = ImageDataset(cache, split), TextDataset(cache, split)
    if len(images) == 0 or len(texts) == 0:
        raise PedError(f"split '{split}' of {cache.root} has no images or captions", "pick another --split")

    def encode(fn: Any, ds: Dataset, desc: str) -> Features:
        mine = rank_share(ds, batch_size, ctx)
        loader = DataLoader(mine, batch_size=batch_size, num_workers=workers, collate_fn=collate)
        show = progress and ctx.is_main
        feats = encode_batches(fn, loader, device, desc, progress=show) if len(mine) else {}
        parts = [p for p in ctx.gather(feats) if p]
        return {k: stack_padded([p[k] for p in parts]) for k in parts[0]}

    image_feats = encode(method.encode_images, images, "images")
    text_feats = encode(method.encode_texts, texts, "captions")
    with cache.read("images") as f:
        paths = f["path"].asstr()[:][images.image_rows].tolist()
    with cache.read("text") as f:
        captions = f["caption"].asstr()[:][texts.text.caption_index].tolist()
    return Embeddings(
        text=text_feats,
        image=image_feats,
        text_pid=np.asarray(texts.pids, dtype=np.int64),
        image_pid=np.asarray(images.pids, dtype=np.int64),
        text_image_index=np.searchsorted(images.image_rows, texts.text.image_index).astype(np.int32),
        caption=captions,
        image_path=paths,
        attrs={"method": method.name, "split": split, "cache": str(cache.root.resolve())},
    )


def rank_share(ds: Dataset, batch_size: int, ctx: DistContext) -> Dataset:
    """This rank's contiguous block of whole batches of `ds`: the ranks encode exactly the batches one
    process would, so the gathered features equal a single process's, row for row and bit for bit."""
    if not ctx.distributed:
        return ds
    batches = -(-len(ds) // batch_size)
    lo, hi = (batches * r // ctx.world_size for r in (ctx.rank, ctx.rank + 1))
    return Subset(ds, range(lo * batch_size, min(len(ds), hi * batch_size)))


def image_batch(images: Sequence[str | Path | np.ndarray], size: tuple[int, int]) -> Batch:
    """An image-only batch from files or RGB uint8 arrays, prepared as the cache + dataset prepare them:
    resized to `size` (H, W) like `ped preprocess`, normalised like `ImageDataset`."""
    arrays = []
    for img in images:
        rgb = load_rgb(Path(img)) if isinstance(img, (str, Path)) else np.asarray(img, dtype=np.uint8)
        if rgb.shape[:2] != tuple(size):
            rgb = resize_rgb(rgb, size)
        arrays.append(normalize_image(rgb))
    n = len(arrays)
    return {
        "image": torch.from_numpy(np.stack(arrays)),
        "image_index": torch.arange(n),
        "flip": torch.zeros(n, dtype=torch.bool),
    }


def embed_images(
    method: Method,
    images: Sequence[str | Path | np.ndarray],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    pose: np.ndarray | None = None,
    progress: bool = False,
) -> Features:
    """Encode loose images (a query gallery folder). `pose` [N, 14, h, w] maps are added for methods that
    read them; the caller computes them (the cache's pose source is not available for loose images)."""
    method.eval()
    size = method.info.image_size

    def batches() -> Iterable[Batch]:
        for s in range(0, len(images), batch_size):
            batch = image_batch(images[s : s + batch_size], size)
            if pose is not None:
                batch["pose"] = torch.as_tensor(pose[s : s + batch_size], dtype=torch.float32)
            yield batch

    total = -(-len(images) // batch_size)
    return encode_batches(method.encode_images, batches(), device, "images", total=total, progress=progress)


def write_embeddings(path: str | Path, emb: Embeddings, dtype: str = "float16") -> Path:
    """Store `emb` at `path` atomically; floating features are cast to `dtype`."""
    if dtype not in FLOAT_DTYPES:
        raise PedError(f"unknown dtype '{dtype}'", f"choose one of: {', '.join(FLOAT_DTYPES)}")
    str_dt = h5py.string_dtype()
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        for group, feats in (("image", emb.image), ("text", emb.text)):
            g = f.create_group(group)
            for key, value in feats.items():
                value = value.to(FLOAT_DTYPES[dtype]) if value.is_floating_point() else value
                g.create_dataset(key, data=value.numpy())
        f["image_pid"], f["text_pid"] = emb.image_pid, emb.text_pid
        f["text_image_index"] = emb.text_image_index
        f.create_dataset("image_path", data=emb.image_path, dtype=str_dt)
        f.create_dataset("caption", data=emb.caption, dtype=str_dt)
        attrs = {**emb.attrs, "format": EMBEDDINGS_FORMAT, "pedcli": __version__}
        for key, value in attrs.items():
            plain = isinstance(value, (str, int, float))
            f.attrs[key] = value if plain else json.dumps(value, sort_keys=True)
    return Path(path)


def embed(
    method: Method,
    cache: str | Path | Cache,
    split: str,
    out: str | Path,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    *,
    attrs: dict[str, Any] | None = None,
    dtype: str = "float16",
    workers: int = 0,
    progress: bool = True,
    ctx: DistContext | None = None,
) -> Path:
    """Encode a cache split and write the embeddings file `out` (see the module docstring); under
    `torchrun` the ranks share the encoding and rank 0 writes the one file."""
    ctx = ctx or DistContext(device=torch.device(device))
    emb = encode_split(method, cache, split, batch_size, device, workers, progress, ctx)
    emb.attrs.update(attrs or {})
    if ctx.is_main:
        write_embeddings(out, emb, dtype)
    ctx.barrier()
    return Path(out)


def load_embeddings(path: str | Path) -> tuple[Features, Features, Embeddings]:
    """(text features, image features, everything) from an embeddings file; features as float32."""
    path = Path(path)
    if not path.is_file():
        raise PedError(
            f"no embeddings file at {path}", "write one with `ped embed --run RUN --cache CACHE --out FILE`"
        )
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != EMBEDDINGS_FORMAT or "image" not in f or "text" not in f:
                raise PedError(f"{path} is not a pedcli embeddings file", "write it with `ped embed`")

            def group(name: str) -> Features:
                feats = {k: torch.from_numpy(f[name][k][:]) for k in f[name]}
                return {k: v.float() if v.is_floating_point() else v for k, v in feats.items()}

            emb = Embeddings(
                text=group("text"),
                image=group("image"),
                text_pid=f["text_pid"][:],
                image_pid=f["image_pid"][:],
                text_image_index=f["text_image_index"][:],
                caption=f["caption"].asstr()[:].tolist(),
                image_path=f["image_path"].asstr()[:].tolist(),
                attrs=dict(f.attrs),
            )
    except OSError as e:
        raise PedError(f"{path} cannot be read as HDF5 ({e})", "write it again with `ped embed`") from e
    return emb.text, emb.image, emb


def embed_run(
    run: str | Path,
    cache: str | Path | None,
    split: str,
    out: str | Path,
    checkpoint: str = "best",
    batch_size: int = 64,
    device: str | None = None,
    dtype: str = "float16",
    workers: int = 0,
    force: bool = False,
) -> Path:
    """`ped embed`: load a trained run and embed a cache split (default: the cache it was trained on),
    shared across processes and machines when launched by `torchrun`. `out` is checked first: writable,
    and not another kind of file (unless `force`)."""
    check_output(out, "embeddings file", is_embeddings_file, force)
    run_dir, ckpt = resolve_checkpoint(run, checkpoint)
    ctx = setup(device)
    dev = ctx.device
    method, config = load_run(run, checkpoint, device=dev)
    for_inference(method)
    attrs = {
        "run": str(run_dir.resolve()),
        "checkpoint": str(ckpt.resolve()),
        "checkpoint_sha256": sha256_file(ckpt),
        "config": config,
    }
    source = run_cache(run_dir, config, cache)
    try:
        kw = {"attrs": attrs, "dtype": dtype, "workers": workers, "ctx": ctx}
        return embed(method, source, split, out, batch_size, dev, **kw)
    finally:
        teardown(ctx)


def run_cache(run_dir: Path, config: dict[str, Any], cache: str | Path | None) -> Cache:
    """The cache a run encodes (default: the one it was trained on), opened once and checked to fit the
    run: the same vocabulary and image size, so no caption is read through another run's word ids."""
    opened = load_cache_info(cache if cache is not None else config["cache"])
    vocab = Vocab.load(run_dir / config.get("text", {}).get("vocab", VOCAB))
    opened.check_fits(vocab.words, config["data_info"]["image_size"], str(config["cache"]))
    return opened


def is_embeddings_file(path: Path) -> bool:
    """Whether `path` is an embeddings file `ped embed` wrote (then replacing it needs no --force)."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == EMBEDDINGS_FORMAT and "image" in f and "text" in f
    except OSError:
        return False
