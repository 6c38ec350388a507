"""The global baseline of PMA (Jing et al., AAAI 2020), Table 2 "Base(bi-LSTM)" / Table 3 first row.

"The baseline model indicates utilizing the global visual and textual features to compute the
similarity" (PMA §Ablation): no pose, no attention. Image: the backbone's last map, global average
pooled, a linear layer to the joint space. Text: a bidirectional LSTM's sentence vector, a linear layer
to the joint space. Cosine similarity. Losses as PMA's coarse-alignment branch without its attention:
L_ca = L_r + λ1·L_idi + λ2·L_idt (eq. 15, λ1 = λ2 = 1): the triplet ranking loss L_r with the hardest
negative of the batch (Faghri et al. 2018), and the image / text identity losses of eq. 14 with one
classifier W_id shared by both modalities (on the pooled image feature, φ(I)_avg of eq. 14).

Training follows PMA's two steps (§Implementation Details): the pretrained CNN frozen at lr 1e-3, then
everything at lr 2e-4, Adam, margin 0.2. The paper stops "when the loss converges"; the epoch counts
here are options, and the rate follows the engine's default cosine decay (PMA gives no schedule). The
batch is 64 pairs, not PMA's 128: the baseline is the quick reference run on small data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pedcli.models.backbones import BACKBONES, build_backbone
from pedcli.models.losses import SharedClassifier, identity_loss, triplet_hardest
from pedcli.models.methods.base import (
    Batch,
    DataInfo,
    Features,
    Method,
    Stage,
    one_of,
    register_method,
    require,
)
from pedcli.models.text_encoders import RNNTextEncoder


@dataclass
class BaselineConfig:
    """backbone / pretrained: the visual CNN (PMA uses VGG-16 or ResNet-50; MobileNetV2 is the offline one).
    embed_dim: the joint space b (PMA: 1024). hidden: bi-LSTM hidden size per direction (PMA: 1024).
    word_dim: word embedding size. cell: "lstm" (the paper) or "gru".
    bidirectional: False keeps only the forward RNN's final state (PMA Table 2 "Base-LSTM").
    margin: α of the ranking loss. ranking_weight / id_weight: loss weights (0 drops a loss: ablations).
    frozen_epochs / frozen_lr: step 1 (CNN frozen); full_epochs / full_lr: step 2 (everything learns).
    """

    backbone: str = "mobilenet_v2"
    pretrained: str = "imagenet"
    embed_dim: int = 512
    hidden: int = 512
    word_dim: int = 300
    cell: str = "lstm"
    bidirectional: bool = True
    margin: float = 0.2
    ranking_weight: float = 1.0
    id_weight: float = 1.0
    frozen_epochs: int = 10
    frozen_lr: float = 1e-3
    full_epochs: int = 20
    full_lr: float = 2e-4

    def __post_init__(self) -> None:
        require([
            one_of("backbone", self.backbone, BACKBONES),
            one_of("baseline cell", self.cell, ("lstm", "gru")),
            (min(self.embed_dim, self.hidden, self.word_dim) > 0,
             "baseline embed_dim, hidden and word_dim must be positive", "e.g. embed_dim=512"),
            (self.margin >= 0 and self.ranking_weight >= 0 and self.id_weight >= 0,
             "baseline margin and loss weights must not be negative", "0 drops a loss (ablation)"),
            (self.ranking_weight > 0 or self.id_weight > 0,
             "baseline needs a loss: ranking_weight and id_weight are both 0", "keep one of them above 0"),
            (min(self.frozen_epochs, self.full_epochs) >= 0 and self.frozen_epochs + self.full_epochs > 0,
             "baseline epochs must not be negative, and one stage must train", "e.g. full_epochs=20"),
        ])  # fmt: skip


@register_method("baseline")
class Baseline(Method):
    Config = BaselineConfig
    cfg: BaselineConfig

    def __init__(self, cfg: BaselineConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        self.backbone = build_backbone(cfg.backbone, cfg.pretrained)
        self.image_fc = nn.Linear(self.backbone.channels[-1], cfg.embed_dim)
        self.text = RNNTextEncoder(info.vocab_size, cfg.word_dim, cfg.hidden, cfg.cell)
        text_dim = self.text.out_dim if cfg.bidirectional else self.text.out_dim // 2
        self.text_fc = nn.Linear(text_dim, cfg.embed_dim)
        self.classifier = SharedClassifier(cfg.embed_dim, info.num_classes)  # W_id of eq. 14

    def default_stages(self) -> list[Stage]:
        cfg = self.cfg
        losses = tuple(
            name for name, w in (("ranking", cfg.ranking_weight), ("identity", cfg.id_weight)) if w
        )
        return [
            Stage("frozen_cnn", cfg.frozen_epochs, cfg.frozen_lr, losses, freeze_trunk=True),
            Stage("all", cfg.full_epochs, cfg.full_lr, losses),
        ]

    def image_trunk(self, batch: Batch) -> torch.Tensor:
        """CNN + global average pooling (parameter-free, so the frozen-trunk cache stores one vector)."""
        return self.backbone(batch["image"])[-1].mean(dim=(2, 3))

    def encode_images(self, batch: Batch) -> Features:
        return {"global": self.image_fc(self.trunk_output(batch))}

    def encode_texts(self, batch: Batch) -> Features:
        _, sentence, _ = self.text(batch["tokens"], batch["lengths"])
        if not self.cfg.bidirectional:
            sentence = sentence[:, : sentence.shape[1] // 2]  # [forward final; backward final] → forward
        return {"global": self.text_fc(sentence)}

    def similarity(self, text_feats: Features, image_feats: Features) -> torch.Tensor:
        return F.normalize(text_feats["global"], dim=-1) @ F.normalize(image_feats["global"], dim=-1).T

    def pair_similarity(self, text_feats: Features, image_feats: Features) -> torch.Tensor:
        t, i = (F.normalize(f["global"], dim=-1) for f in (text_feats, image_feats))
        return (t * i).sum(-1)

    def losses(self, batch: Batch, stage: Stage) -> dict[str, torch.Tensor]:
        image = self.encode_images(batch)
        text = self.encode_texts(batch)
        out: dict[str, torch.Tensor] = {}
        if "ranking" in stage.losses:
            sim = self.similarity(text, image)
            out["ranking"] = self.cfg.ranking_weight * triplet_hardest(sim, batch["pid"], self.cfg.margin)
        if "identity" in stage.losses:
            labels = batch["label"]
            out["identity"] = self.cfg.id_weight * (  # eq. 14: L_idi + L_idt
                identity_loss(self.classifier(image["global"]), labels)
                + identity_loss(self.classifier(text["global"]), labels)
            )
        return out
