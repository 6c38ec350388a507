"""The one contract every method follows, so the engine never branches on a method's name.

A method is an `nn.Module` subclass registered by name (like timm's `register_model`):

    @register_method("mgel")
    class MGEL(Method):
        Config = MGELConfig          # a dataclass: every option and ablation switch, with defaults
        def __init__(self, cfg: MGELConfig, info: DataInfo): ...

It implements:

- ``default_stages() -> list[Stage]`` — the paper's training schedule and recipe; the engine applies
  ``--epochs`` / ``--lr`` / ``--batch-size`` to it once (``stages(train)``).
- ``encode_images(batch) -> dict[str, Tensor]`` — per-image features (first dim = batch), storable by
  ``ped embed``. Must contain ``"global"``: one vector per image used for the two-stage shortlist.
- ``encode_texts(batch) -> dict[str, Tensor]`` — per-caption features, with ``"global"`` likewise.
  Variable-length items (words, noun phrases) are padded and come with a ``*_mask`` entry.
- ``similarity(text_feats, image_feats) -> Tensor[n_text, n_image]`` — scores for every pair of the two
  given (already chunked by the engine) sets; a matmul for embedding methods, batched cross-attention
  for PMA / MIA / NAFS. Higher is more similar.
- ``pair_similarity(text_feats, image_feats) -> Tensor[n]`` — scores of aligned pairs (text i with
  image i), used to re-score a shortlist without a Python loop per pair. The default takes the
  diagonal of ``similarity`` row by row; cross-attention methods override it with a batched version.
- ``shortlist_similarity(text_feats, image_feats, index, queries) -> Tensor[n, K]`` — each query's
  scores with its K shortlisted items (two-stage scoring, `ped query`); the default goes through
  ``pair_similarity``, cross-attention methods score each query once against its K items.
- ``losses(batch, stage) -> dict[str, Tensor]`` — the scalar losses of that stage; the engine sums them.
- optionally ``image_trunk(batch)``: the part of the image path that a stage can freeze (the CNN). When
  a stage has ``freeze_trunk=True`` the engine computes the trunk output once per image (and flip),
  caches it on disk, and puts it in ``batch["trunk"]``; ``encode_images`` must then use it.
- optionally ``init_from_vocab(words)``: start pretrained parts that depend on the cache's vocabulary
  (HAN's word vectors); the engine calls it once on a new run, never on a resumed or loaded one.
- optionally ``explain(text_feats, image_feats) -> Explanation`` (`pedcli.models.explanation`) for
  ``ped query --html`` and ``ped serve``: the attention that explains the first text's match with each
  image (a grid of regions or stripes, the cells kept, phrase → part links), as the papers' figures show.

Batch keys (``pedcli.data.dataset`` builds them from the HDF5 cache):
  image float[B,3,H,W] (ImageNet-normalised), pose float[B,14,h,w] (when the cache has pose maps),
  image_index long[B] (row in the cache), flip bool[B], pid long[B] (original person id),
  label long[B] (contiguous train-identity label, -100 outside train),
  tokens long[B,L] (0 = pad, 1 = unknown), lengths long[B],
  phrases long[B,P,2] ([start, end) word-token spans, -1 padded), n_phrases long[B],
  bert_ids long[B,Lb], bert_mask long[B,Lb], bert_spans long[B,S,2] (word-piece [start, end) of each
  comma-separated sub-sentence, positions in bert_ids), n_spans long[B], caption_index long[B].
  Image-only batches carry the image keys, text-only batches the text keys, training batches both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from pedcli.data.schema import DataInfo  # the data layer defines it; re-exported for the methods
from pedcli.errors import PedError
from pedcli.models.explanation import Explanation

Features = dict[str, torch.Tensor]
Batch = dict[str, Any]


OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("cosine", "step", "constant")


@dataclass(frozen=True)
class Stage:
    """One step of a paper's training schedule: what learns, on which losses, with which recipe.

    The trainable set is declared by module: `trainable` names submodules (dotted paths, e.g. "text.bert",
    or a parameter of the method itself), "*" the whole method; `frozen` names submodules taken out of it;
    `freeze_trunk` also takes out the method's `trunk_modules` (the engine may then cache their outputs).
    """

    name: str
    epochs: int
    lr: float
    losses: tuple[str, ...]  # the loss names `Method.losses` returns in this stage
    trainable: tuple[str, ...] = ("*",)
    frozen: tuple[str, ...] = ()
    freeze_trunk: bool = False
    weight_decay: float = 4e-5
    lr_mult: dict[str, float] = field(default_factory=dict)  # per top-level submodule learning-rate factors
    batch_size: int = 64  # (image, caption) pairs per batch and process
    optimizer: str = "adam"  # "adam" | "sgd"
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    scheduler: str = "cosine"  # "cosine" (to 1% of lr) | "step" (× gamma at each milestone) | "constant"
    milestones: tuple[int, ...] = ()  # step: stage epochs after which the rate is multiplied by gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up from lr/100 over this many epochs, before the schedule

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS or self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"stage '{self.name}': optimizer must be one of {OPTIMIZERS}, scheduler one of {SCHEDULERS}"
            )


@dataclass
class TrainConfig:
    """Engine overrides of every stage a method returns (None: the method's own value)."""

    epochs: int | None = None  # each stage's epochs (tests, quick runs)
    lr: float | None = None  # each stage's learning rate
    batch_size: int | None = None  # each stage's batch size (default: the paper's, per method)


def apply_overrides(stages: list[Stage], train: TrainConfig) -> list[Stage]:
    """The stages with `train`'s epochs / lr / batch_size where set (`--lr 0` is set, not "unset")."""
    given = {k: getattr(train, k) for k in ("epochs", "lr", "batch_size") if getattr(train, k) is not None}
    return [dataclasses.replace(s, **given) for s in stages]


def frozen_lead(stage: Stage, epochs: int, lr: float, optimizer: str | None = None) -> list[Stage]:
    """`stage` preceded by `epochs` epochs of itself with the CNN frozen (on cached maps), at `lr` (and
    `optimizer`, default the stage's). Not in any paper: a CPU budget's way to give the objective of a
    paper's fine-tuning stage the epochs it cannot afford end to end (the papers fine-tune for 20–60
    epochs; a CPU comparison affords one or two). The lead has its own rate because a fine-tuning rate
    (MIA's and HAN's 2e-4) is sized for a CNN that moves under the heads; the papers train their heads on
    a fixed or fresh CNN at 1e-3."""
    optimizer = optimizer or stage.optimizer
    if epochs <= 0:
        return [stage]
    if stage.freeze_trunk and (lr, optimizer) == (stage.lr, stage.optimizer):  # more of the same stage
        return [dataclasses.replace(stage, epochs=stage.epochs + epochs)]
    lead = dataclasses.replace(
        stage, name=f"{stage.name}_frozen", epochs=epochs, freeze_trunk=True, lr=lr, optimizer=optimizer
    )
    return [lead, stage]


class Method(nn.Module):
    """Base class: the contract above, plus helpers the engine uses."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    trunk_modules: ClassVar[tuple[str, ...]] = ("backbone",)  # run by `image_trunk`; freeze_trunk freezes it

    def __init__(self, cfg: Any, info: DataInfo) -> None:
        super().__init__()
        self.cfg = cfg
        self.info = info

    # ---- the contract -------------------------------------------------------------------------
    def default_stages(self) -> list[Stage]:
        """The paper's schedule and recipe (optimiser, rates, epochs, batch size)."""
        raise NotImplementedError

    def stages(self, train: TrainConfig | None = None) -> list[Stage]:
        """`default_stages` with the engine's overrides applied, the only place they are applied."""
        return apply_overrides(self.default_stages(), train or TrainConfig())

    def pretrained_modules(self) -> tuple[str, ...]:
        """Submodules that start from pretrained weights (they need not learn): the trunk when the
        config's `pretrained` is "imagenet". Methods with other pretrained parts (BERT) extend it."""
        return self.trunk_modules if getattr(self.cfg, "pretrained", "none") == "imagenet" else ()

    def encode_images(self, batch: Batch) -> Features:
        raise NotImplementedError

    def encode_texts(self, batch: Batch) -> Features:
        raise NotImplementedError

    def similarity(self, text_feats: Features, image_feats: Features) -> torch.Tensor:
        raise NotImplementedError

    def pair_similarity(self, text_feats: Features, image_feats: Features) -> torch.Tensor:
        n = next(iter(text_feats.values())).shape[0]
        rows = [slice(i, i + 1) for i in range(n)]
        pick = index_features
        scores = [self.similarity(pick(text_feats, r), pick(image_feats, r)) for r in rows]
        return torch.cat([s.reshape(-1) for s in scores])

    def shortlist_similarity(
        self, text_feats: Features, image_feats: Features, index: torch.Tensor, queries: str = "text"
    ) -> torch.Tensor:
        """Scores [n, K] of each query (the n texts, or with queries="image" the n images) with its K
        shortlisted items of the other side, rows `index` [n, K]. This default scores them as aligned
        pairs; cross-attention methods (`PairwiseMethod`) read each query once instead."""
        n, k = index.shape
        own = torch.arange(n, device=index.device).repeat_interleave(k)
        if queries == "text":
            pairs = index_features(text_feats, own), index_features(image_feats, index.reshape(-1))
        else:
            pairs = index_features(text_feats, index.reshape(-1)), index_features(image_feats, own)
        return self.pair_similarity(*pairs).reshape(n, k)

    def losses(self, batch: Batch, stage: Stage) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def image_trunk(self, batch: Batch) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The freezable CNN part of the image path; override when a stage freezes it."""
        raise NotImplementedError(f"{self.name} has no freezable image trunk")

    def init_from_vocab(self, words: list[str]) -> None:
        """Start the parts that depend on the vocabulary from pretrained values (none by default)."""

    def explain(self, text_feats: Features, image_feats: Features) -> Explanation | None:
        """The attention behind the first text's scores with every image; None = nothing to show."""
        return None

    @property
    def needs_pose(self) -> bool:
        """Whether `encode_images` reads `batch["pose"]` (PMA, unless its ablation switches drop pose), so
        that query computes pose maps for gallery images. A config may say so with its own `needs_pose`."""
        return bool(getattr(self.cfg, "needs_pose", False))

    @property
    def default_rerank(self) -> str | None:
        """The re-ranking the paper applies to this method's scores at test time (`ped eval --rerank auto`),
        by name in `pedcli.engine.retrieval.rerank` (NAFS: "rvn"); None for plain similarity."""
        return None

    @property
    def rerank_options(self) -> dict[str, Any]:
        """Keyword options of `default_rerank` (e.g. RVN's neighbours and weight)."""
        return {}

    # ---- helpers ------------------------------------------------------------------------------
    def trunk_output(self, batch: Batch) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """`batch["trunk"]` when the engine cached it, else computed now."""
        return batch["trunk"] if "trunk" in batch else self.image_trunk(batch)

    def trainable_parameters(self, stage: Stage) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs that learn in `stage`; everything else gets requires_grad=False."""
        learn = self.parameter_names(stage.trainable)
        learn -= self.parameter_names(stage.frozen + (self.trunk_modules if stage.freeze_trunk else ()))
        for pname, p in self.named_parameters():
            if pname in learn:
                yield pname, p

    def parameter_names(self, modules: tuple[str, ...]) -> set[str]:
        """Names of the parameters inside the named submodules ("*": all; a parameter name: itself)."""
        names = {n for n, _ in self.named_parameters()}
        if "*" in modules:
            return names
        out = set()
        for m in modules:
            inside = {n for n in names if n == m or n.startswith(m + ".")}
            if not inside and m not in dict(self.named_modules()):
                raise ValueError(f"{self.name} has no submodule or parameter '{m}' (a stage names it)")
            out |= inside
        return out

    @classmethod
    def upgrade_config(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """A run's saved options in this version's names, so that runs saved by an earlier version load."""
        return saved

    @classmethod
    def make_config(cls, overrides: dict[str, Any] | None = None) -> Any:
        """Build the method's config dataclass from defaults plus `overrides` (unknown keys are an error)."""
        overrides = dict(overrides or {})
        names = {f.name: f for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise PedError(
                f"unknown option(s) for method '{cls.name}': {', '.join(unknown)}",
                f"valid options: {', '.join(sorted(names))}",
            )
        return cls.Config(**overrides)


def require(checks: list[tuple[bool, str, str]]) -> None:
    """Raise a PedError for the first failed (condition, message, hint) of a config's option checks."""
    for ok, msg, hint in checks:
        if not ok:
            raise PedError(msg, hint or None)


def one_of(what: str, value: str, options: tuple[str, ...]) -> tuple[bool, str, str]:
    """The `require` check that an option `what` takes one of `options`."""
    return value in options, f"unknown {what} '{value}'", f"choose one of: {', '.join(options)}"


def index_features(feats: Features, index: slice | torch.Tensor) -> Features:
    """Select the same rows of every tensor in a feature dict (first dim = item)."""
    if isinstance(index, torch.Tensor):  # index_select is much faster than advanced indexing on CPU
        return {k: v.index_select(0, index) for k, v in feats.items()}
    return {k: v[index] for k, v in feats.items()}


_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method available as `ped train --method NAME`."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def method_class(name: str) -> type[Method]:
    from pedcli.models import methods  # noqa: F401  (imports every method module, filling the registry)

    if name not in _REGISTRY:
        raise PedError(f"unknown method '{name}'", f"choose one of: {', '.join(list_methods())}")
    return _REGISTRY[name]


def list_methods() -> list[str]:
    from pedcli.models import methods  # noqa: F401

    return sorted(_REGISTRY)


def create_method(name: str, info: DataInfo, overrides: dict[str, Any] | None = None) -> Method:
    cls = method_class(name)
    return cls(cls.make_config(overrides), info)
