"""Method-test helpers: a tiny training batch in the layout of base.py's batch keys (no cache needed), its
noun phrases and BERT word pieces. (Learning tests and their held-out metric: tests/test_learning.py.)"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pedcli.data.schema import KEYPOINTS, POSE_STRIDE
from pedcli.models.methods.base import Batch, DataInfo

TINY_INFO = DataInfo(num_classes=4, vocab_size=30, image_size=(64, 32))
TINY_LENGTHS = (7, 4, 2, 7, 5, 3)  # varied, so padding is exercised
TINY_PIDS = (10, 10, 20, 20, 30, 40)  # two people with two items each: same-person pairs in the batch
CLS, SEP, WORD_PIECE_OFFSET = 101, 102, 1000  # BERT's [CLS] / [SEP] ids; word pieces = tokens + offset
# padded text keys besides tokens → their pad value
PADDED_TEXT_KEYS = {"bert_ids": 0, "bert_mask": 0, "phrases": -1, "bert_spans": -1}


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
        "image_index": torch.arange(len(TINY_LENGTHS)),  # six different images
    }


def repad(batch: Batch, pad_to: int) -> Batch:
    """The same captions with more trailing padding (a method's text features must not change): tokens
    padded to `pad_to`, and word pieces, phrase and sub-sentence slots (when present) by as much again."""
    extra = pad_to - batch["tokens"].shape[1]
    out = {**batch, "tokens": F.pad(batch["tokens"], (0, extra))}
    for key, value in PADDED_TEXT_KEYS.items():
        if key in batch:
            x = batch[key]
            out[key] = F.pad(x, [0, 0] * (x.dim() - 2) + [0, extra], value=value)  # along dim 1
    return out


def with_pose(batch: Batch, seed: int = 0) -> Batch:
    """The batch plus random pose maps at 1/8 of the image size (`pose` [B, 14, H/8, W/8])."""
    h, w = (s // POSE_STRIDE for s in TINY_INFO.image_size)
    g = torch.Generator().manual_seed(seed)
    return {**batch, "pose": torch.rand(len(batch["lengths"]), len(KEYPOINTS), h, w, generator=g)}


def even_spans(lengths: Sequence[int], counts: Sequence[int], slots: int, start: int = 0) -> torch.Tensor:
    """[B, slots, 2] spans, -1 padded: counts[i] consecutive [start, end) spans cutting item i's
    `lengths[i]` positions (from `start`) evenly."""
    spans = torch.full((len(counts), slots, 2), -1)
    for i, (n, length) in enumerate(zip(counts, lengths, strict=True)):
        cuts = torch.linspace(0, length, n + 1).round().long() + start
        spans[i, :n] = torch.stack([cuts[:-1], cuts[1:]], dim=1)
    return spans


def with_phrases(batch: Batch, counts: Sequence[int], slots: int = 3) -> Batch:
    """The batch plus noun-phrase spans (`phrases`, `n_phrases`): counts[i] phrases cutting caption i."""
    spans = even_spans(batch["lengths"].tolist(), counts, slots)
    return {**batch, "phrases": spans, "n_phrases": torch.tensor(counts)}


def with_word_pieces(batch: Batch, counts: Sequence[int], slots: int = 2) -> Batch:
    """The batch plus BERT inputs for the same captions: [CLS], one word piece per word, [SEP], and
    counts[i] sub-sentence spans (`bert_spans`, `n_spans`) cutting caption i's word pieces."""
    lengths = batch["lengths"]
    n, width = len(lengths), batch["tokens"].shape[1] + 2
    mask = (torch.arange(width)[None] < lengths[:, None] + 2).long()
    ids = torch.zeros(n, width, dtype=torch.long)
    ids[:, 0] = CLS
    ids[:, 1:-1] = torch.where(batch["tokens"] > 0, batch["tokens"] + WORD_PIECE_OFFSET, 0)
    ids[torch.arange(n), lengths + 1] = SEP
    spans = even_spans(lengths.tolist(), counts, slots, start=1)
    return {**batch, "bert_ids": ids, "bert_mask": mask, "bert_spans": spans, "n_spans": torch.tensor(counts)}
