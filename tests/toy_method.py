"""A tiny but legitimate Method for engine tests: global vectors plus padded parts with a mask, and a
similarity that is not a plain matmul (cosine of globals + mean over text parts of the best image part),
so chunking, pair scoring and padding are exercised as a cross-attention method would exercise them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pedcli.models.methods.base import Batch, DataInfo, Features, Method, register_method


@dataclass
class ToyConfig:
    dim: int = 8
    parts: int = 4  # horizontal stripes; must divide the image height


@register_method("toy")  # so a run folder of it loads through `load_run` (test modules import this once)
class ToyMethod(Method):
    """Images: global = pooled pixels projected; parts = horizontal stripes. Texts: bag of word embeddings."""

    Config = ToyConfig

    def __init__(self, cfg: ToyConfig | None = None, info: DataInfo | None = None) -> None:
        cfg = cfg or ToyConfig()
        super().__init__(cfg, info or DataInfo(num_classes=2, vocab_size=32, image_size=(32, 16)))
        g = torch.Generator().manual_seed(0)
        self.pixel_proj = torch.nn.Parameter(torch.randn(3, cfg.dim, generator=g))
        self.words = torch.nn.Parameter(torch.randn(self.info.vocab_size, cfg.dim, generator=g))

    def encode_images(self, batch: Batch) -> Features:
        stripes = batch["image"].unflatten(2, (self.cfg.parts, -1)).mean((3, 4))  # [B, 3, P]
        parts = stripes.transpose(1, 2) @ self.pixel_proj  # [B, P, D]
        return {"global": parts.mean(1), "parts": parts}

    def encode_texts(self, batch: Batch) -> Features:
        tokens = batch["tokens"]
        length = int(batch["lengths"].max())  # pad only to this batch's longest caption
        mask = tokens[:, :length] > 0
        words = self.words[tokens[:, :length]] * mask[..., None]
        return {"global": words.sum(1), "words": words, "words_mask": mask}

    def _part_score(self, words: torch.Tensor, mask: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
        """words [..., L, D], mask [..., L], parts [..., P, D] (broadcast) → mean over words of best part."""
        best = (F.normalize(words, dim=-1) @ F.normalize(parts, dim=-1).transpose(-1, -2)).amax(-1)
        return (best * mask).sum(-1) / mask.sum(-1).clamp_min(1)

    def similarity(self, text_feats: Features, image_feats: Features) -> torch.Tensor:
        cos = F.normalize(text_feats["global"], dim=1) @ F.normalize(image_feats["global"], dim=1).T
        words, mask = text_feats["words"][:, None], text_feats["words_mask"][:, None]
        return cos + self._part_score(words, mask, image_feats["parts"][None])

    def pair_similarity(self, text_feats: Features, image_feats: Features) -> torch.Tensor:
        cos = (F.normalize(text_feats["global"], dim=1) * F.normalize(image_feats["global"], dim=1)).sum(1)
        return cos + self._part_score(text_feats["words"], text_feats["words_mask"], image_feats["parts"])


def random_features(n_text: int, n_image: int, seed: int = 0) -> tuple[Features, Features]:
    """Random toy features in the layout ToyMethod's encoders produce (text lengths vary)."""
    g = torch.Generator().manual_seed(seed)
    d, p, length = ToyConfig.dim, ToyConfig.parts, 5
    words = torch.randn(n_text, length, d, generator=g)
    mask = torch.arange(length)[None] < torch.randint(1, length + 1, (n_text, 1), generator=g)
    text = {"global": (words * mask[..., None]).sum(1), "words": words * mask[..., None], "words_mask": mask}
    parts = torch.randn(n_image, p, d, generator=g)
    return text, {"global": parts.mean(1), "parts": parts}
