"""MIA — Multi-granularity Image-text Alignments.

Kai Niu, Yan Huang, Wanli Ouyang and Liang Wang, "Improving Description-Based Person Re-Identification
by Multi-Granularity Image-Text Alignments", IEEE Transactions on Image Processing 29, 2020.

- Image (§III, Fig. 4a): a CNN's last map; global mean pooling + an FC layer give I (GC); a 1×1
  convolution and mean pooling over n = 6 horizontal stripes give the parts P_1..P_n (as PCB [42]).
- Text: word embedding (eq. 1) and one Bi-GRU (eq. 2). The sentence FC gives T (eq. 3); every noun
  phrase runs through the *same* Bi-GRU as a sequence of its own and a second FC gives N_j (eq. 5).
- GC (eq. 4): s_G = cos(I, T).
- RGA (eqs. 6–11): I→T, the parts weighted by softmax_i cos(MLP-V-RGA(P_i), T), aggregated into I_R,
  s_I = cos(I_R, T); T→I, the phrases weighted by softmax_j cos(MLP-T-RGA(N_j), I) into T_R,
  s_T = cos(T_R, I).
- BFM (eqs. 12–17): P→N, each phrase attends over the parts (α, softmax over parts of the cosine of
  the BFM MLPs' outputs), s_P = mean_j cos(Ĩ_j, N_j); N→P, each part attends over the phrases (β),
  s_N = mean_i cos(T̃_i, P_i).
- Fusion (eq. 18): s_F = s_G + λ1·(s_I + s_T)/2 + λ2·(s_P + s_N)/2 (λ1 = 1, λ2 = 0.5, §IV-C).
- Objectives: identity on I and T with one classifier W_s, b_s shared by both (eq. 19); the sum of
  hinges (eq. 20, margin 0.2), one per similarity s_G, s_I, s_T, s_P, s_N.
- Step training (§III-B.2): step 1 identity only, CNN frozen (eq. 21, lr 1e-3, 10 epochs); step 2
  identity + matching of GC and RGA, everything but the BFM MLPs learns (eq. 22, lr 2e-4, 20 epochs);
  step 3 BFM matching, only the two BFM MLPs learn (eq. 23, lr 2e-4, 5 epochs). The matching
  positives are by image: "the descriptions annotated for one image [are] negative matchings for
  other images that belong to the same person ID" (§III-B.1).

Ablation switches (MIAConfig): granularities (Table III upper block and Table IV's "Fine"), which score
is reported (Table III lower block), `schedule="together"` (Table IV: BFM trained with the rest in step
2, no step 3), `merge_steps` (Table VI), the objectives of steps 1 and 2 (Table V), λ1/λ2 (Tables
XI–XII), `units="words"` (Table VII).

Departures from the paper, and choices it leaves open (all of them, here):

- Backbone: MobileNetV2 (ImageNet weights ship offline) instead of VGG-16 / ResNet-50. At 384×128 and
  the default `last_stride=1` its last map is 24×8, the paper's ResNet-50 map (4 rows per stripe);
  `last_stride=2` gives VGG-16's 12×4. On the comparison's 128×64 images stride 32 leaves 4 rows for
  6 stripes; seed 0 there (step 2's lead at 1e-3), validation / test R@1: 16.2 / 6.6 at stride 32,
  26.8 / 7.3 at stride 16.
- The 1×1 convolution's width: §IV-B says the MLPs map parts "from the dimension of 256 to P = 1024",
  but eqs. 7–8, 12–14 and 17 take cosines of aggregated *parts* with 1024-d text vectors, so the parts
  must live in that space: the 1×1 convolution maps the C channels to `embed_dim` (1024, not 256) and
  each MLP is embed_dim → mlp_hidden → embed_dim with a ReLU between.
- The 1×1 convolution is linear, so it is applied after the stripe pooling (the same result; the
  frozen-trunk cache then holds [C] + [6, C] per image instead of the whole map).
- Softmaxes take the cosines as they are (no temperature is given).
- `units="words"` (Table VII) encodes every word on its own, like a one-word phrase.
- Without GC (`global_contrast=False`) I and T still exist: the identity objective initialises the text
  path with them, RGA is guided by them and the two-stage shortlist ranks by them.
- `step2_frozen_epochs` (default 0): that many epochs of step 2's objectives with the CNN frozen before
  step 2 fine-tunes it, for CPU budgets that afford one or two fine-tuning epochs where the paper gives
  step 2 twenty (`frozen_lead` in `base.py`; the method comparison uses it), at `step2_frozen_lr`
  (1e-3: the paper's rate while the CNN is fixed, step 1; its 2e-4 is for fine-tuning the CNN). The
  comparison also runs step 3 at 1e-3 (`step3_lr`; the default keeps the paper's 2e-4): its two epochs
  give the fresh BFM MLPs 66 steps where the paper's five give them about 3,500.
- Without RGA (`relation=False`: the GC + BFM and Fine rows) no step before step 3 reaches the 1×1
  convolution or the phrase FC, so step 3 trains them with the BFM MLPs (else they would stay random).

Scoring all pairs reduces each attention to dot products (one matrix product of text units with image
units per kind) and [units × parts]-sized work per pair; aggregated vectors are never formed (their
norms come from Gram matrices, see `attended_cosine` in `pedcli.models.attention`). What depends on one
item alone is stored with it (`unit_features`): the parts' and phrases' Gram matrices and the MLP
outputs, already L2-normalised, so re-scoring a shortlist does no per-item work again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pedcli.errors import PedError
from pedcli.models import attention as att
from pedcli.models.backbones import BACKBONES, build_backbone, stripe_pool
from pedcli.models.explanation import Explanation, as_array
from pedcli.models.losses import SharedClassifier, identity_loss, sum_of_hinges
from pedcli.models.methods.base import (
    Batch,
    DataInfo,
    Features,
    Stage,
    frozen_lead,
    index_features,
    one_of,
    register_method,
    require,
)
from pedcli.models.methods.pairwise import PairwiseMethod
from pedcli.models.text_encoders import RNNTextEncoder, gather_spans

UNITS = ("phrases", "words")
SCORES = ("fused", "global", "relation", "local")  # s_F, s_G, s_R, s_L (Table III lower block)
SCHEDULES = ("step", "together")
STEP1_OBJECTIVES = ("id", "mat", "id+mat")  # Table V
STEP2_OBJECTIVES = ("mat", "id+mat")

# The similarity each matching loss (eq. 20) ranks, and the submodules it reaches (so a stage trains
# exactly what its losses use; the backbone is added where the CNN is not frozen).
MATCHING = {
    "match_global": "s_G",  # L^G_M (eq. 22)
    "match_i2t": "s_I",  # L^{I-T}_M
    "match_t2i": "s_T",  # L^{T-I}_M
    "match_p2n": "s_P",  # L^{P-N}_M (eq. 23)
    "match_n2p": "s_N",  # L^{N-P}_M
}
LOSS_MODULES = {
    "identity": ("text", "sentence_fc", "image_fc", "classifier"),
    "match_global": ("text", "sentence_fc", "image_fc"),
    "match_i2t": ("text", "sentence_fc", "part_conv", "rga"),
    "match_t2i": ("text", "phrase_fc", "image_fc", "rga"),
    "match_p2n": ("text", "phrase_fc", "part_conv", "bfm"),
    "match_n2p": ("text", "phrase_fc", "part_conv", "bfm"),
}


@dataclass
class MIAConfig:
    """Every option; the paper's ablation tables map onto these fields (see each comment)."""

    backbone: str = "mobilenet_v2"  # the paper: vgg16 / resnet50; mobilenet_v2 has offline weights
    pretrained: str = "imagenet"  # "none" trains the CNN from scratch
    last_stride: int = 1  # 1: the paper's ResNet-50 map (24×8 at 384×128, stride 16, as PCB); 2: VGG-16's
    embed_dim: int = 1024  # V = C = P = N (§IV-B)
    hidden: int = 1024  # H, Bi-GRU hidden size per direction
    word_dim: int = 300  # E
    mlp_hidden: int = 1024  # inner width of the four two-layer MLPs
    parts: int = 6  # n horizontal stripes
    global_contrast: bool = True  # GC: s_G and L^G_M (Table III)
    relation: bool = True  # RGA: s_I, s_T (Table III)
    fine: bool = True  # BFM: s_P, s_N (Table III)
    units: str = "phrases"  # Table VII: "words" matches every word instead of the noun phrases
    lambda1: float = 1.0  # eq. 18 weight of s_R (Table XI)
    lambda2: float = 0.5  # eq. 18 weight of s_L (Table XII)
    score: str = "fused"  # reported similarity: s_F, or one granularity (Table III "MIA (G/R/L)")
    margin: float = 0.2  # α of eq. 20
    schedule: str = "step"  # "step": 3 steps; "together": BFM learns with everything in step 2 (Table IV)
    merge_steps: bool = False  # Table VI: steps 1 and 2 as one stage, the whole model at the step-2 lr
    step1_objectives: str = "id"  # Table V: "id", "mat" or "id+mat"
    step2_objectives: str = "id+mat"  # Table V: "mat" or "id+mat"
    step1_epochs: int = 10
    step1_lr: float = 1e-3
    step2_epochs: int = 20
    step2_lr: float = 2e-4
    step2_frozen_epochs: int = 0  # not in the paper: step-2 epochs on the frozen CNN before its fine-tuning
    step2_frozen_lr: float = 1e-3  # their rate: the paper's with the CNN fixed (step 1)
    step3_epochs: int = 5
    step3_lr: float = 2e-4

    def __post_init__(self) -> None:
        score_needs = {"global": self.global_contrast, "relation": self.relation, "local": self.fine}
        checks = [
            one_of("backbone", self.backbone, BACKBONES),
            one_of("MIA units", self.units, UNITS),
            one_of("MIA score", self.score, SCORES),
            one_of("MIA schedule", self.schedule, SCHEDULES),
            one_of("step1_objectives", self.step1_objectives, STEP1_OBJECTIVES),
            one_of("step2_objectives", self.step2_objectives, STEP2_OBJECTIVES),
            (self.global_contrast or self.relation or self.fine, "MIA needs at least one granularity",
             "enable global_contrast, relation or fine"),
            (score_needs.get(self.score, True), f"MIA score '{self.score}' needs its granularity enabled",
             "enable it or report another score"),
            (min(self.embed_dim, self.hidden, self.word_dim, self.mlp_hidden, self.parts) > 0,
             "MIA embed_dim, hidden, word_dim, mlp_hidden and parts must be positive", "e.g. parts=6"),
            (self.last_stride in (1, 2), f"last_stride must be 1 or 2, got {self.last_stride}", ""),
            (not (self.merge_steps and self.step2_frozen_epochs),
             "step2_frozen_epochs needs step 2 as a stage of its own",
             "drop merge_steps or step2_frozen_epochs"),
        ]  # fmt: skip
        require(checks)

    @property
    def local(self) -> bool:
        """Parts and phrases are needed (RGA or BFM)."""
        return self.relation or self.fine


