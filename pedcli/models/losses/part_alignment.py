"""MGEL's part alignment loss (Wang et al., IJCAI 2021, sec. 3.1 "Partial Embedding Learning", eqs. 3–9).

Image stripe i and text part i of one granularity are meant to describe the same body part. The loss
asks for two things: (1) the two embeddings have the same activation statistics (pull, eqs. 3–4) and
(2) they are modality-invariant: each one, re-weighted by its agreement with the mixed feature of the
pair (eqs. 5–6) and pooled to one vector, lies closer to the pair's pooled mix than to any other
person's mix (eq. 8). The pooling (global contrastive pooling, eq. 7) belongs to the model, so it is
passed in as `aggregate`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def activation(parts: Tensor) -> Tensor:
    """Eq. 3: A_i = (1/c) Σ_channels |x_i| — one activation value per part: [..., c] → [...]."""
    return parts.abs().mean(dim=-1)


def pull_loss(image_parts: Tensor, text_parts: Tensor) -> Tensor:
    """Eq. 4: Σ_i (Â_i − Ǎ_i)² over the parts of a granularity, averaged over the batch ([B, n, c] each)."""
    return (activation(image_parts) - activation(text_parts)).pow(2).sum(dim=1).mean()


def co_attend(image_parts: Tensor, text_parts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eqs. 5–6: the mixed feature m = (v + z)/2 and the co-attentive parts v·½(1 + tanh(v·m)),
    z·½(1 + tanh(z·m)) (all products element-wise). Returns (v̂, ẑ, m), each shaped like the input."""
    mixed = 0.5 * (image_parts + text_parts)  # eq. 5
    v_hat = image_parts * 0.5 * (1.0 + torch.tanh(image_parts * mixed))  # eq. 6, first line
    z_hat = text_parts * 0.5 * (1.0 + torch.tanh(text_parts * mixed))  # eq. 6, second line
    return v_hat, z_hat, mixed


def hardest_negative_hinge(anchor: Tensor, candidates: Tensor, pids: Tensor, margin: float) -> Tensor:
    """One term of eq. 8: max[0, α − cos(a_i, m_i) + cos(a_i, m̃)], m̃ the candidate of another person most
    cosine-similar to a_i; averaged over anchors. Candidate i is anchor i's positive (the same pair).

    Only the anchor→candidate direction is ranked, as eq. 8 writes it (`triplet_hardest` in ranking.py
    ranks both directions, which eq. 10 wants but eq. 8 does not)."""
    sim = F.normalize(anchor, dim=1) @ F.normalize(candidates, dim=1).t()
    other = pids[:, None] != pids[None, :]
    hardest = sim.masked_fill(~other, float("-inf")).max(dim=1).values
    hinge = (margin - sim.diagonal() + hardest).clamp(min=0)
    has_negative = other.any(dim=1)  # a batch of one person has nothing to rank against
    return (hinge * has_negative).sum() / has_negative.sum().clamp(min=1)


def mix_loss(
    image_parts: Tensor,
    text_parts: Tensor,
    aggregate: Callable[[Tensor], Tensor],
    pids: Tensor,
    margin: float = 0.2,
) -> Tensor:
    """Eq. 8: the pooled co-attentive image and text embeddings (v̂^k, ẑ^k) each ranked against the pooled
    mixed embeddings m̂^k of the batch (the pair's own one positive, the hardest other person's negative)."""
    v_hat, z_hat, mixed = co_attend(image_parts, text_parts)
    m_global = aggregate(mixed)
    return hardest_negative_hinge(aggregate(v_hat), m_global, pids, margin) + hardest_negative_hinge(
        aggregate(z_hat), m_global, pids, margin
    )


def part_alignment_loss(
    image_parts: Tensor,
    text_parts: Tensor,
    aggregate: Callable[[Tensor], Tensor],
    pids: Tensor,
    margin: float = 0.2,
) -> Tensor:
    """Eq. 9: L_pl^k = L_pull^k + L_mix^k for one granularity.

    image_parts, text_parts: [B, n, c], row b of both from the same (image, caption) pair;
    aggregate: [B, n, c] → [B, D], the model's part pooling (GCP, eq. 7); pids: [B] person ids.
    """
    if image_parts.shape != text_parts.shape:
        raise ValueError(
            f"image and text parts differ in shape: {tuple(image_parts.shape)} vs {tuple(text_parts.shape)}"
        )
    return pull_loss(image_parts, text_parts) + mix_loss(image_parts, text_parts, aggregate, pids, margin)
