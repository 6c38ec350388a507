"""Worker of the concurrent-cache test (its own module: spawned processes import it, not test_query)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pedcli.engine.search.gallery import GalleryCache


def mean_colour(_method: object, arrays: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """A stand-in encoder (mean RGB as the global feature), slow enough that two writers overlap."""
    time.sleep(0.2)
    return {"global": torch.tensor(np.stack([a.reshape(-1, 3).mean(0) for a in arrays]), dtype=torch.float32)}


def sync_gallery(gallery: str, root: str, batch_size: int) -> list[tuple[str, list[float]]]:
    """(path, stored global feature) of every gallery file after one sync."""
    cache = GalleryCache(Path(gallery), Path(root), "model")
    feats = cache.sync(None, mean_colour, batch_size)  # type: ignore[arg-type]  (no model: a stand-in)
    glob = feats.gather(feats.rows)["global"]
    return [(str(p), g.tolist()) for p, g in zip(feats.paths, glob, strict=True)]


def sync_then_die(gallery: str, root: str, where: str) -> None:
    """Sync with the stand-in encoder and SIGKILL this process midway: while embedding (after 2 batches),
    or after the new rows were appended to the row files but before the catalogue commit."""
    import os
    import signal

    from pedcli.engine.search import gallery as gallery_mod

    batches = []

    def encode(method: object, arrays: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        batches.append(len(arrays))
        if where == "embedding" and len(batches) > 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return mean_colour(method, arrays)

    real_append = gallery_mod.GalleryCache._append

    def append_and_die(self, store, block, norms=None):
        first = real_append(self, store, block, norms)
        if where == "commit":
            os.kill(os.getpid(), signal.SIGKILL)
        return first

    gallery_mod.GalleryCache._append = append_and_die
    GalleryCache(Path(gallery), Path(root), "model").sync(None, encode, 2)  # type: ignore[arg-type]


def sync_rank(rank: int, world: int, port: int, gallery: str, root: str) -> None:
    """One `torchrun` rank (gloo, CPU) syncing the gallery; writes ROOT.rank<rank>.json with the images
    this rank encoded and the (file, stored colour) it answers with."""
    import json
    import os

    from pedcli.engine.distributed import setup, teardown

    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ctx = setup("cpu")
    encoded = []

    def encode(method: object, arrays: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        encoded.append(len(arrays))
        return mean_colour(method, arrays)

    feats = GalleryCache(Path(gallery), Path(root), "model").sync(None, encode, 2, workers=0, ctx=ctx)  # type: ignore[arg-type]
    teardown(ctx)
    glob = feats.gather(feats.rows)["global"][:, 0].tolist()
    found = {p.name: round(g, 1) for p, g in zip(feats.paths, glob, strict=True)}
    Path(f"{root}.rank{rank}.json").write_text(json.dumps({"encoded": sum(encoded), "colours": found}))


if __name__ == "__main__":
    import sys

    sync_then_die(*sys.argv[1:4])
