"""Small attention and masked-pooling pieces the methods share, and the pair-layout kernels of the
cross-attention methods (PMA, MIA, NAFS): every cosine, attended cosine and unit trimming they score with.

Words come padded ([B, L, D] with a valid mask [B, L]), so every pooling and softmax over words here
takes the mask; image positions pass no mask (all valid).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
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


# ---- layouts of (text, image) pairs ------------------------------------------------------------------
# Scoring code is written once for four layouts of the pairs it scores; text-only tensors go through
# `per_text`, image-only ones through `per_image`, and both broadcast to the layout's pair dims:
#   "all":             texts [nt, ...] × images [ni, ...]        → pairs [nt, ni, ...]
#   "pairs":           aligned texts [n, ...], images [n, ...]   → pairs [n, ...]
#   "images_per_text": texts [n, ...], images [n, K, ...]        → pairs [n, K, ...] (a text shortlist)
#   "texts_per_image": texts [n, K, ...], images [n, ...]        → pairs [n, K, ...] (an image shortlist)
Layout = Literal["all", "pairs", "images_per_text", "texts_per_image"]
EPS = 1e-8


def cross_dots(text: Tensor, image: Tensor, layout: Layout) -> Tensor:
    """Dot products of text units [.., X, D] with image units [.., Y, D]: [pairs.., X, Y]. One GEMM for
    every pair ("all") or one batched GEMM per text / image (shortlists), never a copy per pair."""
    if layout == "pairs":
        return text @ image.transpose(-1, -2)
    if layout == "images_per_text":  # text [n, X, D], image [n, K, Y, D]
        n, k, y, d = image.shape
        return (text @ image.reshape(n, k * y, d).transpose(1, 2)).unflatten(2, (k, y)).transpose(1, 2)
    if layout == "texts_per_image":  # text [n, K, X, D], image [n, Y, D]: the few image units on the
        n, k, x, d = text.shape  # left, one GEMM per image (1.4-1.7x faster than K·X rows on the left)
        return (image @ text.reshape(n, k * x, d).transpose(1, 2)).unflatten(2, (k, x)).permute(0, 2, 3, 1)
    nt, x, d = text.shape
    ni, y, _ = image.shape
    flat = text.reshape(nt * x, d) @ image.reshape(ni * y, d).T
    return flat.reshape(nt, x, ni, y).transpose(1, 2)


def cross_dots_shared(texts: dict[str, Tensor], image: Tensor | None, layout: Layout) -> dict[str, Tensor]:
    """`cross_dots` of several text tensors [.., X_j, D] with one image tensor in one product, so the
    image units are read once rather than once per text tensor: {name: [pairs.., X_j, Y]}."""
    if not texts or image is None:
        return {}
    if len(texts) == 1:
        return {name: cross_dots(t, image, layout) for name, t in texts.items()}
    both = cross_dots(torch.cat(list(texts.values()), dim=-2), image, layout)
    return dict(zip(texts, both.split([t.shape[-2] for t in texts.values()], dim=-2), strict=True))


def cross_cosine(text: Tensor, image: Tensor, layout: Layout) -> Tensor:
    """Cosines [pairs..] of one text vector [.., D] and one image vector [.., D] per pair."""
    t, i = F.normalize(text, dim=-1)[..., None, :], F.normalize(image, dim=-1)[..., None, :]
    return cross_dots(t, i, layout)[..., 0, 0]


def per_text(x: Tensor, layout: Layout) -> Tensor:
    """A text-only tensor made to broadcast against the layout's pairs."""
    return x if layout in ("pairs", "texts_per_image") else x.unsqueeze(1)


def per_image(x: Tensor, layout: Layout) -> Tensor:
    """An image-only tensor made to broadcast against the layout's pairs."""
    if layout == "all":
        return x.unsqueeze(0)
    return x.unsqueeze(1) if layout == "texts_per_image" else x


