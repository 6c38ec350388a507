"""PMA — Pose-guided Multi-granularity Attention network.

Ya Jing, Chenyang Si, Junbo Wang, Wei Wang, Liang Wang and Tieniu Tan, "Pose-Guided Multi-Granularity
Attention Network for Text-Based Person Search", AAAI Conference on Artificial Intelligence, 2020.

- Image: the 3-channel image and the 14 pose confidence maps concatenated (17 channels, "Con-pose"),
  a CNN whose first convolution is widened with the averaged RGB filters; its last map is pooled into
  6 horizontal stripes × 4 columns = 24 regions φ_ij(I).
- Text: word embedding (eq. 1) and a bi-LSTM (eqs. 2–3); the sentence e^t is the concatenation of
  the last states of both directions (eq. 4). Each noun phrase is encoded *on its own* by the same
  bi-LSTM ("we use the words in n_j to represent the noun phrase according to Equations 1–4").
- Coarse alignment (CA, eqs. 5–9): a projection per stripe, the cosine s_ij of every region with the
  projected sentence, softmax weights q_ij over the 24 regions and a hard attention that sums the
  s_ij whose q_ij ≥ τ = 1/24.
- Fine-grained alignment (FA, eqs. 10–13): the keypoint maps summed into 6 body parts, a pose CNN
  (four 3×3 conv layers 64/128/256/256 and a fully connected layer) embeds each part map into p_k;
  p_k attends over the noun phrases (eqs. 10–11) and over the image regions alike; S_fa sums the 6
  cosines of the attended text and image parts (eqs. 12–13).
- Training: per branch, the triplet ranking loss with the hardest negative (Faghri et al. 2018) and
  the image / text identity losses with one classifier shared by both modalities (eqs. 14–15); the
  part loss classifies each p_k as its part (eqs. 17–18); total eq. 19. Test: S = S_ca + λ3·S_fa.
  Two steps: the pretrained CNN frozen at lr 1e-3, then everything at lr 2e-4 (Adam, margin 0.2).

Departures from the paper, and choices it leaves open (all of them, here; each also at its place):

- Backbone: MobileNetV2 (ImageNet weights ship offline) instead of VGG-16 / ResNet-50; at 384×128 its
  12×4 last map gives the 6×4 regions by averaging row pairs.
- Identity features: eq. 14 puts the 512-d φ(I)_avg and the b-d ẽ^t through one W_id; the *projected*
  regions are averaged instead, so both live in R^b. FA's identity features (not given): the mean of the
  attended parts (image) and of the phrases (text).
- One linear map of the noun phrases shared by the six parts (the paper does not say).
- The pose CNN's pooling (not given): max-pooling after the first three layers, a global average
  before the FC.
- Table 5 "FA w/o pose" (not specified): each phrase attends over the regions by cosine; S_fa is the
  mean of the phrases' cosines with their attended regions.

Stored image features are L2-normalised where scoring reads only their cosines (see `image_features`).
Scoring all pairs reduces every attention to dot products: one matrix product of the text units with
the image units, then per pair only [units × parts]-sized work (see `_fine_pose`); the shared kernels
are in `pedcli.models.attention`, the chunking in `pedcli.models.methods.pairwise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pedcli.errors import PedError
from pedcli.models import attention as att
from pedcli.models.backbones import BACKBONES, build_backbone
from pedcli.models.explanation import Explanation, as_array
from pedcli.models.losses import SharedClassifier, identity_loss, triplet_hardest
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
from pedcli.models.text_encoders import RNNTextEncoder, gather_spans
from pedcli.pose.keypoints import PARTS, group_parts

CA_ATTENTIONS = ("hard", "soft", "top_m")
FA_UNITS = ("phrases", "words")


@dataclass
class PMAConfig:
    """Every option; the paper's ablation tables map onto these fields (see each comment)."""

    backbone: str = "mobilenet_v2"  # the paper: vgg16 / resnet50; mobilenet_v2 has offline weights
    pretrained: str = "imagenet"  # "none" trains the CNN from scratch
    embed_dim: int = 1024  # b, the joint feature space (paper: 1024)
    hidden: int = 1024  # d, bi-LSTM hidden size per direction (paper: 1024)
    word_dim: int = 300  # eq. 1
    stripes: int = 6  # horizontal stripes of the last map
    columns: int = 4  # regions per stripe (6 × 4 = 24 regions)
    pose_concat: bool = True  # Table 3 "Con-pose": 17-channel input; False: the image alone
    coarse: bool = True  # Table 3 "CA"; False: the global cosine of the mean region and the sentence
    fine: bool = True  # Table 3 "FA"
    ca_attention: str = "hard"  # Table 4: "hard" (eq. 9, τ = 1/regions), "soft" (Σ q·s), "top_m"
    ca_top_m: int = 10  # Table 4 rows 5 / 10 / 20 / 24: regions kept by "top_m"
    fa_pose: bool = True  # Table 5 "FA w/o pose": False lets each phrase attend over the regions
    fa_units: str = "phrases"  # Table 5 "FA w/o noun phrase": "words" attends over the word states
    pose_widths: tuple[int, ...] = (64, 128, 256, 256)  # the pose CNN's four conv layers
    margin: float = 0.2  # α of the ranking loss
    lambda1: float = 1.0  # image identity loss weight (eq. 15)
    lambda2: float = 1.0  # text identity loss weight (eq. 15)
    lambda3: float = 1.0  # FA weight in the loss (eq. 19) and in the test score S = S_ca + λ3·S_fa
    lambda4: float = 1.0  # part loss weight (eq. 19)
    frozen_epochs: int = 10  # step 1: CNN frozen
    frozen_lr: float = 1e-3
    full_epochs: int = 20  # step 2: everything learns
    full_lr: float = 2e-4

    def __post_init__(self) -> None:
        self.pose_widths = tuple(int(w) for w in self.pose_widths)  # a JSON config gives a list
        checks = [
            one_of("backbone", self.backbone, BACKBONES),
            one_of("PMA ca_attention", self.ca_attention, CA_ATTENTIONS),
            one_of("PMA fa_units", self.fa_units, FA_UNITS),
            (len(self.pose_widths) == 4 and min(self.pose_widths) > 0,
             f"PMA pose_widths must be four positive widths, got {self.pose_widths}",
             "the paper's pose CNN is (64, 128, 256, 256)"),
            (self.stripes > 0 and self.columns > 0 and self.embed_dim > 0 and self.hidden > 0,
             "PMA stripes, columns, embed_dim and hidden must be positive", "e.g. stripes=6, columns=4"),
            (1 <= self.ca_top_m <= self.stripes * self.columns,
             f"PMA ca_top_m must be between 1 and {self.stripes * self.columns}, got {self.ca_top_m}",
             "Table 4 uses 5, 10, 20 or 24"),
        ]  # fmt: skip
        require(checks)

    @property
    def needs_pose(self) -> bool:
        return self.pose_concat or (self.fine and self.fa_pose)


