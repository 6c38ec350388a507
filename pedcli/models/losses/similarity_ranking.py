"""HAN's similarity ranking loss (Li, Xu, Xiao, "Hybrid Attention Network for Language-Based Person
Search", Sensors 2020, sec. 3.4.1, eqs. 14–15).

A ranking loss on Euclidean distances D(g_T, g_I) whose negative pairs are weighted by how unlike the
negative image is to the positive one, w = β − S(g_Ip, g_In) with S the intra-modal cosine similarity:

    L = Σ_n w_pn · max[0, α + D(g_Tp, g_Ip) − D(g_Tp, g_In)]

This is the intent the paper gives after eq. 15: a negative identical to the positive (S = 1, w = 0)
"is not necessary" to push away, and one completely different (S = −1) gets "a greater weight", twice
the plain hinge's (the printed equation places w differently: below). S only weighs the terms, so it
is detached: the loss never moves the image features to change its own weights. With w fixed to 1 it
is the plain ranking loss, eq. 14.

Sign: the paper prints max[0, α − D(pos) + D(neg)], the form of a ranking loss on *similarities*; with
distances, as the paper states D is, that form would pull negatives together. We use the distance form
of its cited ranking loss [42, 43], α + D(pos) − D(neg).

Where the weight goes: the printed eq. 15 puts w on the negative pair's term inside the hinge,
max[0, α − D(pos) + w·D(neg)] in its similarity form, so S = 1 leaves "max[0, α − D(pos)]", a term on
the positive pair alone, where the form above drops the negative's whole hinge. `form="printed"` is that
equation, read (as its signs ask) on the cosine similarity s of the two features:

    L = Σ_n max[0, α − s(g_Tp, g_Ip) + w_pn · s(g_Tp, g_In)]

`form="hinge"` (the default, the HAN comparison's runs) is the weighted distance hinge above.

Negatives are every batch item of another person (the paper sums over the mini-batch); the positive of
anchor i is item i of the other modality. The hinges are summed over negatives and averaged over anchors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DIRECTIONS = ("t2i", "both")
FORMS = ("hinge", "printed")


def similarity_ranking_loss(
    image: Tensor,
    text: Tensor,
    pids: Tensor,
    margin: float = 0.2,
    beta: float = 1.0,
    intra_similarity: bool = True,
    directions: str = "t2i",
    form: str = "hinge",
) -> Tensor:
    """Eq. 15 (eq. 14 when `intra_similarity` is False) for a batch of matched pairs.

    image, text: [B, D] features g (FC2 outputs), row i of both from the same pair; pids: [B].
    directions: "t2i" keeps only eq. 15's second sum (text query, negative images), which the paper
    trains with since the task retrieves images from text; "both" adds the first sum (image query,
    negative texts, weighted by the similarity of the two pairs' images).
    form: "hinge" weights each distance hinge; "printed" weights the negative's cosine similarity inside
    it, as eq. 15 prints (see the module docstring).
    """
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {DIRECTIONS}, not {directions!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    negative = pids[:, None] != pids[None, :]
    if intra_similarity:
        unit = F.normalize(image.detach(), dim=1)
        weight = beta - unit @ unit.t()  # β − S(g_Ip, g_In), a constant of the loss
    else:
        weight = torch.ones(negative.shape, dtype=image.dtype, device=image.device)  # eq. 14

    def one_sum(score: Tensor) -> Tensor:
        """Σ over negatives n of anchor p's terms, mean over anchors; score[p, n] pairs anchor p's query
        with item n of the other modality (the diagonal: its positive)."""
        if form == "hinge":  # score: distances
            terms = weight * (margin + score.diagonal().unsqueeze(1) - score).clamp(min=0)
        else:  # score: cosine similarities
            terms = (margin - score.diagonal().unsqueeze(1) + weight * score).clamp(min=0)
        return (terms * negative).sum(dim=1).mean()

    if form == "hinge":
        score = torch.cdist(text, image)  # score[t, i] = D(g_T_t, g_I_i)
    else:
        score = F.normalize(text, dim=1) @ F.normalize(image, dim=1).t()
    loss = one_sum(score)  # second sum of eq. 15: anchor text p, negative images n
    if directions == "both":  # first sum: anchor image p, negative texts n (the captions of images n)
        loss = loss + one_sum(score.t())
    return loss
