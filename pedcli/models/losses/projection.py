"""Cross-modal projection losses (Zhang & Lu, "Deep Cross-Modal Projection Learning for Image-Text
Matching", ECCV 2018), used by NAFS eq. 7 on the global features.

Both losses project one modality onto the *normalised* other one, so a feature's scalar projection
(not a cosine) carries the match: it pushes matched features together and grows their norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pedcli.models.losses.identity import identity_loss


def _matching_kl(x: Tensor, z: Tensor, q: Tensor, eps: float) -> Tensor:
    """mean_i KL(p_i || q_i) with p_i = softmax_j(x_i · z_j/|z_j|) (Zhang & Lu eqs. 1 and 3–4)."""
    logits = x @ F.normalize(z, dim=1).t()
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - torch.log(q + eps))).sum(dim=1).mean()


def cmpm_loss(image: Tensor, text: Tensor, pids: Tensor, eps: float = 1e-8) -> Tensor:
    """Cross-Modal Projection Matching: KL from the projection-softmax distribution to the true
    matching distribution q_ij = y_ij / Σ_k y_ik (eq. 2), image→text plus text→image (eq. 5)."""
    same = (pids[:, None] == pids[None, :]).to(image.dtype)
    q = same / same.sum(dim=1, keepdim=True)
    return _matching_kl(image, text, q, eps) + _matching_kl(text, image, q, eps)


def cmpc_loss(image: Tensor, text: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
    """Cross-Modal Projection Classification (eqs. 6–8): each feature projected onto its paired,
    normalised other-modality feature is classified by a bias-free softmax whose class weights
    `weight` [C, D] are L2-normalised; labels of -100 are ignored."""
    image_dir = F.normalize(image, dim=1)
    text_dir = F.normalize(text, dim=1)
    image_on_text = (image * text_dir).sum(dim=1, keepdim=True) * text_dir  # x̂_i (eq. 6)
    text_on_image = (text * image_dir).sum(dim=1, keepdim=True) * image_dir  # ẑ_i
    w = F.normalize(weight, dim=1)
    return identity_loss(image_on_text @ w.t(), labels) + identity_loss(text_on_image @ w.t(), labels)
