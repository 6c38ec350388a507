"""Small attention and masked-pooling pieces the methods share, and the all-pairs layout helpers of the
cross-attention methods (PMA, MIA, NAFS).

Words come padded ([B, L, D] with a valid mask [B, L]), so every pooling and softmax over words here
takes the mask; image positions pass no mask (all valid).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

POOLINGS = ("avg", "max", "avgmax")


def masked_pool(x: Tensor, mask: Tensor | None = None, mode: str = "avg") -> Tensor:
    """Pool [B, N, D] over N, ignoring positions where mask [B, N] is False: avg, max or their sum
    (MGEL eq. 1's avgpool + maxpool, applied to words)."""
    if mode not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, not {mode!r}")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    m = mask.unsqueeze(-1)
    avg = (x * m).sum(1) / m.sum(1).clamp(min=1)
    if mode == "avg":
        return avg
    mx = x.masked_fill(~m, float("-inf")).amax(1)
    mx = torch.where(m.any(1), mx, torch.zeros_like(mx))  # an empty sequence pools to zero, not -inf
    return mx if mode == "max" else avg + mx


def masked_softmax(scores: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Softmax over `dim` where masked-out entries get zero weight (mask broadcastable to scores)."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=dim).nan_to_num(0.0)  # an all-masked row gives zeros, not NaN


class ChannelAttention(nn.Module):
    """Channel weights in (0, 1) from a feature set's average and max descriptors:
    sigmoid(W2 · ReLU(W1 · [avg; max])) — HAN eq. 2, also the channel attention of MGEL's GAB."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Linear(2 * channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: [B, N, C] (N positions or words) → weights [B, C]."""
        descriptors = torch.cat([masked_pool(x, mask, "avg"), masked_pool(x, mask, "max")], dim=1)
        return torch.sigmoid(self.mlp(descriptors))


# ---- all-pairs helpers: text [nt, ...] × image [ni, ...] → [nt, ni, ...], or aligned pairs → [n, ...]
def cross_dots(text: Tensor, image: Tensor, pairwise: bool) -> Tensor:
    """Dot products of text units [nt, X, D] with image units [ni, Y, D]: [nt, ni, X, Y] (aligned pairs,
    pairwise=True: [n, X, Y]). One GEMM for every pair, no loop."""
    if pairwise:
        return text @ image.transpose(1, 2)
    nt, x, d = text.shape
    ni, y, _ = image.shape
    flat = text.reshape(nt * x, d) @ image.reshape(ni * y, d).T
    return flat.reshape(nt, x, ni, y).transpose(1, 2)


def per_text(x: Tensor, pairwise: bool) -> Tensor:
    """A text-only tensor [nt, ...] made to broadcast against [nt, ni, ...]."""
    return x if pairwise else x.unsqueeze(1)


def per_image(x: Tensor, pairwise: bool) -> Tensor:
    """An image-only tensor [ni, ...] made to broadcast against [nt, ni, ...]."""
    return x if pairwise else x.unsqueeze(0)
