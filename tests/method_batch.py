"""Method-test helpers: a tiny training batch in the layout of base.py's batch keys (no cache needed),
and the held-out R@1 of a trained run for learning tests."""

from __future__ import annotations

from pathlib import Path

import torch

from pedcli.models.methods.base import Batch, DataInfo

TINY_INFO = DataInfo(num_classes=4, vocab_size=30, image_size=(64, 32))
TINY_LENGTHS = (7, 4, 2, 7, 5, 3)  # varied, so padding is exercised
TINY_PIDS = (10, 10, 20, 20, 30, 40)  # two people with two items each: same-person pairs in the batch


def tiny_batch(seed: int = 0, pad_to: int = 8) -> Batch:
    """6 (image, caption) pairs of 64×32 images and captions padded to `pad_to` tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(TINY_LENGTHS)
    tokens = torch.randint(2, TINY_INFO.vocab_size, (len(TINY_LENGTHS), pad_to), generator=g)
    tokens[torch.arange(pad_to)[None, :] >= lengths[:, None]] = 0
    pids = torch.tensor(TINY_PIDS)
    return {
        "image": torch.randn(len(TINY_LENGTHS), 3, *TINY_INFO.image_size, generator=g),
        "tokens": tokens,
        "lengths": lengths,
        "pid": pids,
        "label": torch.unique(pids, return_inverse=True)[1],
    }


def repad(batch: Batch, pad_to: int) -> Batch:
    """The same captions with more trailing padding (a method's text features must not change)."""
    tokens = batch["tokens"].new_zeros(batch["tokens"].shape[0], pad_to)
    tokens[:, : batch["tokens"].shape[1]] = batch["tokens"]
    return {**batch, "tokens": tokens}


def heldout_r1(run: Path, cache: Path) -> tuple[float, float]:
    """(text→image R@1 of the run's best checkpoint on the cache's test split, R@1 of random ranking), %."""
    from pedcli.engine.embed import encode_split
    from pedcli.engine.metrics import retrieval_metrics
    from pedcli.engine.runs import load_run
    from pedcli.engine.scoring import score_matrix

    method, _ = load_run(run)
    emb = encode_split(method, cache, "test", progress=False)
    r1 = retrieval_metrics(score_matrix(method, emb.text, emb.image), emb.text_pid, emb.image_pid)["R@1"]
    chance = 100 * float((emb.text_pid[:, None] == emb.image_pid[None, :]).mean())
    return r1, chance
