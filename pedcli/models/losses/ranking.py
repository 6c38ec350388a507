"""Hinge ranking losses over a batch similarity matrix (text rows, image columns).

Text i and image i form the matched pair; any pair sharing a person id is also a positive and is
therefore never used as a negative (a batch holds several captions / images of one person).
Each positive pair (i, j) gives two hinge terms, one per retrieval direction:
text→image ranks row i, image→text ranks column j. Both losses average over positive pairs so the
scale does not grow with the batch size.
"""

from __future__ import annotations

from torch import Tensor


def _pair_masks(sim: Tensor, pids: Tensor) -> tuple[Tensor, Tensor]:
    """(positive mask, negative mask), both [B, B] bool, from the identities of rows and columns."""
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] != pids.shape[0]:
        raise ValueError(f"expected a square similarity matrix matching pids, got {tuple(sim.shape)}")
    same = pids[:, None] == pids[None, :]
    return same, ~same


def triplet_hardest(sim: Tensor, pids: Tensor, margin: float = 0.2) -> Tensor:
    """VSE++ (Faghri et al. 2018): hinge against the hardest negative of the batch, both directions."""
    pos, neg = _pair_masks(sim, pids)
    masked = sim.masked_fill(~neg, float("-inf"))
    hardest_img = masked.max(dim=1, keepdim=True).values  # per text row: most similar wrong image
    hardest_txt = masked.max(dim=0, keepdim=True).values  # per image column: most similar wrong text
    t2i = (margin - sim + hardest_img).clamp(min=0)
    i2t = (margin - sim + hardest_txt).clamp(min=0)
    return ((t2i + i2t) * pos).sum() / pos.sum()


def sum_of_hinges(sim: Tensor, pids: Tensor, margin: float = 0.2) -> Tensor:
    """Sum-of-hinges loss (MIA eq. 20): every negative of the batch contributes, both directions."""
    pos, neg = _pair_masks(sim, pids)
    s_pos = sim.unsqueeze(2)  # [i, j, 1]: the positive pair (i, j)
    t2i = (margin - s_pos + sim.unsqueeze(1)).clamp(min=0) * neg.unsqueeze(1)  # [i, j, k]: image k
    i2t = (margin - s_pos + sim.t().unsqueeze(0)).clamp(min=0) * neg.t().unsqueeze(0)  # [i, j, k]: text k
    per_pair = t2i.sum(dim=2) + i2t.sum(dim=2)
    return (per_pair * pos).sum() / pos.sum()
