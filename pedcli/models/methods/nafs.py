"""NAFS — Non-local Alignment over Full-Scale representations.

Chenyang Gao, Guanyu Cai, Xinyang Jiang, Feng Zheng, Jun Zhang, Yifei Gong, Pai Peng, Xiaowei Guo and
Xing Sun, "Contextual Non-Local Alignment over Full-Scale Representation for Text-Based Person Search",
arXiv:2101.03036, 2021; the authors' released code (TencentYoutuResearch/PersonReID-NAFS) where the
paper and the release differ and an option says so.

- Image (§3.1): a staircase backbone. The global branch is the backbone itself, its last stage at
  stride 1 (§4.1); the region branch takes the stage-2 map through "two consecutive res-blocks" and
  cuts the result into n1 = 2 stripes; the patch branch takes the stage-3 map through "one res-block"
  into n2 = 3 stripes. With a four-stage backbone the res-blocks are deep copies of the backbone's own
  later stages (region: stages 3 and 4, patch: stage 4), so the branches start from the pretrained
  weights and the design carries over to any backbone (ResNet-50 as the paper, MobileNetV2 offline).
  Split & shuffle (training only): the stage-2 / stage-3 maps are cut into n1 / n2 horizontal stripes,
  shuffled per image and re-concatenated before entering their branch.
- Text (§3.2): a BERT with locality-constrained attention (eq. 1). A [CLS] is attached to the
  beginning of every comma-separated sub-sentence (inserted into the word-piece sequence right before
  the sub-sentence, so its position is the one just before the span); its attention sees only itself
  and the tokens of its span. Only those [CLS] queries are constrained, as eq. 1 says: the other tokens
  attend over the sentence (never to the sub-sentence [CLS] tokens, which stay pure readers), so in a
  deeper BERT a span token's keys/values carry sentence context, exactly as eq. 1's k_i, v_i do.
  Scales: the sentence [CLS], the sub-sentence [CLS]s, the word pieces.
- Contextual non-local attention (§3.3): visual queries / values and textual keys / values are linear
  maps of the all-scale features. Image→text (eqs. 2–5): s = [cos(i_q, t_k)]_+, normalised over the
  visual units, the focal trick s̃_ab = [Σ_c (ŝ_ab − ŝ_ac)]_+ ŝ_ab, α = softmax_b(λ1 s̃), R = cos(i_v,
  Σ_b α t_v), S = mean over the visual units. Text→image mirrors it (λ2). "Separate alignment"
  (Table 3) restricts the attention to the paired scales (global↔sentence, regions↔sub-sentences,
  patches↔words).
- Losses (eq. 7): λ2·CMPM + λ3·CMPC on the global-branch / sentence features and λ4·CSAL on the
  attention scores, with λ2, λ3, λ4 = 1, 1, 0.1 (§4.1). Re-ranking by visual neighbours (eq. 8) is
  post-processing in `pedcli.engine.retrieval.rerank.rvn`; `default_rerank` tells `ped eval` to apply it.
- Table 4 row 1 ("baseline"): `text_encoder=bilstm` (a word embedding and a bi-LSTM on the word
  tokens: its sentence vector, and its word states as the word scale), with `staircase=false`,
  `nonlocal_attention=false`, `image_scales=[global]`, `text_scales=[sentence]`.

Departures from the paper, and choices it leaves open (all of them, here):

- Attention normalisation (`attention_norm`, default "official"): eqs. 2–3 taken literally ([cos]_+
  divided by its sum over the other side's units, λ = 20) make image→text attention one-hot and
  text→image attention uniform with 6 visual and ~60 textual units, so S' would involve no attention.
  The default follows the release: LeakyReLU(cos, 0.1), divided by its L2 norm over those units, then
  softmax(λ·). Measured on random unit features (6 × 60 units, D = 768): mean attention entropy
  image→text 0.20 nats and text→image 1.78 (of log 6 = 1.79) for the paper's form with the focal
  trick; 1.38 and 0.75 for the release's (tests/test_nafs.py). Trained on the synthetic benchmark
  (tests/test_learning.py's NAFS case, seeds 0 and 1), test R@1 was 26.7 / 27.6 with the release's
  attention and score, 12.9 / 19.0 with the paper's attention and the mean score.
- The focal trick (`focal`) is off by default, as in the release's training scripts; the paper's form
  is `attention_norm=paper focal=true`.
- Test score (`test_score`, default "official"): the release ranks by the global branch's cosine plus S
  (image→text); eq. 5 alone ("paper") drops the global features CMPM and CMPC train; "mean" is
  (S + S') / 2.
- Backbone: MobileNetV2 (ImageNet weights ship offline) instead of ResNet-50; the staircase branches
  are copies of its later stages (see above). The default BERT is the cache's tokenizer's model
  (a MiniLM unless the cache was built with another).
- Not given, chosen here: the projections into D (one linear map per image scale, one for all text
  states), λ1 = λ2 = 20 (BFAN's default), CSAL's probabilities (a softmax of S/τ over the batch, as
  CMPM's), the epochs, the bi-LSTM's widths, and the "concatenation" rows of Table 4 (the scales'
  features concatenated, one linear map).
- RVN (eq. 8): l = 10 (`rvn_neighbours`; the paper gives none, the release uses 5), both neighbour
  lists from the global features as §3.4 says (the release takes the caption's from its full score).
  On the method comparison RVN lowered test R@1 on all three seeds (15.4 ± 0.7 → 13.4 ± 0.7), and no l
  in 1–20, with either neighbour source, raised it by more than 0.6 on seeds 1 and 2
  (benchmarks/bench_methods.md).
- Table 2's "Global" row trains with CMPM and CMPC alone; asking for non-local attention over global
  features only is refused rather than silently changed.
- Not in the paper, off by default: `frozen_epochs`, a warm-up with the CNN frozen (on cached maps)
  before the joint stage. The text extractor learns in it at its §4.1 rate (`warmup_text`; false fixes
  it too, about 3× faster on a CPU). On the method comparison (seed 0, 8 warm-up epochs, RVN on) test
  R@1 was 7.9 with BERT fixed and 12.9 with it learning.

Scoring all pairs needs two [units × units] dot-product matrices per pair (queries·keys and
values·values); the attended vectors are never formed: their norms come from Gram matrices
(`pedcli.models.attention`, chunking in `pedcli.models.methods.pairwise`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pedcli.errors import PedError
from pedcli.models import attention as att
from pedcli.models.backbones import BACKBONES, build_backbone, stripe_pool
from pedcli.models.explanation import Explanation, as_array
from pedcli.models.losses import cmpc_loss, cmpm_loss
from pedcli.models.methods.base import (
    Batch,
    DataInfo,
    Features,
    Stage,
    index_features,
    one_of,
    register_method,
    require,
)
from pedcli.models.methods.pairwise import PairwiseMethod
from pedcli.models.text_encoders import BertEncoder, RNNTextEncoder
from pedcli.text.bert import resolve_bert_model

IMAGE_SCALES = ("global", "region", "patch")
TEXT_SCALES = ("sentence", "subsentence", "word")  # paired with IMAGE_SCALES by position (Table 3)
ALIGNMENTS = ("joint", "separate")
TEST_SCORES = ("paper", "official", "mean")
ATTENTION_NORMS = ("paper", "official")
TEXT_ENCODERS = ("bert", "bilstm")


@dataclass
class NAFSConfig:
    """Every option; the paper's ablation tables map onto these fields (see each comment)."""

    backbone: str = "mobilenet_v2"  # the paper: resnet50; mobilenet_v2 has offline ImageNet weights
    pretrained: str = "imagenet"  # "none" trains the CNN from scratch
    bert_model: str | None = None  # BERT folder; None = the one the cache was tokenised with
    bert_random_init: bool = False  # tests: the same architecture with random weights
    bert_layers: int | None = None  # tests: fewer layers
    bert_hidden: int | None = None  # tests: a narrower BERT
    bert_trainable: bool = True
    text_encoder: str = "bert"  # Table 4 row 1 ("baseline"): "bilstm", a word embedding and a bi-LSTM
    word_dim: int = 300  # bilstm only: word embedding width
    lstm_hidden: int = 512  # bilstm only: hidden size per direction
    embed_dim: int = 768  # D of every scale's features (§4.1)
    region_stripes: int = 2  # n1
    patch_stripes: int = 3  # n2
    image_scales: tuple[str, ...] = IMAGE_SCALES  # Table 2: ("global",), ("global", "patch"), all
    text_scales: tuple[str, ...] = TEXT_SCALES  # Table 2: ("sentence",), ("sentence", "word"), all
    alignment: str = "joint"  # Table 3: "joint" or "separate" (scale pairs only)
    staircase: bool = True  # Table 4; False: region/patch stripes pooled from the global branch's map
    split_shuffle: bool = True  # Table 4 (needs the staircase)
    locality: bool = True  # eq. 1; False: a sub-sentence [CLS] attends over the whole sentence
    nonlocal_attention: bool = True  # Table 4; False: scales concatenated into one vector, cosine
    attention_norm: str = "official"  # ŝ of eqs. 2–3: "paper" (sum) or "official" (the release's L2)
    focal: bool = False  # the focal trick of eqs. 2–3 (the paper; off in the release's scripts)
    lambda_softmax: float = 20.0  # λ1 = λ2, inverse temperature of eq. 3 (not given; BFAN's 20)
    # "paper": eq. 5's S; "official" (the release): global cosine + S; "mean": (S + S') / 2
    test_score: str = "official"
    csal_temperature: float = 0.1  # CSAL: p = softmax(S / τ) over the batch (S is a cosine mean)
    cmpm_weight: float = 1.0  # λ2 of eq. 7
    cmpc_weight: float = 1.0  # λ3 of eq. 7
    csal_weight: float = 0.1  # λ4 of eq. 7
    rvn: bool = True  # Table 4 "RVN": `ped eval` re-ranks by visual neighbours (eq. 8)
    rvn_neighbours: int = 10  # l of eq. 8 (not given; the release: 5)
    rvn_weight: float = 0.5  # the average of the score and the Jaccard similarity
    epochs: int = 40  # not given in the paper
    lr: float = 1.1e-3  # §4.1: 0.0011 for the heads ...
    extractor_lr_mult: float = 0.1  # ... and 0.00011 for the visual and textual extraction branches
    frozen_epochs: int = 0  # a warm-up with the CNN frozen (not in the paper; CPU budgets)
    warmup_text: bool = True  # the warm-up trains the text extractor at its rate, as §4.1 (False: fixed)

    def __post_init__(self) -> None:
        self.image_scales = tuple(self.image_scales)  # a JSON config gives lists
        self.text_scales = tuple(self.text_scales)
        pairs = zip(IMAGE_SCALES, TEXT_SCALES, strict=True)
        paired = [(i in self.image_scales) == (t in self.text_scales) for i, t in pairs]
        checks = [
            one_of("backbone", self.backbone, BACKBONES),
            (bool(self.image_scales) and set(self.image_scales) <= set(IMAGE_SCALES)
             and "global" in self.image_scales,
             f"NAFS image_scales must include 'global' and come from {IMAGE_SCALES}, got {self.image_scales}",
             "Table 2 uses [global], [global, patch] or all three"),
            (bool(self.text_scales) and set(self.text_scales) <= set(TEXT_SCALES)
             and "sentence" in self.text_scales,
             f"NAFS text_scales must include 'sentence' and come from {TEXT_SCALES}, got {self.text_scales}",
             "Table 2 uses [sentence], [sentence, word] or all three"),
            one_of("NAFS alignment", self.alignment, ALIGNMENTS),
            (self.alignment == "joint" or all(paired),
             "NAFS separate alignment pairs global↔sentence, region↔sub-sentence, patch↔word: "
             f"image_scales {self.image_scales} and text_scales {self.text_scales} do not pair up",
             "enable both scales of each pair, or use alignment=joint"),
            (self.staircase or not self.split_shuffle,
             "NAFS split_shuffle shuffles the stripes entering the staircase branches",
             "set split_shuffle=false when staircase=false"),
            one_of("NAFS test_score", self.test_score, TEST_SCORES),
            one_of("NAFS text_encoder", self.text_encoder, TEXT_ENCODERS),
            (self.text_encoder == "bert" or "subsentence" not in self.text_scales,
             "NAFS sub-sentence features come from the locality-constrained BERT's [CLS] tokens",
             "with text_encoder=bilstm use text_scales=[sentence] or [sentence, word]"),
            (not (self.nonlocal_attention and self.image_scales == ("global",)
                  and self.text_scales == ("sentence",)),
             "NAFS with only global features has nothing for the non-local attention to align (Table 2 "
             "\"Global\" trains with CMPM and CMPC alone)",
             "add nonlocal_attention=false, or more image_scales / text_scales"),
            one_of("NAFS attention_norm", self.attention_norm, ATTENTION_NORMS),
            (min(self.embed_dim, self.region_stripes, self.patch_stripes, self.rvn_neighbours) > 0
             and self.lambda_softmax > 0 and self.csal_temperature > 0,
             "NAFS embed_dim, stripes, rvn_neighbours, lambda_softmax and csal_temperature must be positive",
             "e.g. embed_dim=768, region_stripes=2, patch_stripes=3"),
        ]  # fmt: skip
        require(checks)