class PoseCNN(nn.Module):
    """One body-part map [h, w] → p ∈ R^b: four 3×3 conv layers and a fully connected layer (§Implementation
    Details). Shared by the six parts, so the part loss (eq. 18) has to tell them apart by their maps."""

    def __init__(self, widths: tuple[int, ...], out_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:  # ceil_mode: tiny maps (a 64×32 image has 8×4 maps) never vanish
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c = w
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(c, out_dim)

    def forward(self, maps: Tensor) -> Tensor:
        """[B, K, h, w] part maps → [B, K, b]."""
        b, k, h, w = maps.shape
        x = self.convs(maps.reshape(b * k, 1, h, w)).mean(dim=(2, 3))
        return self.fc(x).reshape(b, k, -1)


class StripeProjection(nn.Module):
    """Eq. 5: φ̃_ij = W_φ^i φ_ij — a different linear map for each horizontal stripe i."""

    def __init__(self, in_dim: int, out_dim: int, stripes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(stripes, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(stripes, out_dim))
        bound = 1 / math.sqrt(in_dim)  # nn.Linear's initialisation, per stripe
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, regions: Tensor) -> Tensor:
        """[B, stripes, columns, C] → [B, stripes, columns, b]."""
        return torch.einsum("bscd,sde->bsce", regions, self.weight) + self.bias[:, None]


def coarse_attention(s: Tensor, mode: str = "hard", top_m: int = 10) -> Tensor:
    """Weights w [..., R] of the local similarities s [..., R] such that S_ca = Σ w·s.

    hard (eqs. 8–9): q = softmax(s); keep (w = 1) the regions with q ≥ τ = 1/R. A tie at τ counts as
    kept (eq. 9's ≥): with equal similarities every region is kept, not a float-rounding subset.
    soft (Table 4 "CA-Soft"): w = q. top_m (Table 4): the m largest similarities.
    """
    if mode == "top_m":
        return torch.zeros_like(s).scatter_(-1, s.topk(top_m, dim=-1).indices, 1.0)
    q = torch.softmax(s, dim=-1)  # eq. 8
    if mode == "soft":
        return q
    if mode != "hard":
        raise ValueError(f"coarse attention mode must be one of {CA_ATTENTIONS}, not {mode!r}")
    tau = 1.0 / s.shape[-1]
    return (q >= tau * (1 - 1e-6)).to(s.dtype)


def attend_by_cosine(queries: Tensor, values: Tensor) -> Tensor:
    """Eqs. 10–11 per item: α = softmax_i cos(query, value_i), output Σ_i α_i value_i.
    queries [B, K, b], values [B, N, b] → [B, K, b]."""
    cos = F.normalize(queries, dim=-1) @ F.normalize(values, dim=-1).transpose(1, 2)
    return torch.softmax(cos, dim=-1) @ values


def _unit_and_norm(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., b] → (x / ‖x‖, ‖x‖): cosines straight from the unit vectors, dot products from both."""
    norms = x.norm(dim=-1)
    return x / norms.clamp(min=att.EPS)[..., None], norms


def _gram(units: Tensor, norms: Tensor) -> Tensor:
    """Dot products u_n·u_m [B, N, N] of the vectors stored as unit vectors [B, N, b] and norms [B, N]."""
    return (units @ units.transpose(1, 2)) * norms[:, :, None] * norms[:, None, :]


@register_method("pma")
class PMA(PairwiseMethod):
    """Coarse (sentence ↔ 24 regions, hard attention) + fine (noun phrases ↔ regions via 6 pose parts)."""

    Config = PMAConfig
    cfg: PMAConfig
    unit_keys = ("phrases", "phrase_norms", "phrases_mask")
    square_unit_keys = ("phrases_gram",)
    scores_read_global = False  # "global" is the shortlist feature only (`shortlist_pieces`)

    def __init__(self, cfg: PMAConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        b = cfg.embed_dim
        in_channels = 3 + info.pose_channels if cfg.pose_concat else 3
        self.backbone = build_backbone(cfg.backbone, cfg.pretrained, in_channels=in_channels)
        c = self.backbone.channels[-1]
        self.text = RNNTextEncoder(info.vocab_size, cfg.word_dim, cfg.hidden)  # eqs. 1–4
        self.sentence_fc = nn.Linear(self.text.out_dim, b)  # W_e^t of eq. 6
        self.region_proj = StripeProjection(c, b, cfg.stripes)  # W_φ^i of eq. 5
        self.ca_classifier = SharedClassifier(b, info.num_classes)  # W_id^ca of eq. 14
        if cfg.fine:
            self.phrase_fc = nn.Linear(self.text.out_dim, b)  # e^n → ẽ^n (before eq. 10)
            self.fa_region_fc = nn.Linear(c, b)  # regions into the parts' space
            self.fa_classifier = SharedClassifier(b, info.num_classes)
            if cfg.fa_pose:
                self.pose_cnn = PoseCNN(cfg.pose_widths, b)
                self.part_classifier = nn.Linear(b, len(PARTS))  # W_p of eq. 18

    # ---- schedule ---------------------------------------------------------------------------------
    def loss_names(self) -> tuple[str, ...]:
        branch = "ca" if self.cfg.coarse else "global"
        names = [f"{branch}_ranking", f"{branch}_identity"]
        if self.cfg.fine:
            names += ["fa_ranking", "fa_identity"] + (["part"] if self.cfg.fa_pose else [])
        return tuple(names)

    def default_stages(self) -> list[Stage]:
        """§Implementation Details: the pretrained CNN frozen at lr 1e-3, then all at 2e-4; Adam, batch
        128 (no schedule given: the engine's cosine). The pose CNN is randomly initialised, so it learns
        in both steps."""
        cfg = self.cfg
        return [
            Stage("frozen_cnn", cfg.frozen_epochs, cfg.frozen_lr, self.loss_names(), freeze_trunk=True,
                  batch_size=128),
            Stage("all", cfg.full_epochs, cfg.full_lr, self.loss_names(), batch_size=128),
        ]  # fmt: skip

    # ---- image path -------------------------------------------------------------------------------
    def _pose(self, batch: Batch) -> Tensor:
        if "pose" not in batch:
            raise PedError(
                "PMA needs pose confidence maps but the batch has none (the cache was preprocessed "
                "without pose)",
                "preprocess with --pose-source blazepose|annotations, or train with "
                "pose_concat=false and fa_pose=false (or fine=false)",
            )
        return batch["pose"].float()

    def image_trunk(self, batch: Batch) -> Tensor:
        """CNN on the (pose-augmented) image, pooled to the stripes × columns region grid [B, C, 6, 4]:
        each stripe averages its rows of the last map (a 12×4 map → 6×4), which also keeps the
        frozen-trunk cache small."""
        x = batch["image"]
        if self.cfg.pose_concat:  # "Con-pose": pose maps (1/8 resolution) upsampled to the image
            pose = F.interpolate(self._pose(batch), size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, pose.to(x.dtype)], dim=1)
        last = self.backbone(x)[-1]
        return F.adaptive_avg_pool2d(last, (self.cfg.stripes, self.cfg.columns))

    def pose_parts(self, batch: Batch) -> Tensor:
        """p_k of the 6 body parts [B, 6, b]: keypoint maps summed per part, then the pose CNN."""
        return self.pose_cnn(group_parts(self._pose(batch)))

    def image_features(self, batch: Batch) -> tuple[Features, Features]:
        """(stored features, raw ones the losses need).

        Stored: "global", the shortlist feature (`shortlist_pieces`); "regions" [B, 24, b]: φ̃_ij of
        eq. 5 (stripe-major), or without CA "avg", eq. 14's φ(I)_avg; FA with pose: "parts" p_k [B, 6, b] and
        "fa_parts" φ^p_k [B, 6, b] (p_k attending over the regions, as eqs. 10–11 do over phrases);
        FA without pose: "fa_regions" [B, 24, b] and "fa_region_norms" [B, 24]. Scoring reads only
        their cosines (and the region norms), so they are stored L2-normalised: a shortlist re-scores
        each image K times and must not normalise it K times.
        Raw: "ca_id" (φ(I)_avg, eq. 14), "parts" (the part loss, eq. 18) and "fa_id" (FA's image
        identity feature: the mean of the attended parts, or of the regions without pose)."""
        grid = self.trunk_output(batch).float()  # [B, C, S, W]
        regions = grid.permute(0, 2, 3, 1)  # [B, S, W, C]
        projected = self.region_proj(regions).flatten(1, 2)  # eq. 5, [B, 24, b]
        feats, raw = {}, {"ca_id": projected.mean(1)}
        if self.cfg.coarse:
            feats["regions"] = F.normalize(projected, dim=-1)
        else:
            feats["avg"] = raw["ca_id"]
        if self.cfg.fine:
            fa_regions = self.fa_region_fc(regions.flatten(1, 2))
            if self.cfg.fa_pose:
                parts = self.pose_parts(batch)
                attended = attend_by_cosine(parts, fa_regions)
                feats["parts"], feats["fa_parts"] = F.normalize(parts, dim=-1), F.normalize(attended, dim=-1)
                raw["parts"], raw["fa_id"] = parts, attended.mean(1)
            else:
                feats["fa_regions"], feats["fa_region_norms"] = _unit_and_norm(fa_regions)
                raw["fa_id"] = fa_regions.mean(1)
        feats["global"] = torch.cat(self.shortlist_pieces(feats, raw, "image"), dim=-1)
        return feats, raw

    def encode_images(self, batch: Batch) -> Features:
        return self.image_features(batch)[0]

    # ---- text path --------------------------------------------------------------------------------
    def phrase_states(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Each noun phrase run through the bi-LSTM as a sequence of its own (eqs. 1–4 on its words):
        ([B, P, 2d] zero where no phrase, mask [B, P])."""
        tokens, spans = batch["tokens"], batch["phrases"]
        b, p = spans.shape[:2]
        cut = gather_spans(tokens, spans, batch["n_phrases"])
        if cut.tokens.shape[0] == 0:  # no caption of the batch has a phrase
            zeros = torch.zeros(b, p, self.text.out_dim, device=tokens.device)
            return zeros, torch.zeros(b, p, dtype=torch.bool, device=tokens.device)
        _, vectors, _ = self.text(cut.tokens, cut.lengths)
        return cut.unflatten(vectors, b, p)

    def text_features(self, batch: Batch) -> tuple[Features, Features]:
        """(stored features, raw ones the losses need).

        Stored: "global", the shortlist feature (`shortlist_pieces`); "sentence" ẽ^t / ‖ẽ^t‖ (eqs. 4,
        6; CA reads only its cosines); FA: "phrases" ẽ^n / ‖ẽ^n‖ [B, P, b], "phrase_norms" [B, P]
        and "phrases_mask" [B, P] (word states instead of phrases when fa_units="words").
        Raw: "ca_id" ẽ^t (eq. 14) and "fa_id", the mean phrase (FA's text identity feature)."""
        states, sentence, mask = self.text(batch["tokens"], batch["lengths"])
        raw = {"ca_id": self.sentence_fc(sentence)}
        feats = {"sentence": F.normalize(raw["ca_id"], dim=-1)}
        if self.cfg.fine:
            units, units_mask = (states, mask) if self.cfg.fa_units == "words" else self.phrase_states(batch)
            phrases = self.phrase_fc(units)
            feats["phrases"], feats["phrase_norms"] = _unit_and_norm(phrases)
            feats["phrases_mask"] = units_mask
            raw["fa_id"] = att.masked_pool(phrases, units_mask)
        feats["global"] = torch.cat(self.shortlist_pieces(feats, raw, "text"), dim=-1)
        return feats, raw

    def shortlist_pieces(self, feats: Features, raw: Features, side: str) -> list[Tensor]:
        """The cosine-shortlist feature ("global") as the pieces of a dot product that S = S_ca + λ3·S_fa
        becomes when every attention is uniform: CA, ŝ·mean_j φ̂_j (eqs. 7–9 with equal weights; without
        CA the cosine itself); FA with pose, Σ_k cos(ē, φ^p_k) with ē the caption's phrase sum (eqs.
        12–13 with equal α); FA without pose, the mean phrase direction · the mean FA region's. The
        cosine of the mean region and the sentence ranked badly: on a trained model (bench-methods
        PMA seed 0) its top 100 of 342 test images held the exact top-1 for 81 % of captions; this
        feature, for 100 %."""
        fine = self.cfg.fine
        if side == "text":
            pieces = [feats["sentence"]]
            if fine and self.cfg.fa_pose:  # the direction of the phrase sum (phrases as ẽ, not unit)
                phrases = feats["phrases"] * feats["phrase_norms"][..., None]
                pieces.append(
                    self.cfg.lambda3 * F.normalize(att.masked_pool(phrases, feats["phrases_mask"]), dim=-1)
                )
            elif fine:  # the mean unit phrase
                pieces.append(self.cfg.lambda3 * att.masked_pool(feats["phrases"], feats["phrases_mask"]))
            return pieces
        pieces = [feats["regions"].mean(1) if self.cfg.coarse else F.normalize(feats["avg"], dim=-1)]
        if fine:
            pieces.append(feats["fa_parts"].sum(1) if self.cfg.fa_pose else F.normalize(raw["fa_id"], dim=-1))
        return pieces

    def encode_texts(self, batch: Batch) -> Features:
        return self.text_features(batch)[0]

    # ---- scoring ----------------------------------------------------------------------------------
    def text_side(self, text: Features) -> Features:
        """Adds the phrases' Gram matrix "phrases_gram" [B, P, P] (FA with pose)."""
        text = super().text_side(text)
        if "phrases" in text and self.cfg.fa_pose and "phrases_gram" not in text:
            text["phrases_gram"] = _gram(text["phrases"], text["phrase_norms"])
        return text

    def image_side(self, image: Features) -> Features:
        """Adds "fine_parts" [B, 12, b], the parts then the attended parts (FA with pose: the phrases'
        dot products with both in one matrix product), or the FA regions' Gram matrix "fa_regions_gram"
        [B, 24, 24] (FA without pose)."""
        image = super().image_side(image)
        if "fa_parts" in image and "fine_parts" not in image:
            image["fine_parts"] = torch.cat([image["parts"], image["fa_parts"]], dim=-2)
        if "fa_regions" in image and "fa_regions_gram" not in image:
            image["fa_regions_gram"] = _gram(image["fa_regions"], image["fa_region_norms"])
        return image

    def _coarse(self, text: Features, image: Features, layout: att.Layout) -> tuple[Tensor, Tensor, Tensor]:
        """(S_ca, local similarities s_ij [..., 24], attention weights [..., 24]) — eqs. 7–9."""
        if not self.cfg.coarse:  # Table 3 without CA: cosine of the global features
            s = att.cross_cosine(text["sentence"], image["avg"], layout)[..., None]
            return s[..., 0], s, torch.ones_like(s)
        t = text["sentence"][..., None, :]
        s = att.cross_dots(t, image["regions"], layout)[..., 0, :]  # eq. 7
        w = coarse_attention(s, self.cfg.ca_attention, self.cfg.ca_top_m)  # eqs. 8–9
        return (w * s).sum(-1), s, w

    def _fine_pose(self, text: Features, image: Features, layout: att.Layout) -> tuple[Tensor, Tensor]:
        """(S_fa, α [..., 6, P]) — eqs. 10–13, each part p_k attending over the noun phrases.

        cos(e^pn_k, φ^p_k) with e^pn_k = Σ_i α_ki ẽ_i equals Σ_i α_ki (ẽ_i·φ̂_k) / ‖Σ_i α_ki ẽ_i‖, and
        the norm needs only the phrases' Gram matrix: no [pairs, 6, b] tensor is formed."""
        text, image = self.text_side(text), self.image_side(image)
        phrases, norms, mask = text["phrases"], text["phrase_norms"], text["phrases_mask"]
        both = att.cross_dots(phrases, image["fine_parts"], layout).transpose(-1, -2)  # [..., 12, P]
        cos, dots = both.split(len(PARTS), dim=-2)  # cos(p_k, ẽ_i) and ẽ_i · φ̂_k / ‖ẽ_i‖, [..., 6, P]
        alpha = att.masked_softmax(cos, att.per_text(mask, layout)[..., None, :])  # eq. 11
        dots = dots * att.per_text(norms, layout)[..., None, :]  # ẽ_i · φ̂_k
        s = att.attended_cosine(alpha, dots, text["phrases_gram"], "text", layout)  # eq. 12
        return s.sum(-1), alpha  # eq. 13

    def _fine_no_pose(self, text: Features, image: Features, layout: att.Layout) -> tuple[Tensor, Tensor]:
        """(S_fa, β [..., P, 24]) — Table 5 "FA w/o pose": each phrase attends over the regions by
        cosine (eq. 11 with the phrase in the part's place); S_fa is the mean of the phrases' cosines
        with their attended regions (a caption's phrase count must not scale its score)."""
        image = self.image_side(image)
        cos = att.cross_dots(text["phrases"], image["fa_regions"], layout)  # [..., P, 24]
        beta = torch.softmax(cos, dim=-1)
        dots = cos * att.per_image(image["fa_region_norms"], layout)[..., None, :]  # ê_i · r̃_j
        s = att.attended_cosine(beta, dots, image["fa_regions_gram"], "image", layout)  # [..., P]
        return att.masked_mean(s, att.per_text(text["phrases_mask"], layout)), beta

    def scores(self, text: Features, image: Features, layout: att.Layout) -> Tensor:
        """S = S_ca + λ3·S_fa (§Learning PMA, test-time score)."""
        score = self._coarse(text, image, layout)[0]
        if self.cfg.fine:
            fine = self._fine_pose if self.cfg.fa_pose else self._fine_no_pose
            score = score + self.cfg.lambda3 * fine(text, image, layout)[0]
        return score

    def pair_width(self, units: int) -> int:
        regions = self.cfg.stripes * self.cfg.columns
        if not self.cfg.fine:
            return regions
        return max(regions, units * (len(PARTS) if self.cfg.fa_pose else regions))

    # ---- training ---------------------------------------------------------------------------------
    def losses(self, batch: Batch, stage: Stage) -> dict[str, Tensor]:
        """Eq. 19: L_ca + λ3·L_fa + λ4·L_p; each branch L = L_r + λ1·L_idi + λ2·L_idt (eqs. 14–15)."""
        cfg = self.cfg
        (image, image_raw), (text, text_raw) = self.image_features(batch), self.text_features(batch)
        pids, labels = batch["pid"], batch["label"]
        branch = "ca" if cfg.coarse else "global"
        out = {
            f"{branch}_ranking": triplet_hardest(self._coarse(text, image, "all")[0], pids, cfg.margin),
            f"{branch}_identity": cfg.lambda1 * identity_loss(self.ca_classifier(image_raw["ca_id"]), labels)
            + cfg.lambda2 * identity_loss(self.ca_classifier(text_raw["ca_id"]), labels),  # eq. 14
        }
        if cfg.fine:
            fine = self._fine_pose if cfg.fa_pose else self._fine_no_pose
            out["fa_ranking"] = cfg.lambda3 * triplet_hardest(fine(text, image, "all")[0], pids, cfg.margin)
            out["fa_identity"] = cfg.lambda3 * (
                cfg.lambda1 * identity_loss(self.fa_classifier(image_raw["fa_id"]), labels)
                + cfg.lambda2 * identity_loss(self.fa_classifier(text_raw["fa_id"]), labels)
            )
            if cfg.fa_pose:  # eq. 18: each p_k classified as part k
                logits = self.part_classifier(image_raw["parts"])  # [B, 6, 6]
                target = torch.arange(len(PARTS), device=logits.device).expand(logits.shape[0], -1)
                out["part"] = cfg.lambda4 * F.cross_entropy(logits.flatten(0, 1), target.flatten())
        return {name: out[name] for name in stage.losses}

    # ---- explanation ------------------------------------------------------------------------------
    def explain(self, text_feats: Features, image_feats: Features) -> Explanation | None:
        """For the first query and each image: the CA regions' softmax weights q_ij (eq. 8) on the
        stripes × columns grid, the regions kept by the hard attention (eq. 9), and per noun phrase its
        weight for each body part (eq. 11). `details["region_similarity"]` holds the cosines s_ij (eq. 7).
        Without CA (`coarse=false`) there are no regions: the phrase → part links alone, if any."""
        text = index_features(text_feats, slice(0, 1))
        text = {k: v if v.dtype == torch.bool else v.float() for k, v in text.items()}
        image = {k: v.float() for k, v in image_feats.items()}
        grid = (-1, self.cfg.stripes, self.cfg.columns)
        with torch.no_grad():
            links, parts = None, []
            if self.cfg.fine and self.cfg.fa_pose:
                alpha = self._fine_pose(text, image, layout="all")[1]  # [ni, 6 parts, phrases]
                links, parts = as_array(alpha[0][..., text["phrases_mask"][0]].transpose(1, 2)), list(PARTS)
            if not self.cfg.coarse:  # no regions without CA: the phrase → part links alone, if any
                if links is None:
                    return None
                return Explanation("noun phrases over body parts", parts=parts, links=links)
            _, s, w = self._coarse(text, image, layout="all")
            return Explanation(
                "attention over regions",
                grid=as_array(torch.softmax(s[0], dim=-1).reshape(grid)),
                selected=as_array((w[0] > 0).reshape(grid), bool),
                parts=parts,
                links=links,
                details={"region_similarity": as_array(s[0])},
            )
