"""Gallery embedding throughput: `ped query`'s sync of new JPEG files against a bare torchvision forward.

Synthetic 384×128 JPEG files (the default image size) make a gallery. "ours" is the whole first sync of
`ped query` (hash each file, decode in DataLoader workers, resize + normalise, encode with the baseline
method in inference mode and channels_last, store the rows): images/s. "bare" is torchvision's
MobileNetV2 feature extractor (the baseline's backbone), channels_last, in inference mode, on the same
batches already decoded and normalised in memory: images/s of the forward pass alone. The ratio is what
our pipeline keeps of the bare model's speed (goal ≥ 0.9).
Run: `make bench-embed`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import models

from pedcli.engine.embed import for_inference, image_batch
from pedcli.engine.search.gallery import GalleryCache
from pedcli.models.methods.base import DataInfo, create_method


def write_jpegs(folder: Path, n: int, size: tuple[int, int], rng: np.random.Generator) -> list[Path]:
    """n smooth random RGB images (JPEG-compressible like photos) at `size` (H, W)."""
    h, w = size
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        paths.append(folder / f"{i:05d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="decode processes of the sync")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = (384, 128)
    method = create_method(
        "baseline", DataInfo(num_classes=2, vocab_size=4, image_size=size), {"pretrained": "none"}
    )
    for_inference(method)
    with tempfile.TemporaryDirectory() as tmp:
        gal = Path(tmp) / "gallery"
        gal.mkdir()
        files = write_jpegs(gal, args.images, size, np.random.default_rng(0))
        t = time.perf_counter()
        cache = GalleryCache(gal, Path(tmp) / "cache", "bench")
        feats = cache.sync(method, batch_size=args.batch_size, workers=args.workers)
        ours = len(feats.paths) / (time.perf_counter() - t)
        batches = [
            image_batch(files[s : s + args.batch_size], size)["image"]
            for s in range(0, len(files), args.batch_size)
        ]
    bare_net = models.mobilenet_v2().features.eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        bare_net(batches[0].contiguous(memory_format=torch.channels_last))  # warm-up
        t = time.perf_counter()
        for b in batches:
            bare_net(b.contiguous(memory_format=torch.channels_last))
        bare = len(files) / (time.perf_counter() - t)
    print(f"{'images':>7} {'ours img/s':>10} {'bare img/s':>10} {'ratio':>6}")
    print(f"{len(files):>7} {ours:>10.1f} {bare:>10.1f} {ours / bare:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