# ---- image: the staircase backbone (§3.1) ---------------------------------------------------------
def split_shuffle(x: Tensor, n: int) -> Tensor:
    """§3.1 split & shuffle: cut the map [B, C, H, W] into n horizontal stripes (heights differ by at
    most one row when n does not divide H), shuffle them independently per image, re-concatenate."""
    b, _, h, _ = x.shape
    rows = torch.arange(h, device=x.device).tensor_split(n)
    order = torch.rand(b, n, device=x.device).argsort(1).tolist()
    index = torch.stack([torch.cat([rows[j] for j in perm]) for perm in order])  # [B, H]
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


class Staircase(nn.Module):
    """The global / region / patch branches; returns the pooled units [B, m, C] in the order of
    IMAGE_SCALES (1 global vector, n1 region stripes, n2 patch stripes; disabled scales left out)."""

    def __init__(self, cfg: NAFSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, cfg.pretrained, last_stride=1)
        stages = self.backbone.stages
        self.region_branch: nn.Module | None = None
        self.patch_branch: nn.Module | None = None
        if cfg.staircase and "region" in cfg.image_scales:  # "two consecutive res-blocks"
            self.region_branch = nn.Sequential(copy.deepcopy(stages[2]), copy.deepcopy(stages[3]))
        if cfg.staircase and "patch" in cfg.image_scales:  # "one res-block"
            self.patch_branch = copy.deepcopy(stages[3])
        self.channels = self.backbone.channels[-1]

    def _branch(self, branch: nn.Module | None, entry: Tensor, last: Tensor, n: int) -> Tensor:
        if branch is None:  # no staircase: stripes of the global branch's own last map
            return stripe_pool(last, n)
        if self.cfg.split_shuffle and self.training:
            entry = split_shuffle(entry, n)
        return stripe_pool(branch(entry), n)

    def forward(self, image: Tensor) -> Tensor:
        cfg = self.cfg
        maps = self.backbone(image)  # stages 1–4
        units = [maps[-1].mean(dim=(2, 3))[:, None]]
        if "region" in cfg.image_scales:
            units.append(self._branch(self.region_branch, maps[1], maps[-1], cfg.region_stripes))
        if "patch" in cfg.image_scales:
            units.append(self._branch(self.patch_branch, maps[2], maps[-1], cfg.patch_stripes))
        return torch.cat(units, dim=1)


