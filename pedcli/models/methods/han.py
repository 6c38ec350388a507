"""HAN — Hybrid Attention Network for language-based person search.

Paper: Yang Li, Huahu Xu, Junsheng Xiao, "Hybrid Attention Network for Language-Based Person Search",
Sensors 20(18), 5279, 2020.

- Image (sec. 3.1): a CNN; cross-layer cubic attention = spatial attention from the mid-level map
  (eq. 1, conv4 of ResNet-50) times channel attention from the last map (eq. 2, conv5) times the last
  map, plus b × the last map (eq. 3); pooled, then the image FC1.
- Text (sec. 3.2): word vectors, BiLSTM (eqs. 4–6), word self-attention (eqs. 7–9), then the text FC1.
- Cross-modal attention (sec. 3.3, eqs. 10–13): H = (1 + sigmoid(W p)) · p with W shared by both
  modalities, then FC2 (semantic features g) and FC3 (identity classifier), both shared.
- Losses (sec. 3.4): similarity ranking loss on Euclidean distances of g (eq. 15, weighted hinge with
  the intra-image similarity detached: `pedcli/models/losses/similarity_ranking.py`) and identity
  classification of both modalities (eq. 20), joined by eq. 21.
- Schedule (sec. 4.2): stage 1 classification only (γ1 = 0, γ2 = 1; lr 1e-3, SGD momentum 0.5, 80
  epochs), stage 2 both (γ1 = γ2 = 1; lr 2e-4, SGD momentum 0.9, 60 epochs), batch 64, the whole network
  learning in both; the rate ÷10 once "after the loss becomes stabilized".

Similarity: the cross-modal attention gates each modality by its own feature (eqs. 10–11: M depends
on p alone, or q alone); only the weights W are shared. So image and text embeddings are independent
and a score needs no pair-wise computation: it is −D(g_T, g_I), the paper's Euclidean distance (sec.
3.4.1), computed for all pairs at once by `torch.cdist` (a matrix product inside).

Departures from the paper, all of them (each an option where it can be one):
- Input: the cache's images (384×128 by default, the person's aspect ratio) instead of 224×224 squares.
- Backbone: mobilenet_v2 by default, whose ImageNet weights are available offline; the paper's ResNet-50
  is `backbone=resnet50`. The mid-level map is the backbone's stride-16 stage, the last its stride-32.
- Word vectors: learned from random initialisation (`word_vectors=random`, the default) instead of the
  300-d Word2Vec skip-gram vectors pretrained on Google News, which no PyPI package ships. Given that
  file, `word_vectors=PATH word_dim=300` starts from it (`pedcli/text/word_vectors.py`; every pretrained
  start is rescaled to the random one's spread, see `RNNTextEncoder.init_words`); `word_vectors=minilm
  word_dim=384` starts from the offline MiniLM's input token embeddings, which did not beat random on
  the comparison (benchmarks/bench_methods.md).
- Channel attention: a ReLU between its two FC layers (sec. 4.2: "ReLU between full-connection
  layers"; `channel_relu=false` gives eq. 2 as printed, whose two linear layers then collapse to one).
- Metric space: `normalize=true` (default) ranks unit-length g. The paper's raw 2048-d g make the
  Euclidean distances grow with the width and with training (first ranking loss ~500 against a
  classification loss ~10 on photographs), so the ranking loss swamps the rest; on the unit sphere
  D ∈ [0, 2], the margin has a fixed scale and Euclidean ranking equals the engine's cosine shortlist.
  `normalize=false` is the paper's.
- Ranking loss sign: the distance form α + D(pos) − D(neg) of the cited ranking loss (the printed
  eq. 15 has the similarity form's signs); see the loss module.
- Ranking loss weight: w = β − S scales each negative's whole hinge, so a near-duplicate negative
  (S = 1) adds nothing; the printed eq. 15 scales the negative's term inside the hinge, leaving a term
  on the positive pair alone at S = 1. `srank_form=printed` is the printed placement, on cosine
  similarities (the form its signs ask for).
- Values the paper does not give: b = 1 (the identity mapping of eqs. 12–13); margin α = 0.2 (validation
  over seeds 0–2 could not choose among 0.2, 0.3, 0.5 and 0.8: see benchmarks/bench_methods.md); eq. 8's
  word score uses a learned context vector (the hierarchical attention networks it cites); the decay
  epochs (`stage1_decay_epoch` 60, `stage2_decay_epoch` 40).
- Not in the paper, off by default: `stage1_freeze_trunk` / `stage2_freeze_trunk` (train on cached
  backbone maps: fast on a CPU), `stage2_frozen_epochs` (that many joint epochs on the frozen CNN before
  stage 2 fine-tunes it: `frozen_lead` in `base.py`), `optimizer=adam` (Adam where the CNN learns too),
  `rank_directions=both`.
- Stages on a frozen CNN (the three options above) train with Adam at `frozen_lr` 5e-4
  (`frozen_optimizer=adam`), as every other method's frozen-CNN stage does, not with the paper's SGD:
  the paper's rates with momentum are sized for 80 + 60 epochs of 68k captions and barely move heads in
  the few epochs a frozen-CNN schedule gets (the method comparison's 4 + 4 on one machine: test R@1
  2.8 ± 0.4 against 11.4 ± 1.7 with Adam, classification loss 10.36 → 10.27 against 10.46 → 7.79;
  He-normal FC layers did not rescue SGD there: benchmarks/bench_methods.md). 5e-4 was chosen on
  validation over 1e-3 and 2.5e-4.
  `frozen_optimizer=sgd frozen_lr=1e-3` is the paper's optimiser and stage-1 rate in those stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pedcli.errors import PedError
from pedcli.models.attention import ChannelAttention, masked_pool, masked_softmax
from pedcli.models.backbones import BACKBONES, build_backbone
from pedcli.models.explanation import Explanation, as_array
from pedcli.models.losses import SharedClassifier, identity_loss, similarity_ranking_loss
from pedcli.models.losses.similarity_ranking import DIRECTIONS, FORMS
from pedcli.models.methods.base import (
    OPTIMIZERS,
    Batch,
    DataInfo,
    Features,
    Method,
    Stage,
    frozen_lead,
    register_method,
)
from pedcli.models.text_encoders import RNNTextEncoder
from pedcli.text.word_vectors import RANDOM, load_word_vectors

RANKINGS = ("similarity", "plain", "none")  # eq. 15, eq. 14, no ranking loss (Table 5)
SPATIAL_SOURCES = ("mid", "last")


@dataclass
class HANConfig:
    """Every option of the model; the ablation tables map onto these fields (see each comment)."""

    backbone: str = "mobilenet_v2"  # the paper: resnet50 (needs torchvision's ImageNet file offline)
    pretrained: str = "imagenet"  # "none" trains the backbone from scratch
    spatial_attention: bool = True  # SA (Table 2)
    channel_attention: bool = True  # CA (Table 2)
    spatial_source: str = "mid"  # "mid": cubic attention (SA from conv4); "last": SA + CA on conv5 (Table 2)
    residual_weight: float = 1.0  # b of eq. 3
    channel_reduction: int = 16  # FC1 of eq. 2 has channels / reduction units
    channel_relu: bool = True  # ReLU between eq. 2's two FC layers (sec. 4.2); False: eq. 2 as printed
    word_dim: int = 300  # word vectors (sec. 4.2); the pretrained vectors' width when they are used
    word_vectors: str = "random"  # "minilm" | a word2vec file (sec. 4.2: Google News skip-gram) | "random"
    hidden: int = 1024  # LSTM units per direction (sec. 4.2)
    bidirectional: bool = True  # False: forward LSTM only (Table 3)
    self_attention: bool = True  # eqs. 7–9; False: mean of the word states (Table 3)
    attention_dim: int = 1024  # width of u_t in eq. 7 (sec. 4.2)
    embed_dim: int = 2048  # FC1 output, FC2 input and output (sec. 3.3)
    cross_modal_attention: bool = True  # False: a shared FC of the same width instead (Table 4)
    ranking: str = "similarity"  # "similarity" (eq. 15) | "plain" (eq. 14) | "none" (Table 5)
    classification: bool = True  # eq. 20 in stage 2 (Table 5); stage 1 needs it
    margin: float = 0.2  # α of eqs. 14–15 (not given in the paper)
    normalize: bool = True  # L2-normalise g before distances (not in the paper; bounds D to [0, 2])
    beta: float = 1.0  # β of eq. 15
    srank_form: str = "hinge"  # "hinge": w scales each distance hinge; "printed": eq. 15's placement
    rank_directions: str = "t2i"  # "t2i": eq. 15's second sum only, as the paper trains; "both"
    gamma_rank: float = 1.0  # γ1 of eq. 21 in stage 2
    gamma_cls: float = 1.0  # γ2 of eq. 21
    optimizer: str = "sgd"  # where the CNN learns: "sgd" with momentum (sec. 4.2) | "adam" (not in the paper)
    frozen_optimizer: str = "adam"  # stages on a frozen CNN (not in the paper): "adam" | "sgd" (the paper's)
    frozen_lr: float = 5e-4  # their rate (not in the paper; chosen on validation, bench_methods.md)
    stage1_epochs: int = 80
    stage1_lr: float = 1e-3
    stage1_decay_epoch: int = 60  # lr ÷ 10 "after the loss becomes stabilized" (epoch not given)
    stage1_freeze_trunk: bool = False  # True: stage 1 trains on cached backbone maps (not in the paper)
    stage2_epochs: int = 60
    stage2_lr: float = 2e-4
    stage2_decay_epoch: int = 40  # likewise for stage 2
    stage2_freeze_trunk: bool = False  # likewise for stage 2 (not in the paper)
    stage2_frozen_epochs: int = 0  # stage-2 epochs on the frozen CNN before it learns (not in the paper)

    def __post_init__(self) -> None:
        choices = {
            "backbone": BACKBONES,
            "spatial_source": SPATIAL_SOURCES,
            "ranking": RANKINGS,
            "rank_directions": DIRECTIONS,
            "srank_form": FORMS,
            "optimizer": OPTIMIZERS,
            "frozen_optimizer": OPTIMIZERS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise PedError(
                    f"unknown HAN {name} '{getattr(self, name)}'", f"choose one of: {', '.join(allowed)}"
                )
        if self.ranking == "none" and not self.classification:
            raise PedError("HAN needs at least one loss", "keep ranking or classification on")


class SpatialAttention(nn.Module):
    """Eq. 1: Ms(F) = AvgPool(sigmoid(f3×3([AvgPool_c(F); MaxPool_c(F)]))), pooled to the size of the map
    it weights (the paper halves conv4's height and width to conv5's)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=3, padding=1)

    def forward(self, f: Tensor, size: tuple[int, int]) -> Tensor:
        """f [B, C, h, w] → attention [B, 1, *size] in (0, 1)."""
        pooled = torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], dim=1)
        return F.adaptive_avg_pool2d(torch.sigmoid(self.conv(pooled)), size)