class TwoMLPs(nn.Module):
    """One module's pair of MLPs (Fig. 4): parts → `part_mlp`, phrases → `text_mlp`; two linear layers
    with a ReLU between them (§IV-B)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.part_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
        self.text_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


def word_spans(lengths: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Every word as a one-token span [i, i+1) (Table VII "all words"): ([B, width, 2], counts [B])."""
    start = torch.arange(width, device=lengths.device).expand(lengths.shape[0], -1)
    return torch.stack([start, start + 1], dim=-1), lengths.clamp(max=width)


def unit_features(units: Tensor, name: str, mlps: dict[str, Callable[[Tensor], Tensor]]) -> Features:
    """What scoring reads of a set of units (parts or phrases) [B, K, d]: the units, their Gram matrix
    `<name>_gram` [B, K, K] (the norm of any weighted sum of them, their own norms on the diagonal) and
    each MLP's output `<prefix>_<name>`, L2-normalised since it enters only through cosines. Computed
    once per item here rather than once per (text, image) pair when scoring."""
    feats = {name: units, f"{name}_gram": units @ units.transpose(1, 2)}
    return feats | {f"{prefix}_{name}": F.normalize(mlp(units), dim=-1) for prefix, mlp in mlps.items()}


def _diag_norms(gram: Tensor) -> Tensor:
    """The units' norms [B, K] from their Gram matrix [B, K, K] (floored: padding units are zero)."""
    return gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt().clamp(min=1e-8)


