"""Worker of the two-rank embedding test (its own module: spawned processes import it, not test_embed)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def embed_rank(rank: int, world: int, port: int, run: str, out: str) -> None:
    """One `torchrun` rank of `ped embed` (the environment torchrun would set), on the CPU (gloo); writes
    how many images and captions this rank encoded to OUT.rank<rank>.json."""
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    from toy_method import ToyMethod  # registers the run's method

    from pedcli.engine.embed import embed_run

    counts = {"images": 0, "captions": 0}
    real_images, real_texts = ToyMethod.encode_images, ToyMethod.encode_texts

    def images(self, batch):
        counts["images"] += len(batch["image"])
        return real_images(self, batch)

    def texts(self, batch):
        counts["captions"] += len(batch["caption_index"])
        return real_texts(self, batch)

    ToyMethod.encode_images, ToyMethod.encode_texts = images, texts
    embed_run(run, None, "train", out, batch_size=3, device="cpu")
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(counts))