class WordAttention(nn.Module):
    """Eqs. 7–9: u_t = tanh(W_w h_t + b_w), α_t = softmax_t(u_wᵀ u_t), s = Σ_t α_t h_t.

    Eq. 8 needs one score per word; as in the hierarchical attention networks the paper cites, a learned
    context vector u_w turns u_t into that score."""

    def __init__(self, dim: int, attention_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, attention_dim)
        self.context = nn.Linear(attention_dim, 1, bias=False)

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """h [B, T, D], mask [B, T] → (s [B, D], α [B, T])."""
        u = torch.tanh(self.proj(h))  # eq. 7
        alpha = masked_softmax(self.context(u).squeeze(-1), mask)  # eq. 8
        return (alpha.unsqueeze(-1) * h).sum(1), alpha  # eq. 9


class CrossModalAttention(nn.Module):
    """Eqs. 10–13: M = sigmoid(W x), H = (1 + M) · x, one W for both modalities."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return (1.0 + torch.sigmoid(self.fc(x))) * x


@register_method("han")
class HAN(Method):
    """Cubic-attention image features and self-attended text features, matched by Euclidean distance."""

    Config = HANConfig

    def __init__(self, cfg: HANConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        d = cfg.embed_dim
        self.backbone = build_backbone(cfg.backbone, cfg.pretrained)
        trunk_dim = self.backbone.channels[-1]
        if cfg.spatial_attention:
            self.spatial_attention = SpatialAttention()
        if cfg.channel_attention:
            self.channel_attention = ChannelAttention(trunk_dim, cfg.channel_reduction)
            if not cfg.channel_relu:  # W2(W1 x) exactly as eq. 2 prints it
                self.channel_attention.mlp[1] = nn.Identity()
        self.image_fc1 = nn.Linear(trunk_dim, d)
        self.text_encoder = RNNTextEncoder(info.vocab_size, cfg.word_dim, hidden=cfg.hidden, cell="lstm")
        text_dim = self.text_encoder.out_dim // (1 if cfg.bidirectional else 2)
        if cfg.self_attention:
            self.word_attention = WordAttention(text_dim, cfg.attention_dim)
        self.text_fc1 = nn.Linear(text_dim, d)  # FC1 is per modality (sec. 3.3)
        self.cross_modal = CrossModalAttention(d) if cfg.cross_modal_attention else nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)  # shared
        self.classifier = SharedClassifier(d, info.num_classes, bias=True)  # FC3, shared

    def init_from_vocab(self, words: list[str]) -> None:
        """Sec. 4.2: the word embedding starts from pretrained vectors (`word_vectors`)."""
        if self.cfg.word_vectors == RANDOM:
            return
        vectors, found = load_word_vectors(self.cfg.word_vectors, words)
        self.text_encoder.init_words(torch.from_numpy(vectors), torch.from_numpy(found))

    @classmethod
    def upgrade_config(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """Runs saved before frozen-CNN stages had their own recipe ran them with `optimizer`, the joint
        lead at `stage2_frozen_lr` (and a frozen stage 1 at `stage1_lr`: the same 1e-3 unless set)."""
        if "stage2_frozen_lr" not in saved:
            return saved
        rest = {k: v for k, v in saved.items() if k != "stage2_frozen_lr"}
        return rest | {
            "frozen_optimizer": saved.get("optimizer", "sgd"),
            "frozen_lr": saved["stage2_frozen_lr"],
        }

    # ---- schedule ---------------------------------------------------------------------------------
    def default_stages(self) -> list[Stage]:
        """Sec. 4.2: classification first, then the joint loss, the whole network learning in both unless
        `stage1_freeze_trunk` / `stage2_freeze_trunk` keep the backbone fixed (its maps are then cached).
        SGD with momentum 0.5 (stage 1) and 0.9 (stage 2), batch 64, the rate ÷10 at `stageN_decay_epoch`;
        a stage on a frozen CNN trains with `frozen_optimizer` at `frozen_lr` (not in the paper)."""
        cfg = self.cfg

        def stage(name: str, epochs: int, lr: float, losses: tuple[str, ...], frozen: bool, momentum: float,
                  decay: int) -> Stage:  # fmt: skip
            optimizer, lr = (cfg.frozen_optimizer, cfg.frozen_lr) if frozen else (cfg.optimizer, lr)
            return Stage(name, epochs, lr, losses, freeze_trunk=frozen, batch_size=64, optimizer=optimizer,
                         momentum=momentum, scheduler="step", milestones=(decay,))  # fmt: skip

        joint = tuple(
            name for name, on in (("rank", cfg.ranking != "none"), ("cls", cfg.classification)) if on
        )
        stage2 = stage("joint", cfg.stage2_epochs, cfg.stage2_lr, joint, cfg.stage2_freeze_trunk, 0.9,
                       cfg.stage2_decay_epoch)  # fmt: skip
        joint_stages = frozen_lead(stage2, cfg.stage2_frozen_epochs, cfg.frozen_lr, cfg.frozen_optimizer)
        if not cfg.classification:  # Table 5 "ranking only": there is nothing to pre-train with
            return joint_stages
        stage1 = stage("classification", cfg.stage1_epochs, cfg.stage1_lr, ("cls",), cfg.stage1_freeze_trunk,
                       0.5, cfg.stage1_decay_epoch)  # fmt: skip
        return [stage1, *joint_stages]

    # ---- image path -------------------------------------------------------------------------------
    def image_trunk(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(mid-level map, last map): stride-16 and stride-32 stages (conv4 and conv5 of ResNet-50)."""
        maps = self.backbone(batch["image"])
        return maps[2], maps[3]

    def cubic_attention(self, mid: Tensor, last: Tensor) -> tuple[Tensor, Tensor | None]:
        """Eq. 3: F_att = A_c ⊗ F ⊗ A_s + b·F on the last map F; returns (F_att, A_s [B, h, w] or None).
        With neither attention (Table 2's plain backbone row) F_att = F."""
        cfg = self.cfg
        if not (cfg.spatial_attention or cfg.channel_attention):
            return last, None
        att = last
        spatial = None
        if cfg.channel_attention:  # eq. 2, from the last map
            att = att * self.channel_attention(last.flatten(2).transpose(1, 2))[:, :, None, None]
        if cfg.spatial_attention:  # eq. 1, from the mid-level map (cubic) or the last map
            source = mid if cfg.spatial_source == "mid" else last
            spatial = self.spatial_attention(source, tuple(last.shape[-2:]))
            att = att * spatial
            spatial = spatial[:, 0]
        return att + cfg.residual_weight * last, spatial

    def image_semantic(self, trunk: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The image's g (FC2 output, [B, d]) and spatial attention."""
        att, spatial = self.cubic_attention(*trunk)
        p = F.relu(self.image_fc1(att.mean(dim=(2, 3))))
        return self.fc2(self.cross_modal(p)), spatial

    # ---- text path --------------------------------------------------------------------------------
    def text_semantic(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """The caption's g (FC2 output, [B, d]) and word attention α ([B, T], None without it)."""
        h, _, mask = self.text_encoder(batch["tokens"], batch["lengths"])  # eqs. 4–6
        if not self.cfg.bidirectional:
            h = h[..., : h.shape[-1] // 2]  # the forward LSTM's states (Table 3 "LSTM")
        if self.cfg.self_attention:
            s, alpha = self.word_attention(h, mask)
        else:
            s, alpha = masked_pool(h, mask, "avg"), None
        q = F.relu(self.text_fc1(s))
        return self.fc2(self.cross_modal(q)), alpha

    # ---- embeddings -------------------------------------------------------------------------------
    def metric_space(self, g: Tensor) -> Tensor:
        """The features whose Euclidean distance ranks: g itself (the paper), or g on the unit sphere."""
        return F.normalize(g, dim=1) if self.cfg.normalize else g

    def encode_images(self, batch: Batch) -> Features:
        g, spatial = self.image_semantic(self.trunk_output(batch))
        feats = {"global": self.metric_space(g)}
        return feats if spatial is None else feats | {"spatial_attention": spatial}

    def encode_texts(self, batch: Batch) -> Features:
        return {"global": self.metric_space(self.text_semantic(batch)[0])}

    def similarity(self, text_feats: Features, image_feats: Features) -> Tensor:
        """−D(g_T, g_I) for every pair (sec. 3.4.1's Euclidean distance; higher is more similar)."""
        return -torch.cdist(text_feats["global"].float(), image_feats["global"].float())

    def pair_similarity(self, text_feats: Features, image_feats: Features) -> Tensor:
        return -(text_feats["global"].float() - image_feats["global"].float()).norm(dim=1)

    # ---- training ---------------------------------------------------------------------------------
    def losses(self, batch: Batch, stage: Stage) -> dict[str, Tensor]:
        """Eq. 21: γ1·L_srank (eq. 15, or eq. 14) + γ2·L_cls (eq. 20); a stage names the terms it uses."""
        cfg = self.cfg
        gi, _ = self.image_semantic(self.trunk_output(batch))
        gt, _ = self.text_semantic(batch)
        out = {}
        if "cls" in stage.losses:  # eqs. 16–20: FC3 (shared) on both modalities
            labels = batch["label"]
            cls = identity_loss(self.classifier(F.relu(gi)), labels) + identity_loss(
                self.classifier(F.relu(gt)), labels
            )
            out["cls"] = cfg.gamma_cls * cls
        if "rank" in stage.losses:
            rank = similarity_ranking_loss(
                self.metric_space(gi),
                self.metric_space(gt),
                batch["pid"],
                cfg.margin,
                cfg.beta,
                intra_similarity=cfg.ranking == "similarity",
                directions=cfg.rank_directions,
                form=cfg.srank_form,
            )
            out["rank"] = cfg.gamma_rank * rank
        return out

    # ---- explanation ------------------------------------------------------------------------------
    def explain(self, text_feats: Features, image_feats: Features) -> Explanation | None:
        """The spatial attention A_s of each image (eq. 1): where the image path looked. It does not
        depend on the caption — HAN's attention is within each modality."""
        if "spatial_attention" not in image_feats:
            return None
        a = image_feats["spatial_attention"]  # [ni, (1,) h, w]
        return Explanation("spatial attention", grid=as_array(a.reshape(a.shape[0], *a.shape[-2:])))