# ---- text: the locality-constrained BERT (§3.2, eq. 1) ---------------------------------------------
@dataclass
class LocalitySequence:
    """The word pieces with one [CLS] inserted before each sub-sentence, and where everything went."""

    ids: Tensor  # [B, L + S]
    mask: Tensor  # [B, L + S] real tokens
    attention: Tensor  # [B, L + S, L + S] bool: token i may attend to token j
    word_pos: Tensor  # [B, L] new position of each original piece
    cls_pos: Tensor  # [B, S] position of each sub-sentence [CLS] (0 where the span is invalid)
    span_valid: Tensor  # [B, S]


def locality_sequence(
    ids: Tensor, mask: Tensor, spans: Tensor, n_spans: Tensor, local: bool = True
) -> LocalitySequence:
    """Insert a [CLS] (the id at position 0) right before every valid [start, end) span and build the
    attention of eq. 1: a sub-sentence [CLS] sees itself and its span (`local`) or every real piece;
    the other pieces see each other (never the inserted [CLS] tokens). Spans are sorted and disjoint."""
    b, length = ids.shape
    s = spans.shape[1]
    dev = ids.device
    real = mask.bool()
    n_real = real.sum(1, keepdim=True)
    start, end = spans[..., 0].long(), spans[..., 1].long()
    valid = (torch.arange(s, device=dev)[None] < n_spans[:, None]) & (start >= 1) & (end > start)
    valid &= end <= n_real
    is_start = torch.zeros(b, length + 1, dtype=torch.long, device=dev)
    is_start.scatter_add_(1, torch.where(valid, start, length), valid.long())
    word_pos = torch.arange(length, device=dev)[None] + is_start[:, :length].cumsum(1)  # [B, L]
    cls_pos = torch.where(valid, word_pos.gather(1, start.clamp(0, length - 1)) - 1, 0)
    total = length + s
    new_ids = ids.new_zeros(b, total).scatter_(1, word_pos, ids)
    new_ids = torch.where(_onehot(cls_pos, valid, total), ids[:, :1], new_ids)
    new_real = torch.zeros(b, total, dtype=torch.bool, device=dev).scatter_(1, word_pos, real)
    is_cls = _onehot(cls_pos, valid, total)
    attention = new_real[:, :, None] & new_real[:, None, :]  # pieces ↔ pieces
    pos = torch.arange(length, device=dev)
    inside = (pos[None, None] >= start[..., None]) & (pos[None, None] < end[..., None]) & valid[..., None]
    if not local:
        inside = real[:, None, :] & valid[..., None]
    sees = torch.zeros(b, s, total, dtype=torch.bool, device=dev)
    sees.scatter_(2, word_pos[:, None, :].expand(-1, s, -1), inside)  # [B, S, L+S]
    sees |= F.one_hot(cls_pos, total).bool() & valid[..., None]  # and itself
    rows, cols = valid.nonzero(as_tuple=True)
    attention[rows, cls_pos[rows, cols]] = sees[rows, cols]
    return LocalitySequence(new_ids, (new_real | is_cls).long(), attention, word_pos, cls_pos, valid)