@register_method("mia")
class MIA(PairwiseMethod):
    """GC (global-global) + RGA (relation-guided global-local) + BFM (part ↔ noun-phrase) alignments."""

    Config = MIAConfig
    cfg: MIAConfig
    unit_keys = ("phrases", "phrases_mask", "rga_phrases", "bfm_phrases")  # one row per phrase slot
    square_unit_keys = ("phrases_gram",)

    def __init__(self, cfg: MIAConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        d = cfg.embed_dim
        self.backbone = build_backbone(cfg.backbone, cfg.pretrained, last_stride=cfg.last_stride)
        c = self.backbone.channels[-1]
        self.image_fc = nn.Linear(c, d)  # GC: global mean pooling → FC → I
        self.text = RNNTextEncoder(info.vocab_size, cfg.word_dim, cfg.hidden, cell="gru")  # eqs. 1–2
        self.sentence_fc = nn.Linear(self.text.out_dim, d)  # W_g, b_g of eq. 3
        self.classifier = SharedClassifier(d, info.num_classes, bias=True)  # W_s, b_s of eq. 19
        if cfg.local:
            self.part_conv = nn.Linear(c, d)  # the 1×1 convolution, applied to the stripe means
            self.phrase_fc = nn.Linear(self.text.out_dim, d)  # W_l, b_l of eq. 5
        if cfg.relation:
            self.rga = TwoMLPs(d, cfg.mlp_hidden)  # MLP-V-RGA, MLP-T-RGA
        if cfg.fine:
            self.bfm = TwoMLPs(d, cfg.mlp_hidden)  # MLP-V-BFM, MLP-T-BFM

    # ---- schedule ---------------------------------------------------------------------------------
    def _matching(self, with_bfm: bool) -> tuple[str, ...]:
        cfg = self.cfg
        names = ["match_global"] * cfg.global_contrast + ["match_i2t", "match_t2i"] * cfg.relation
        return tuple(names + ["match_p2n", "match_n2p"] * (cfg.fine and with_bfm))

    def _objectives(self, spec: str, with_bfm: bool) -> tuple[str, ...]:
        """Loss names of a step from its Table V objectives ("id", "mat", "id+mat")."""
        ids = ("identity",) if "id" in spec.split("+") else ()
        return ids + (self._matching(with_bfm) if "mat" in spec else ())

    def _stage(self, name: str, epochs: int, lr: float, losses: tuple[str, ...], frozen: bool) -> Stage:
        """A stage training exactly the submodules its losses reach (plus the CNN unless frozen); Adam,
        batch 96 (§IV-B). With the CNN learning (step 2) the rate falls ÷10 every 10 epochs."""
        if not losses:
            raise PedError(
                f"MIA stage '{name}' has no loss with these switches",
                "enable a granularity the stage matches, or add the identity objective",
            )
        modules = {m for loss in losses for m in LOSS_MODULES[loss]} | (set() if frozen else {"backbone"})
        decay = {} if frozen else {"scheduler": "step", "milestones": tuple(range(10, epochs, 10))}
        return Stage(name, epochs, lr, losses, trainable=tuple(sorted(modules)), freeze_trunk=frozen,
                     batch_size=96, **({"scheduler": "constant"} | decay))  # fmt: skip

    def default_stages(self) -> list[Stage]:
        """§III-B.2 (eqs. 21–23) and §IV-B's rates and epochs; the switches give Tables IV–VI."""
        cfg = self.cfg
        together = cfg.schedule == "together"
        step1 = self._objectives(cfg.step1_objectives, with_bfm=False)
        step2 = self._objectives(cfg.step2_objectives, with_bfm=together)
        if cfg.merge_steps:  # Table VI: one stage, CNN included, at the step-2 rate for both steps' epochs
            merged = tuple(dict.fromkeys(step1 + step2))
            stages = [self._stage("steps_1_2", cfg.step1_epochs + cfg.step2_epochs, cfg.step2_lr, merged,
                                  False)]  # fmt: skip
        else:
            stages = [
                self._stage("step1", cfg.step1_epochs, cfg.step1_lr, step1, True),  # eq. 21
                *frozen_lead(
                    self._stage("step2", cfg.step2_epochs, cfg.step2_lr, step2, False),  # eq. 22
                    cfg.step2_frozen_epochs,
                    cfg.step2_frozen_lr,
                ),
            ]
        if cfg.fine and not together:  # eq. 23: only the two BFM MLPs learn, constant rate ...
            step3 = self._matching(with_bfm=True)[-2:]
            # ... and the 1×1 conv / phrase FC when no earlier step reached them (no RGA: GC+BFM, Fine)
            trained = {m for stage in stages for m in stage.trainable}
            untrained = {m for loss in step3 for m in LOSS_MODULES[loss]} - trained
            stages.append(Stage(
                "step3", cfg.step3_epochs, cfg.step3_lr, step3, trainable=tuple(sorted({"bfm"} | untrained)),
                freeze_trunk=True, batch_size=96, scheduler="constant",
            ))  # fmt: skip
        return stages

    # ---- image path -------------------------------------------------------------------------------
    def image_trunk(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(global mean of the last map [B, C], mean of each of the n stripes [B, n, C])."""
        last = self.backbone(batch["image"])[-1]
        return last.mean(dim=(2, 3)), stripe_pool(last, self.cfg.parts)

    def _mlps(self, side: str) -> dict[str, Callable[[Tensor], Tensor]]:
        """The enabled modules' MLPs of one side ("part_mlp" or "text_mlp"), by module name."""
        return {name: getattr(getattr(self, name), side) for name in ("rga", "bfm") if hasattr(self, name)}

    def encode_images(self, batch: Batch) -> Features:
        """Features: "global" I [B, d]; with RGA or BFM the parts P_i "parts" [B, n, d], "parts_gram"
        [B, n, n] and the unit-length outputs of MLP-V-RGA / MLP-V-BFM "rga_parts" / "bfm_parts"."""
        pooled, stripes = self.trunk_output(batch)
        feats = {"global": self.image_fc(pooled.float())}
        if self.cfg.local:
            feats |= unit_features(self.part_conv(stripes.float()), "parts", self._mlps("part_mlp"))
        return feats

    # ---- text path --------------------------------------------------------------------------------
    def unit_vectors(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Each noun phrase (or word) through the Bi-GRU as a sequence of its own (eqs. 1–2 on its
        words): ([B, M, 2H] zero where no unit, mask [B, M])."""
        tokens = batch["tokens"]
        if self.cfg.units == "words":
            spans, counts = word_spans(batch["lengths"], tokens.shape[1])
        else:
            spans, counts = batch["phrases"], batch["n_phrases"]
        b, m = spans.shape[:2]
        cut = gather_spans(tokens, spans, counts)
        if cut.tokens.shape[0] == 0:  # no caption of the batch has a unit
            zeros = torch.zeros(b, m, self.text.out_dim, device=tokens.device)
            return zeros, torch.zeros(b, m, dtype=torch.bool, device=tokens.device)
        _, vectors, _ = self.text(cut.tokens, cut.lengths)
        return cut.unflatten(vectors, b, m)

    def encode_texts(self, batch: Batch) -> Features:
        """Features: "global" T (eq. 3); with RGA or BFM the noun phrases N_j (eq. 5) "phrases" [B, M, d]
        (zero at padding), "phrases_mask" [B, M], "phrases_gram" [B, M, M] and the unit-length outputs
        of MLP-T-RGA / MLP-T-BFM "rga_phrases" / "bfm_phrases"."""
        _, sentence, _ = self.text(batch["tokens"], batch["lengths"])
        feats = {"global": self.sentence_fc(sentence)}
        if self.cfg.local:
            vectors, mask = self.unit_vectors(batch)
            phrases = self.phrase_fc(vectors) * mask[..., None]
            feats |= unit_features(phrases, "phrases", self._mlps("text_mlp")) | {"phrases_mask": mask}
        return feats

    # ---- the five similarities ----------------------------------------------------------------------
    def text_side(self, text: Features) -> Features:
        """Adds the unit-length sentence vector T̂ "global_unit" (cosines only ever read it)."""
        return att.with_unit_global(super().text_side(text))

    def image_side(self, image: Features) -> Features:
        """Adds the unit-length global image vector Î "global_unit"."""
        return att.with_unit_global(super().image_side(image))

    def _relation(
        self, text: Features, image: Features, layout: att.Layout, dots: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """RGA: s_I with the part weights v (eqs. 6–8), s_T with the phrase weights c (eqs. 9–11); `dots`
        from `_shared_dots`."""
        t_hat = text["global_unit"][..., None, :]  # [.., 1, d]
        v = torch.softmax(att.cross_dots(t_hat, image["rga_parts"], layout), -1)  # eq. 6, [..., 1, n]
        s_i = att.attended_cosine(v, dots["T·P"], image["parts_gram"], "image", layout)[..., 0]  # eqs. 7–8
        mask = att.per_text(text["phrases_mask"], layout)[..., None, :]
        c = att.masked_softmax(dots["R·I"].transpose(-1, -2), mask)  # eq. 9, [..., 1, M]
        s_t = att.attended_cosine(c, dots["N·I"].transpose(-1, -2), text["phrases_gram"], "text", layout)
        return {"s_I": s_i, "s_T": s_t[..., 0], "v": v[..., 0, :], "c": c[..., 0, :]}  # eqs. 10–11

    def _fine(self, text: Features, image: Features, layout: att.Layout, raw: Tensor) -> dict[str, Tensor]:
        """BFM: s_P with α (eqs. 12–14, phrases attend over parts) and s_N with β (eqs. 15–17, parts
        attend over phrases); both attentions share the cosines of the BFM MLPs' outputs. `raw`: the
        dots N_j · P_k [..., M, n]."""
        gram_n, gram_p = text["phrases_gram"], image["parts_gram"]
        cos = att.cross_dots(text["bfm_phrases"], image["bfm_parts"], layout)  # [..., M, n]
        n_norm = att.per_text(_diag_norms(gram_n), layout)[..., :, None]
        p_norm = att.per_image(_diag_norms(gram_p), layout)[..., None, :]
        alpha = torch.softmax(cos, dim=-1)  # eq. 13
        # cos(Ĩ_j, N_j) of eq. 12, from N̂_j · P_k
        per_phrase = att.attended_cosine(alpha, raw / n_norm, gram_p, "image", layout)
        m = att.per_text(text["phrases_mask"], layout)
        s_p = att.masked_mean(per_phrase, m)  # eq. 14
        beta = att.masked_softmax(cos.transpose(-1, -2), m[..., None, :])  # eq. 16, [..., n, M]
        # cos(T̃_i, P_i) of eq. 15, from N_k · P̂_i
        per_part = att.attended_cosine(beta, (raw / p_norm).transpose(-1, -2), gram_n, "text", layout)
        return {"s_P": s_p, "s_N": per_part.mean(-1), "alpha": alpha, "beta": beta}  # eq. 17

    def _shared_dots(self, text: Features, image: Features, layout: att.Layout, which: set[str]) -> Features:
        """The dot products with Î and with the parts P_i that `which` needs, each of the two image
        tensors met by all its text vectors in one product (a shortlist's gathered parts are read once,
        not once per product): "T·I" T̂·Î, "R·I" MLP-T-RGA(N_j)·Î, "N·I" N_j·Î, "T·P" P_i·T̂, "N·P" N_j·P_k."""
        t_hat, phrases = text["global_unit"][..., None, :], text.get("phrases")
        relation, fine = bool(which & {"s_I", "s_T"}), bool(which & {"s_P", "s_N"})
        on_global = {"T·I": t_hat} if "s_G" in which else {}
        if relation:
            on_global |= {"R·I": text["rga_phrases"], "N·I": phrases}
        on_parts = ({"T·P": t_hat} if relation else {}) | ({"N·P": phrases} if fine else {})
        dots = att.cross_dots_shared(on_global, image["global_unit"][..., None, :], layout)
        return dots | att.cross_dots_shared(on_parts, image.get("parts"), layout)

    def components(
        self, text: Features, image: Features, layout: att.Layout, which: set[str]
    ) -> dict[str, Tensor]:
        """The similarities named in `which` (of s_G, s_I, s_T, s_P, s_N), one per pair of the layout,
        plus the attention weights of the modules computed."""
        text, image = self.text_side(text), self.image_side(image)
        dots = self._shared_dots(text, image, layout, which)
        out: dict[str, Tensor] = {}
        if "s_G" in which:  # eq. 4
            out["s_G"] = dots["T·I"][..., 0, 0]
        if which & {"s_I", "s_T"}:
            out |= self._relation(text, image, layout, dots)
        if which & {"s_P", "s_N"}:
            out |= self._fine(text, image, layout, dots["N·P"])
        return out

    def _score_terms(self) -> dict[str, float]:
        """Weights of s_G, s_I, s_T, s_P, s_N in the reported score (eq. 18; a granularity not used gets
        λ = 0, §IV-C)."""
        cfg = self.cfg
        if cfg.score == "global":
            return {"s_G": 1.0}
        if cfg.score == "relation":
            return {"s_I": 0.5, "s_T": 0.5}
        if cfg.score == "local":
            return {"s_P": 0.5, "s_N": 0.5}
        terms = {"s_G": 1.0} if cfg.global_contrast else {}
        if cfg.relation:
            terms |= {"s_I": cfg.lambda1 / 2, "s_T": cfg.lambda1 / 2}
        if cfg.fine:
            terms |= {"s_P": cfg.lambda2 / 2, "s_N": cfg.lambda2 / 2}
        return terms

    def scores(self, text: Features, image: Features, layout: att.Layout) -> Tensor:
        terms = self._score_terms()
        comps = self.components(text, image, layout, set(terms))
        return sum(w * comps[name] for name, w in terms.items())

    def pair_width(self, units: int) -> int:
        if not self.cfg.local:
            return 1
        return max(self.cfg.parts, units) * (self.cfg.parts if self.cfg.fine else 1)

    # ---- training ---------------------------------------------------------------------------------
    def losses(self, batch: Batch, stage: Stage) -> dict[str, Tensor]:
        """Eqs. 21–23: identity (eq. 19) and one sum of hinges (eq. 20) per similarity of the stage."""
        image, text = self.encode_images(batch), self.encode_texts(batch)
        out: dict[str, Tensor] = {}
        if "identity" in stage.losses:  # L_I + L_T with the shared W_s, b_s
            labels = batch["label"]
            out["identity"] = identity_loss(self.classifier(image["global"]), labels) + identity_loss(
                self.classifier(text["global"]), labels
            )
        matching = [name for name in stage.losses if name in MATCHING]
        comps = self.components(text, image, "all", {MATCHING[name] for name in matching})
        for name in matching:
            # positives by image (§III-B.1): another image of the same person is a negative
            out[name] = sum_of_hinges(comps[MATCHING[name]], batch["image_index"], self.cfg.margin)
        return out

    # ---- explanation ------------------------------------------------------------------------------
    def explain(self, text_feats: Features, image_feats: Features) -> Explanation:
        """For the first query and each image: the RGA weights of the n stripes given the sentence (v,
        eq. 6 — Fig. 7a) as a stripe grid, and the BFM weights of every noun phrase over the stripes (α,
        eq. 13: which phrase matched which part — Fig. 7b). `details`: the stripes' weights over the
        phrases (β, eq. 16), the phrases' RGA weights given the image (c, eq. 9) and the five similarities.
        Only valid phrases are kept."""
        text = index_features(text_feats, slice(0, 1))
        text = self.trim(att.as_float(text))
        image = {k: v.float() for k, v in image_feats.items()}
        cfg = self.cfg
        which = {"s_G", *("s_I", "s_T") * cfg.relation, *("s_P", "s_N") * cfg.fine}
        with torch.no_grad():
            comps = self.components(text, image, layout="all", which=which)
        details: dict[str, Any] = {"scores": {k: as_array(comps[k][0]) for k in sorted(which)}}  # each [ni]
        grid = links = None
        if cfg.local:
            valid = text["phrases_mask"][0]
            if cfg.relation:
                grid = as_array(comps["v"][0])[..., None]  # [ni, n, 1]
                details["phrase_relation"] = as_array(comps["c"][0][:, valid])  # [ni, m]
            if cfg.fine:
                links = as_array(comps["alpha"][0][:, valid])  # [ni, m, n]
                details["parts_to_phrases"] = as_array(comps["beta"][0][..., valid])  # [ni, n, m]
        parts = [f"stripe {k + 1}" for k in range(cfg.parts)] if links is not None else []
        return Explanation("attention over stripes", grid=grid, parts=parts, links=links, details=details)