def quadratic_form(weights: Tensor, gram: Tensor, side: str, layout: Layout) -> Tensor:
    """w G wᵀ [pairs.., A] for weights [pairs.., A, N] over N vectors of one side ("text" or "image")
    whose Gram matrix is `gram` [items.., N, N] (that side's own layout, not broadcast): the squared
    norm of each weighted sum Σ_n w_n v_n. The Gram matrix is never copied per pair."""
    own = "images_per_text" if side == "image" else "texts_per_image"
    if layout in ("pairs", own) or (layout == "all" and side == "image"):
        wg = weights @ (gram.unsqueeze(0) if layout == "all" else gram)
    else:  # the side's items lead the pair dims: one batched GEMM per item
        wg = (weights.reshape(weights.shape[0], -1, weights.shape[-1]) @ gram).view(weights.shape)
    return (wg * weights).sum(-1)


def attended_cosine(
    weights: Tensor, dots: Tensor, gram: Tensor, side: str, layout: Layout, dim: int = -1
) -> Tensor:
    """cos(u, Σ_n w_n v_n) of a unit vector u and an attention-weighted sum of one side's vectors v_n,
    from the weights, the dots u·v_n (both [.., A, N] with dim=-1, or [.., N, A] with dim=-2) and the
    v's Gram matrix (see `quadratic_form`): the attended vectors are never formed. Divide by |u| when u
    is not of unit length."""
    num = (weights * dots).sum(dim)
    sq_norm = quadratic_form(weights if dim == -1 else weights.transpose(-1, -2), gram, side, layout)
    return num / sq_norm.clamp(min=EPS**2).sqrt()  # clamped before the root: no infinite gradient at 0


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the last dim of the entries where mask is True; zero where none is."""
    m = mask.to(x.dtype)
    return (x * m).sum(-1) / m.sum(-1).clamp(min=1)


def as_float(feats: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stored features (float16 from `ped embed`) as float32 for scoring; masks and codes as they are."""
    return {k: v.float() if v.is_floating_point() else v for k, v in feats.items()}


def trim_units(
    feats: dict[str, Tensor], used: Tensor, keys: tuple[str, ...], square: tuple[str, ...] = ()
) -> dict[str, Tensor]:
    """Drop the unit columns no item uses (padding sized for the longest caption of the whole split):
    `used` [B, M] marks valid units; `keys` hold [B, M, ...] tensors, `square` ones [B, M, M]."""
    cols = used.any(0).nonzero()
    return cut_units(feats, int(cols.max()) + 1 if cols.numel() else 1, keys, square)


def cut_units(
    feats: dict[str, Tensor], n: int, keys: tuple[str, ...], square: tuple[str, ...] = ()
) -> dict[str, Tensor]:
    """The first `n` unit slots of every item (views, no copy); keys as in `trim_units`."""
    out = {k: v[:, :n] if k in keys else v for k, v in feats.items()}
    return out | {k: feats[k][:, :n, :n] for k in square if k in feats}


def with_unit_global(feats: dict[str, Tensor]) -> dict[str, Tensor]:
    """`feats` plus "global_unit", the L2-normalised "global" (once per item; idempotent)."""
    if "global_unit" in feats:
        return feats
    return feats | {"global_unit": F.normalize(feats["global"], dim=-1)}


def gather_rows(
    feats: dict[str, Tensor], index: Tensor, out: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Rows [n, K] of every tensor of a feature dict: [n, K, ...] (one copy per shortlisted item). With
    `out`, the copies go into the leading elements of its flat buffers, one per key, which are grown
    (replaced in `out`) when too small: reused from call to call, they cost no page fault per page as
    fresh ones do."""
    flat = index.reshape(-1)
    if out is None:
        return {k: v.index_select(0, flat).unflatten(0, index.shape) for k, v in feats.items()}
    picked = {}
    for k, v in feats.items():
        shape = (len(flat), *v.shape[1:])
        need = math.prod(shape)
        if k not in out or out[k].numel() < need or out[k].dtype != v.dtype:
            out[k] = v.new_empty(need)
        picked[k] = torch.index_select(v, 0, flat, out=out[k][:need].view(shape)).unflatten(0, index.shape)
    return picked
