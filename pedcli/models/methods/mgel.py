"""MGEL — Multi-Granularity Embedding Learning.

Paper: Chengji Wang, Zhiming Luo, Yaojin Lin, Shaozi Li, "Text-based Person Search via Multi-Granularity
Embedding Learning", IJCAI 2021.

- Image: the backbone's last map X; per granularity k a granularity attention block (GAB: channel
  attention + 1×1 conv, X^k = conv(ca(X) + X)) and 2^(k-1) disjoint horizontal stripes of H/2^(k-1)
  rows each, pooled by eq. 1.
- Text: BiLSTM word states Z; per granularity a GAB, then (k > 1) multi-head self-attention with one
  head per stripe (eq. 2) pooled like eq. 1; the first granularity pools Z^1 directly.
- Training (eq. 12, per granularity): triplet loss (eq. 10) + identity loss with a softmax layer shared
  by both modalities (eq. 11) on the global embeddings, + the part alignment loss (eqs. 3–9,
  `pedcli/models/losses/part_alignment.py`). Global embeddings: global contrastive pooling (GCP, eq. 7,
  one module shared by all granularities); the first granularity uses a cross-modality shared FC.
- Test: the granularities' global embeddings concatenated, cosine similarity.
- Schedule (sec. 4.1): end to end, Adam, lr 2e-4, 50 epochs, 32 pairs a batch: one stage.

Departures from the paper and choices it leaves open, all of them:
- Backbone: mobilenet_v2 by default (ImageNet weights offline); Table 1's resnet50 / vgg16 are options.
- Last map: `last_stride=1` (stride 16) so that a 384×128 image gives 24 rows and the finest
  granularity's 8 stripes are disjoint, 3 rows each (the paper gives neither stride nor input size; at
  stride 32 the 12 rows cannot hold 8 equal stripes). A granularity with more stripes than rows is
  refused.
- Learning-rate schedule: not given; the engine's cosine decay.
- Eq. 2's attention: read as scaled dot-product attention (1/√c, softmax over the attended words).
- Channel attention: HAN-style avg+max MLP with reduction 16 (its form is not given).
- Triplet margins α = 0.2 (not given).
- Ablation stand-ins: without GCP the global embedding is the mean of the parts; without GAB one shared
  1×1 conv, no channel attention.
- Test-time cosine: each granularity L2-normalised before concatenating, so every granularity counts
  equally whatever its scale (the score is the mean of the granularities' cosines).
- `warmup_epochs` > 0 (not in the paper; off by default) adds a first stage with the backbone frozen,
  whose trunk features the engine can cache: a cheap start for the new layers on CPU. Its rate
  `warmup_lr` = 1e-3 (Adam) is the frozen-CNN rate of PMA, MIA and NAFS: the paper's 2e-4 is for the
  whole network over 50 epochs, and fresh layers on a frozen trunk learn little in a few epochs at it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pedcli.errors import PedError
from pedcli.models.attention import POOLINGS, ChannelAttention, masked_pool, masked_softmax
from pedcli.models.backbones import BACKBONES, build_backbone, stripe_pool
from pedcli.models.explanation import Explanation, as_array
from pedcli.models.losses import SharedClassifier, identity_loss, part_alignment_loss, triplet_hardest
from pedcli.models.methods.base import Batch, DataInfo, Features, Method, Stage, register_method
from pedcli.models.text_encoders import RNNTextEncoder

LOSSES = ("triplet", "identity", "pal")


@dataclass
class MGELConfig:
    """Every option of the model; the ablation tables map onto these fields (see each comment)."""

    backbone: str = "mobilenet_v2"  # Table 1 reports mobilenet_v2, resnet50 and vgg16
    pretrained: str = "imagenet"  # "none" trains the backbone from scratch
    granularities: tuple[int, ...] = (1, 2, 4, 8)  # stripes per granularity, 2^(k-1); Table 3 / Fig. 4
    last_stride: int = 1  # 1: last map at stride 16 (24 rows at 384×128: 8 disjoint stripes of 3 rows)
    embed_dim: int = 512  # c, the width of every part and global embedding (sec. 4.1)
    word_dim: int = 300  # word vectors (sec. 4.1); the BiLSTM has c/2 units per direction so Z is c wide
    pooling: str = "avgmax"  # eq. 1: "avg" | "max" | "avgmax" (Table 4, pooling rows)
    global_embedding: bool = True  # False: match on the concatenated part embeddings (Table 2)
    gab: bool = True  # granularity attention block (Table 4)
    gcp: bool = True  # global contrastive pooling; False: mean of the parts (Table 4)
    pal: bool = True  # part alignment loss, eqs. 3–9 (Table 4)
    triplet: bool = True  # eq. 10 (Table 4)
    identity: bool = True  # eq. 11 (Table 4)
    margin: float = 0.2  # α of eqs. 8 and 10 (not given in the paper)
    channel_reduction: int = 16  # hidden width of the GAB channel attention = channels / reduction
    epochs: int = 50
    lr: float = 2e-4
    warmup_epochs: int = 0  # > 0: a first stage with the backbone frozen (not in the paper)
    warmup_lr: float = 1e-3  # that stage's rate (not in the paper; PMA's, MIA's and NAFS's frozen-CNN rate)

    def __post_init__(self) -> None:
        self.granularities = tuple(int(n) for n in self.granularities)  # a JSON config gives a list
        if (
            not self.granularities
            or min(self.granularities) < 1
            or len(set(self.granularities)) != len(self.granularities)
        ):
            raise PedError(
                f"MGEL granularities must be distinct positive stripe counts, got {self.granularities}",
                "the paper's setting is granularities=(1, 2, 4, 8)",
            )
        if self.pooling not in POOLINGS:
            raise PedError(f"unknown MGEL pooling '{self.pooling}'", f"choose one of: {', '.join(POOLINGS)}")
        if self.last_stride not in (1, 2):
            raise PedError(f"MGEL last_stride must be 1 or 2, got {self.last_stride}")
        if self.backbone not in BACKBONES:
            raise PedError(f"unknown backbone '{self.backbone}'", f"choose one of: {', '.join(BACKBONES)}")
        if self.embed_dim < 2 or self.embed_dim % 2:
            raise PedError(
                f"MGEL embed_dim must be even (two LSTM directions), got {self.embed_dim}",
                "use an even width, e.g. the paper's embed_dim=512",
            )
        if not (self.triplet or self.identity or self.pal):
            raise PedError("MGEL needs at least one loss", "enable triplet, identity or pal")


class GranularityAttention(nn.Module):
    """GAB (sec. 3.1): X^k = conv1×1(ca(X) + X), ca(X) = X ⊙ channel weights. Works on positions or
    words alike: [B, N, C_in] (+ valid mask) → [B, N, C_out]; the 1×1 conv is a per-position linear map."""

    def __init__(self, in_dim: int, out_dim: int, reduction: int) -> None:
        super().__init__()
        self.ca = ChannelAttention(in_dim, reduction)
        self.conv = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.conv(x * (1.0 + self.ca(x, mask).unsqueeze(1)))  # ca(X) + X


class PartSelfAttention(nn.Module):
    """Eq. 2: n heads, head i turning the words into part i: Z_i = softmax((P_i Z)ᵀ(Q_i Z)/√c) (U_i Z)ᵀ.

    The paper prints softmax(P Z)ᵀ(Q Z); we read it as the usual scaled dot-product attention,
    softmax over the attended words (padding masked)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dim = heads, dim
        self.pqu = nn.Linear(dim, 3 * heads * dim, bias=False)  # P_i, Q_i, U_i ∈ R^{c×c} for every head

    def forward(self, z: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """z [B, T, c], mask [B, T] → (per-head word features [B, n, T, c], attention [B, n, T, T])."""
        b, t, _ = z.shape
        p, q, u = self.pqu(z).reshape(b, t, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)  # each [B,n,T,c]
        attn = masked_softmax(p @ q.transpose(-1, -2) / math.sqrt(self.dim), mask[:, None, None, :])
        return attn @ u, attn


class GlobalContrastivePooling(nn.Module):
    """Eq. 7 (Park & Ham 2020): parts [B, n, c] → f_c1(max) + f_c3([f_c1(max), f_c2(max − avg)])."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(2 * dim, dim)

    def forward(self, parts: Tensor) -> Tensor:
        v_max, v_avg = parts.amax(1), parts.mean(1)
        bar = self.fc1(v_max)
        return bar + self.fc3(torch.cat([bar, self.fc2(v_max - v_avg)], dim=1))


@register_method("mgel")
class MGEL(Method):
    """Multi-granularity stripes and text parts, aligned part by part, matched by global embeddings."""

    Config = MGELConfig

    def __init__(self, cfg: MGELConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        c, grans = cfg.embed_dim, cfg.granularities
        rows = math.ceil(info.image_size[0] / (16 if cfg.last_stride == 1 else 32))
        if max(grans) > rows:
            raise PedError(
                f"MGEL granularity of {max(grans)} stripes needs a last map at least {max(grans)} rows high; "
                f"{info.image_size[0]}-pixel-high images give {rows} rows (last_stride={cfg.last_stride})",
                "preprocess taller images (--image-size), set last_stride=1, or drop that granularity "
                "(--set granularities=1,2,4)",
            )
        self.backbone = build_backbone(cfg.backbone, cfg.pretrained, last_stride=cfg.last_stride)
        trunk_dim = self.backbone.channels[-1]
        self.text_encoder = RNNTextEncoder(info.vocab_size, cfg.word_dim, hidden=c // 2, cell="lstm")
        if cfg.gab:  # one block per granularity and modality
            self.image_gab = nn.ModuleList(
                GranularityAttention(trunk_dim, c, cfg.channel_reduction) for _ in grans
            )
            self.text_gab = nn.ModuleList(GranularityAttention(c, c, cfg.channel_reduction) for _ in grans)
        else:  # ablation: one shared 1×1 conv brings the map to c channels; words pass through
            self.image_reduce = nn.Linear(trunk_dim, c)
        self.part_attention = nn.ModuleDict({str(n): PartSelfAttention(c, n) for n in grans if n > 1})
        self.gcp = GlobalContrastivePooling(c)  # shared by all granularities (sec. 3.1)
        self.global_fc = nn.Linear(c, c)  # first granularity: a cross-modality shared FC (sec. 3.2)
        self.classifiers = nn.ModuleList(
            SharedClassifier(c if cfg.global_embedding else n * c, info.num_classes) for n in grans
        )

    # ---- schedule ---------------------------------------------------------------------------------
    def default_stages(self) -> list[Stage]:
        """Sec. 4.1: end to end, Adam at 2e-4, 32 pairs a batch (the rate's schedule is not given: cosine)."""
        cfg = self.cfg
        losses = tuple(name for name in LOSSES if getattr(cfg, name))
        joint = Stage("joint", cfg.epochs, cfg.lr, losses, batch_size=32)
        if not cfg.warmup_epochs:
            return [joint]
        warmup = Stage("warmup", cfg.warmup_epochs, cfg.warmup_lr, losses, freeze_trunk=True, batch_size=32)
        return [warmup, joint]

    # ---- image path -------------------------------------------------------------------------------
    def image_trunk(self, batch: Batch) -> Tensor:
        return self.backbone(batch["image"])[-1]

    def image_parts(self, trunk: Tensor) -> list[Tensor]:
        """Per granularity, the stripe embeddings v_i^k (GAB, then eq. 1): list of [B, n, c]."""
        b, _, h, w = trunk.shape
        x = trunk.flatten(2).transpose(1, 2)  # [B, HW, C]: positions as a sequence
        out = []
        for k, n in enumerate(self.cfg.granularities):
            xk = self.image_gab[k](x) if self.cfg.gab else self.image_reduce(x)
            xk = xk.transpose(1, 2).reshape(b, -1, h, w)
            out.append(stripe_pool(xk, n, self.cfg.pooling))
        return out

    # ---- text path --------------------------------------------------------------------------------
    def text_parts(self, batch: Batch) -> tuple[list[Tensor], list[Tensor | None]]:
        """Per granularity, the text part embeddings z_i^k ([B, n, c]) and the eq. 2 attention
        ([B, n, T, T]; None for the single-part granularity, which pools the words directly)."""
        words, _, mask = self.text_encoder(batch["tokens"], batch["lengths"])
        parts, attns = [], []
        for k, n in enumerate(self.cfg.granularities):
            zk = self.text_gab[k](words, mask) if self.cfg.gab else words
            if n == 1:
                parts.append(masked_pool(zk, mask, self.cfg.pooling).unsqueeze(1))
                attns.append(None)
                continue
            heads, attn = self.part_attention[str(n)](zk, mask)  # eq. 2
            b, _, t, c = heads.shape
            word_mask = mask.repeat_interleave(n, dim=0)
            pooled = masked_pool(heads.reshape(b * n, t, c), word_mask, self.cfg.pooling)  # eq. 1 on words
            parts.append(pooled.reshape(b, n, c))
            attns.append(attn)
        return parts, attns

    # ---- embeddings -------------------------------------------------------------------------------
    def aggregate(self, parts: Tensor) -> Tensor:
        """One granularity's parts [B, n, c] → its global embedding (sec. 3.2), per the ablation switches."""
        if not self.cfg.global_embedding:
            return parts.flatten(1)  # Table 2 "No Global Embedding": the parts themselves
        if parts.shape[1] == 1:
            return self.global_fc(parts[:, 0])
        return self.gcp(parts) if self.cfg.gcp else parts.mean(1)

    def _features(self, parts: list[Tensor]) -> Features:
        """The stored features: "global" = the granularities' embeddings, each L2-normalised,
        concatenated and scaled to unit norm (sec. 3.3; a dot product of two is the mean of the
        per-granularity cosines); "parts" = every stripe / text part [B, Σn, c], for `explain`."""
        globals_ = [F.normalize(self.aggregate(p), dim=1) for p in parts]
        return {
            "global": torch.cat(globals_, dim=1) / math.sqrt(len(globals_)),
            "parts": torch.cat(parts, dim=1),
        }

    def encode_images(self, batch: Batch) -> Features:
        return self._features(self.image_parts(self.trunk_output(batch)))

    def encode_texts(self, batch: Batch) -> Features:
        return self._features(self.text_parts(batch)[0])

    def similarity(self, text_feats: Features, image_feats: Features) -> Tensor:
        return text_feats["global"] @ image_feats["global"].t()

    def pair_similarity(self, text_feats: Features, image_feats: Features) -> Tensor:
        return (text_feats["global"] * image_feats["global"]).sum(dim=1)

    # ---- training ---------------------------------------------------------------------------------
    def losses(self, batch: Batch, stage: Stage) -> dict[str, Tensor]:
        """Eq. 12: Σ_k triplet (eq. 10) + identity (eq. 11) + part alignment (eq. 9), each summed over
        the granularities and reported under its own name."""
        image_parts = self.image_parts(self.trunk_output(batch))
        text_parts, _ = self.text_parts(batch)
        pids, labels = batch["pid"], batch["label"]
        terms: dict[str, list[Tensor]] = {name: [] for name in stage.losses}
        for k, (v, z) in enumerate(zip(image_parts, text_parts, strict=True)):
            gv, gz = self.aggregate(v), self.aggregate(z)
            if "triplet" in terms:  # eq. 10, cosine, hardest negatives of the batch
                sim = F.normalize(gz, dim=1) @ F.normalize(gv, dim=1).t()
                terms["triplet"].append(triplet_hardest(sim, pids, self.cfg.margin))
            if "identity" in terms:  # eq. 11, one softmax layer for both modalities
                head = self.classifiers[k]
                terms["identity"].append(identity_loss(head(gv), labels) + identity_loss(head(gz), labels))
            if "pal" in terms:  # eqs. 3–9
                terms["pal"].append(part_alignment_loss(v, z, self.aggregate, pids, self.cfg.margin))
        return {name: torch.stack(values).sum() for name, values in terms.items()}

    # ---- explanation ------------------------------------------------------------------------------
    def explain(self, text_feats: Features, image_feats: Features) -> Explanation:
        """For the first query and each image: the cosine of text part i with image stripe i, drawn for
        the finest granularity (the stripes a caption matches); `details["stripe_similarity"]` holds
        every granularity's [n_image, stripes] cosines, in `details["granularities"]` order."""
        t = F.normalize(text_feats["parts"][:1], dim=-1)
        i = F.normalize(image_feats["parts"], dim=-1)
        stripes = torch.einsum("pc,bpc->bp", t[0], i)  # [n_image, Σn]
        sizes = list(self.cfg.granularities)
        per_size = [as_array(s) for s in stripes.split(sizes, dim=1)]
        finest = max(per_size, key=lambda s: s.shape[1])
        return Explanation(
            f"similarity of {finest.shape[1]} stripes",
            grid=finest[..., None],
            details={"granularities": sizes, "stripe_similarity": per_size},
        )