def _onehot(pos: Tensor, valid: Tensor, total: int) -> Tensor:
    """Bool [B, total] with True at the valid positions `pos` [B, S]."""
    return (F.one_hot(pos, total).bool() & valid[..., None]).any(1)


# ---- contextual non-local attention (§3.3) -------------------------------------------------------
def focal(s_hat: Tensor, mask: Tensor, dim: int) -> Tensor:
    """The focal trick: s̃_ab = [Σ_c (ŝ_ab − ŝ_ac)]_+ ŝ_ab over the valid c along `dim` — zero for every
    unit whose ŝ is at most the mean of its row, so only the above-average ones keep a weight."""
    count = mask.sum(dim, keepdim=True)
    total = (s_hat * mask).sum(dim, keepdim=True)
    return (count * s_hat - total).clamp(min=0) * s_hat * mask


def attention_logits(cos: Tensor, mask: Tensor, dim: int, norm: str = "official") -> Tensor:
    """ŝ of eqs. 2–3: the similarities [..., m, n] normalised along `dim` (the attending side's units).

    "paper": [cos]_+ divided by its sum along `dim`. With ~60 textual units and 6 visual ones this makes
    image→text attention one-hot and text→image attention uniform at λ = 20 (the logits' scale grows or
    shrinks with the other side's unit count). "official" (the authors' released code): LeakyReLU(cos,
    0.1) divided by its L2 norm along `dim`, whose scale hardly depends on the unit count."""
    m = mask.to(cos.dtype)
    if norm == "paper":
        s = cos.clamp(min=0) * m  # eq. 2 (and s'_ab, its transpose)
        return s / s.sum(dim, keepdim=True).clamp(min=att.EPS)
    s = F.leaky_relu(cos, 0.1) * m
    return s / s.norm(dim=dim, keepdim=True).clamp(min=att.EPS)


