"""HAN's similarity ranking loss (Li, Xu, Xiao, "Hybrid Attention Network for Language-Based Person
Search", Sensors 2020, sec. 3.4.1, eqs. 14–15).

A ranking loss on Euclidean distances D(g_T, g_I) whose negative pairs are weighted by how unlike the
negative image is to the positive one, w = β − S(g_Ip, g_In) with S the intra-modal cosine similarity:

    L = Σ_n w_pn · max[0, α + D(g_Tp, g_Ip) − D(g_Tp, g_In)]

This is the weighting the paper describes after eq. 15: a negative identical to the positive (S = 1,
w = 0) "is not necessary" to push away, and one completely different (S = −1) gets "a greater weight",
twice the plain hinge's. S only weighs the terms, so it is detached: the loss never moves the image
features to change its own weights. With w fixed to 1 it is the plain ranking loss, eq. 14.

Sign: the paper prints max[0, α − D(pos) + D(neg)], the form of a ranking loss on *similarities*; with
distances, as the paper states D is, that form would pull negatives together. We use the distance form
of its cited ranking loss [42, 43], α + D(pos) − D(neg).

Negatives are every batch item of another person (the paper sums over the mini-batch); the positive of
anchor i is item i of the other modality. The hinges are summed over negatives and averaged over anchors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DIRECTIONS = ("t2i", "both")


def similarity_ranking_loss(
    image: Tensor,
    text: Tensor,
    pids: Tensor,
    margin: float = 0.2,
    beta: float = 1.0,
    intra_similarity: bool = True,
    directions: str = "t2i",
) -> Tensor:
    """Eq. 15 (eq. 14 when `intra_similarity` is False) for a batch of matched pairs.

    image, text: [B, D] features g (FC2 outputs), row i of both from the same pair; pids: [B].
    directions: "t2i" keeps only eq. 15's second sum (text query, negative images), which the paper
    trains with since the task retrieves images from text; "both" adds the first sum (image query,
    negative texts, weighted by the similarity of the two pairs' images).
    """
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {DIRECTIONS}, not {directions!r}")
    dist = torch.cdist(text, image)  # dist[t, i] = D(g_T_t, g_I_i)
    negative = pids[:, None] != pids[None, :]
    if intra_similarity:
        unit = F.normalize(image.detach(), dim=1)
        weight = beta - unit @ unit.t()  # β − S(g_Ip, g_In), a constant of the loss
    else:
        weight = torch.ones_like(dist)  # eq. 14
    positive = dist.diagonal().unsqueeze(1)  # D(g_Tp, g_Ip), one per anchor p
    # second sum of eq. 15: anchor text p, negative images n → dist[p, n]
    loss = (weight * (margin + positive - dist).clamp(min=0) * negative).sum(dim=1).mean()
    if directions == "both":
        # first sum: anchor image p, negative texts n (the captions of images n) → dist[n, p]
        loss = loss + (weight * (margin + positive - dist.t()).clamp(min=0) * negative).sum(dim=1).mean()
    return loss