def contextual_attention(
    cos: Tensor, dots: Tensor, mask: Tensor, text: Features, image: Features, layout: att.Layout,
    lam: float, use_focal: bool = False, norm: str = "official", text_image: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:  # fmt: skip
    """Both directions for the pairs of `layout`, laid out [..., m, n] (m visual units, n textual units).

    cos: cos(i_q, t_k); dots: i_v · t_v; mask: which (a, b) may align (valid text units, and the scale
    pairs under separate alignment); `text` / `image`: the sides' "values_gram" (t_v·t_v, i_v·i_v) and
    "values_norms" (|t_v|, |i_v|); `norm`: see `attention_logits`. Returns (S [...], S' [...],
    α [..., m, n], α' [..., m, n]); S' and α' are None unless `text_image`.
    """
    m = mask.to(cos.dtype)
    # image → text: ŝ normalised over the visual units, focal and softmax over the textual ones (eq. 3)
    s_hat = attention_logits(cos, mask, -2, norm)
    s_til = focal(s_hat, m, -1) if use_focal else s_hat
    alpha = att.masked_softmax(lam * s_til, mask, dim=-1)
    r = att.attended_cosine(alpha, dots, text["values_gram"], "text", layout)  # eq. 4, [..., m]
    r = r / att.per_image(image["values_norms"], layout).clamp(min=att.EPS)
    score = att.masked_mean(r, mask.any(-1))  # eq. 5
    if not text_image:
        return score, None, alpha, None
    # text → image: ŝ' normalised over the textual units, focal and softmax over the visual ones
    s_hat2 = attention_logits(cos, mask, -1, norm)
    s_til2 = focal(s_hat2, m, -2) if use_focal else s_hat2
    alpha2 = att.masked_softmax(lam * s_til2, mask, dim=-2)
    r2 = att.attended_cosine(alpha2, dots, image["values_gram"], "image", layout, dim=-2)  # [..., n]
    r2 = r2 / att.per_text(text["values_norms"], layout).clamp(min=att.EPS)
    score2 = att.masked_mean(r2, mask.any(-2))  # S'(T, I)
    return score, score2, alpha, alpha2


def _side(feats: Features, attending: str) -> Features:
    """One side's features as its attention reads them per item: its `attending` units (queries or
    keys) replaced by their unit-length "unit_<attending>" (only cosines read them: a shortlist then
    gathers a third less per image), its values' Gram matrix and norms added. Idempotent."""
    if attending not in feats or "values_gram" in feats:
        return feats
    values = feats["values"]
    return {k: v for k, v in feats.items() if k != attending} | {
        f"unit_{attending}": F.normalize(feats[attending], dim=-1),
        "values_gram": values @ values.transpose(-1, -2),
        "values_norms": values.norm(dim=-1),
    }


def _matching_kl(logits: Tensor, q: Tensor, eps: float = 1e-8) -> Tensor:
    """mean_i KL(softmax_j(logits_ij) ‖ q_ij): CSAL's L_i / L_t (CMPM's form, eq. 6)."""
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - torch.log(q + eps))).sum(dim=1).mean()


@register_method("nafs")
class NAFS(PairwiseMethod):
    """Staircase CNN + locality-constrained BERT, all scales aligned by contextual non-local attention."""

    Config = NAFSConfig
    trunk_modules = ("staircase",)
    cfg: NAFSConfig
    unit_keys = ("keys", "values", "scales", "unit_keys", "values_norms")  # stored, and from `text_side`
    square_unit_keys = ("values_gram",)

    def __init__(self, cfg: NAFSConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        d = cfg.embed_dim
        self.staircase = Staircase(cfg)
        c = self.staircase.channels
        self.image_fc = nn.ModuleDict({s: nn.Linear(c, d) for s in cfg.image_scales})  # units into R^D
        self.text: nn.Module
        if cfg.text_encoder == "bilstm":  # Table 4 row 1
            self.text = RNNTextEncoder(info.vocab_size, cfg.word_dim, cfg.lstm_hidden)
            width = self.text.out_dim
        else:
            self.text = BertEncoder(_bert_folder(cfg, info), cfg.bert_trainable, cfg.bert_random_init,
                                    cfg.bert_layers, cfg.bert_hidden)  # fmt: skip
            width = self.text.hidden
        self.text_fc = nn.Linear(width, d)
        self.cmpc_classes = nn.Parameter(torch.randn(info.num_classes, d) * 0.01)  # CMPC's W
        if cfg.nonlocal_attention:  # §3.3: two linear maps per modality
            self.image_query, self.image_value = nn.Linear(d, d), nn.Linear(d, d)
            self.text_key, self.text_value = nn.Linear(d, d), nn.Linear(d, d)
        else:  # Table 4 rows without contextual non-local: the scales' features concatenated
            self.image_unify = nn.Linear(d * self.n_image_units, d)
            self.text_unify = nn.Linear(d * len(cfg.text_scales), d)
        codes = [IMAGE_SCALES.index(s) + 1 for s in cfg.image_scales for _ in range(self._units_of(s))]
        self.register_buffer("image_scale_codes", torch.tensor(codes), persistent=False)

    # ---- what `ped eval` reads ------------------------------------------------------------------
    @property
    def default_rerank(self) -> str | None:
        """Table 4 "RVN": NAFS ranks with re-ranking by visual neighbours unless `rvn=false`."""
        return "rvn" if self.cfg.rvn else None

    @property
    def rerank_options(self) -> dict[str, Any]:
        """RVN's k and the weight of its Jaccard term (eq. 8)."""
        return {"neighbours": self.cfg.rvn_neighbours, "weight": self.cfg.rvn_weight}

    # ---- schedule ---------------------------------------------------------------------------------
    def loss_names(self) -> tuple[str, ...]:
        return ("cmpm", "cmpc", "csal") if self.cfg.nonlocal_attention else ("cmpm", "cmpc")

    def default_stages(self) -> list[Stage]:
        """§4.1: Adam, 0.00011 for the visual and textual extraction branches, 0.0011 for the rest, batch
        64 (no schedule given: the engine's cosine); an optional frozen warm-up first (`frozen_epochs`,
        not in the paper). `bert_trainable=false` keeps BERT out of every stage."""
        cfg = self.cfg
        extractors = ("staircase", "text")
        bert = ("text.bert",) if not cfg.bert_trainable and hasattr(self.text, "bert") else ()
        joint = Stage("joint", cfg.epochs, cfg.lr, self.loss_names(), frozen=bert,
                      lr_mult={e: cfg.extractor_lr_mult for e in extractors})  # fmt: skip
        if cfg.frozen_epochs <= 0:
            return [joint]
        fixed_text = ("text",) if not cfg.warmup_text else bert
        warm = Stage("frozen_extractors", cfg.frozen_epochs, cfg.lr, self.loss_names(), frozen=fixed_text,
                     freeze_trunk=True, lr_mult={"text": cfg.extractor_lr_mult})  # fmt: skip
        return [warm, joint]

    def pretrained_modules(self) -> tuple[str, ...]:
        """The ImageNet staircase, and BERT unless `bert_random_init`."""
        bert = hasattr(self.text, "bert") and not self.cfg.bert_random_init
        return super().pretrained_modules() + (("text.bert",) if bert else ())

    # ---- image path -------------------------------------------------------------------------------
    def _units_of(self, scale: str) -> int:
        return {"global": 1, "region": self.cfg.region_stripes, "patch": self.cfg.patch_stripes}[scale]

    @property
    def n_image_units(self) -> int:
        return sum(self._units_of(s) for s in self.cfg.image_scales)

    def image_trunk(self, batch: Batch) -> Tensor:
        """The staircase's pooled units [B, m, C] (global, n1 regions, n2 patches)."""
        return self.staircase(batch["image"])

    def encode_images(self, batch: Batch) -> Features:
        """ "global": the global branch in R^D (CMPM/CMPC, shortlist, RVN); with non-local attention
        "queries" / "values" [B, m, D] (I_Q, I_V of §3.3); without it "global" is the unified vector."""
        units = self.trunk_output(batch).float()
        splits = torch.split(units, [self._units_of(s) for s in self.cfg.image_scales], dim=1)
        feats = torch.cat(
            [self.image_fc[s](x) for s, x in zip(self.cfg.image_scales, splits, strict=True)], 1
        )
        if not self.cfg.nonlocal_attention:
            return {"global": self.image_unify(feats.flatten(1))}
        return {"global": feats[:, 0], "queries": self.image_query(feats), "values": self.image_value(feats)}

    # ---- text path --------------------------------------------------------------------------------
    def text_units(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """All-scale textual features T [B, n, D] and their scale codes [B, n] (1 sentence, 2 sub-sentence,
        3 word; 0 = padding): the sentence [CLS], the sub-sentence [CLS]s, the word pieces. With the
        bi-LSTM: its sentence vector and word states."""
        if self.cfg.text_encoder == "bilstm":
            states, sentence, valid = self.text(batch["tokens"], batch["lengths"])
            units, codes = [sentence[:, None]], [torch.ones_like(batch["tokens"][:, :1])]
            if "word" in self.cfg.text_scales:
                units.append(states)
                codes.append(valid.long() * 3)
            return self.text_fc(torch.cat(units, 1)), torch.cat(codes, 1)
        if "bert_ids" not in batch:
            raise PedError(
                "NAFS needs BERT word pieces but the batch has none (the cache was built without BERT)",
                "preprocess the cache with a BERT tokenizer (the default MiniLM, or --bert-model DIR)",
            )
        ids, mask = batch["bert_ids"].long(), batch["bert_mask"].long()
        subs = "subsentence" in self.cfg.text_scales
        length = mask.sum(1, keepdim=True)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        if subs:
            seq = locality_sequence(ids, mask, batch["bert_spans"], batch["n_spans"], self.cfg.locality)
            states = self.text(seq.ids, seq.mask, seq.attention)
            word_states = states.gather(1, seq.word_pos[..., None].expand(-1, -1, states.shape[-1]))
        else:
            states = word_states = self.text(ids, mask)
        units = [states[:, :1]]
        codes = [torch.ones_like(ids[:, :1])]
        if subs:
            units.append(states.gather(1, seq.cls_pos[..., None].expand(-1, -1, states.shape[-1])))
            codes.append(seq.span_valid.long() * 2)
        if "word" in self.cfg.text_scales:  # pieces between [CLS] and [SEP]
            units.append(word_states[:, 1:])
            codes.append(((pos >= 1) & (pos < length - 1)).long()[:, 1:] * 3)
        return self.text_fc(torch.cat(units, 1)), torch.cat(codes, 1)

    def encode_texts(self, batch: Batch) -> Features:
        """ "global": the sentence [CLS] in R^D; with non-local attention "keys" / "values" [B, n, D]
        (T_K, T_V of §3.3) and "scales" [B, n] (int8 scale codes, 0 = padding)."""
        units, codes = self.text_units(batch)
        units = units * (codes > 0)[..., None]
        if not self.cfg.nonlocal_attention:
            pooled = [att.masked_pool(units, codes == k + 1) for k, s in enumerate(TEXT_SCALES)
                      if s in self.cfg.text_scales]  # fmt: skip
            return {"global": self.text_unify(torch.cat(pooled, 1))}
        return {"global": units[:, 0], "keys": self.text_key(units), "values": self.text_value(units),
                "scales": codes.to(torch.int8)}  # fmt: skip

    # ---- scoring ----------------------------------------------------------------------------------
    def unit_mask(self, text: Features) -> Tensor | None:
        return text["scales"] > 0 if "scales" in text else None

    def text_side(self, text: Features) -> Features:
        """The keys at unit length ("unit_keys", replacing "keys"), the values' Gram matrix and norms."""
        return _side(super().text_side(text), "keys")

    def image_side(self, image: Features) -> Features:
        """The queries at unit length ("unit_queries", replacing "queries"), the values' Gram and norms."""
        return _side(super().image_side(image), "queries")

    def _attention(
        self, text: Features, image: Features, layout: att.Layout, text_image: bool = True
    ) -> tuple[Tensor, ...]:
        """(S, S', α, α') of every pair of the layout (S' and α' None unless `text_image`)."""
        text, image = self.text_side(text), self.image_side(image)
        codes = att.per_text(text["scales"].long(), layout)[..., None, :]  # [.., 1, n]
        mask = codes > 0
        if self.cfg.alignment == "separate":
            mask = mask & (codes == self.image_scale_codes[:, None])
        else:
            mask = mask.expand(*mask.shape[:-2], self.n_image_units, -1)
        cos = att.cross_dots(text["unit_keys"], image["unit_queries"], layout).transpose(-1, -2)  # [.., m, n]
        dots = att.cross_dots(text["values"], image["values"], layout).transpose(-1, -2)
        return contextual_attention(cos, dots, mask, text, image, layout, self.cfg.lambda_softmax,
                                    self.cfg.focal, self.cfg.attention_norm, text_image)  # fmt: skip

    def scores(self, text: Features, image: Features, layout: att.Layout) -> Tensor:
        if not self.cfg.nonlocal_attention:
            return att.cross_cosine(text["global"], image["global"], layout)
        if self.cfg.test_score == "mean":
            s, s2 = self._attention(text, image, layout)[:2]
            return (s + s2) / 2
        s = self._attention(text, image, layout, text_image=False)[0]
        if self.cfg.test_score == "paper":
            return s
        return att.cross_cosine(text["global"], image["global"], layout) + s

    def pair_width(self, units: int) -> int:
        return self.n_image_units * units if self.cfg.nonlocal_attention else 1

    # ---- training ---------------------------------------------------------------------------------
    def losses(self, batch: Batch, stage: Stage) -> dict[str, Tensor]:
        """Eq. 7: λ2·CMPM + λ3·CMPC on the global features, λ4·CSAL = λ4·(L_i + L_t) on S and S'."""
        cfg = self.cfg
        image, text = self.encode_images(batch), self.encode_texts(batch)
        pids, labels = batch["pid"], batch["label"]
        out = {
            "cmpm": cfg.cmpm_weight * cmpm_loss(image["global"], text["global"], pids),
            "cmpc": cfg.cmpc_weight * cmpc_loss(image["global"], text["global"], labels, self.cmpc_classes),
        }
        if cfg.nonlocal_attention:
            s, s2 = self._attention(text, image, "all")[:2]  # [texts, images]
            same = (pids[:, None] == pids[None, :]).float()
            q = same / same.sum(1, keepdim=True)  # symmetric y: q over texts per image = over images per text
            l_i = _matching_kl(s.T / cfg.csal_temperature, q)  # image i over texts j
            l_t = _matching_kl(s2 / cfg.csal_temperature, q)  # text j over images i
            out["csal"] = cfg.csal_weight * (l_i + l_t)
        return {name: out[name] for name in stage.losses}

    # ---- explanation ------------------------------------------------------------------------------
    def explain(self, text_feats: Features, image_feats: Features) -> Explanation | None:
        """For the first query and each image: how much each text unit attends to each image unit (α'),
        the units named by scale (Fig. 4); the sentence's row is the `focus` (the units have no geometry
        to draw). `details["image_to_text"]`: each image unit's weights over the text units (α, eq. 3)."""
        if not self.cfg.nonlocal_attention:
            return None
        text = self.trim(index_features(text_feats, slice(0, 1)))
        valid = text["scales"][0] > 0
        with torch.no_grad():
            s, s2, alpha, alpha2 = self._attention(text, image_feats, layout="all")
        counts = {k: 0 for k in range(1, 4)}
        text_units = []
        for code in text["scales"][0][valid].tolist():
            counts[code] += 1
            text_units.append("sentence" if code == 1 else f"{TEXT_SCALES[code - 1]} {counts[code]}")
        image_units = [s if self._units_of(s) == 1 else f"{s} {k + 1}"
                       for s in self.cfg.image_scales for k in range(self._units_of(s))]  # fmt: skip
        return Explanation(
            "the sentence attends to",
            parts=image_units,
            links=as_array(alpha2[0][..., valid].transpose(-1, -2)),  # [ni, n text units, m image units]
            link_texts=text_units,
            focus=as_array(alpha2[0][..., valid][..., 0]),  # [ni, m]: the sentence's weights
            details={
                "image_to_text": as_array(alpha[0][..., valid]),  # [ni, m, n]: each image unit's weights
                "scores": {"image_text": as_array(s[0]), "text_image": as_array(s2[0])},
            },
        )


def _bert_folder(cfg: NAFSConfig, info: DataInfo) -> str | None:
    """The BERT folder: the configured one must be the tokenizer the cache's word pieces came from."""
    if cfg.bert_model is None:
        return info.bert_model
    if (
        Path(resolve_bert_model(cfg.bert_model)).resolve()
        != Path(resolve_bert_model(info.bert_model)).resolve()
    ):
        raise PedError(
            f"NAFS bert_model {cfg.bert_model} is not the tokenizer the cache was built with "
            f"({info.bert_model or 'the default MiniLM'}): its word-piece ids would mean other words",
            f"leave bert_model unset (the cache's), or preprocess again with --bert-model {cfg.bert_model}",
        )
    return cfg.bert_model
