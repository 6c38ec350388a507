"""The method contract (pedcli/models/methods/base.py), checked for every registered method on tiny widths.

Like timm's tests over `list_models()`: a method that registers itself gets these tests for free (with its
default options until it adds narrow ones to TINY_OPTIONS). The per-method files test the papers'
equations; this file tests what the engine relies on whatever the method:

- features are per item, with a `global` vector (the shortlist) and boolean `*_mask`s;
- `pair_similarity` is the diagonal of `similarity`, `shortlist_similarity` reads the shortlisted scores,
  and none depends on how the engine chunks or on float16 storage of the image features;
- scores ignore padding: extra padding in a caption, and the other items of a batch (`ped embed` pads
  each batch to its longest caption, then zero-pads the batches to one width);
- `explain` gives None or an `Explanation` of every image; `default_rerank` names a re-ranker that runs;
- the frozen-trunk cache (`image_trunk` → `batch["trunk"]`) gives every feature of the full forward pass,
  and images need pose maps only when `needs_pose` says so;
- bad options are refused with a clear message (what is wrong, and a fix);
- a checkpoint (config through JSON, weights through `save_checkpoint`) gives identical scores;
- every stage of the schedule returns finite losses whose gradients reach exactly its trainable parameters,
  and every parameter of the test score learns in some stage or starts pretrained.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from method_batch import TINY_INFO, TINY_LENGTHS, repad, tiny_batch, with_phrases, with_pose, with_word_pieces

from pedcli.engine.embed import stack_padded
from pedcli.engine.evaluate import RERANKERS
from pedcli.engine.runs import load_checkpoint, save_checkpoint
from pedcli.engine.stages import complete_stage, set_trainable, train_mode
from pedcli.errors import PedError
from pedcli.models.explanation import Explanation
from pedcli.models.methods import Method, create_method, list_methods, method_class
from pedcli.models.methods.base import Batch, Features, TrainConfig, index_features

# The project's methods (test modules may register toy methods of their own).
METHODS = [n for n in list_methods() if method_class(n).__module__.startswith("pedcli.models.methods.")]
# Narrow widths, so that each model builds and runs in well under a second (BERT: one small layer).
TINY_OPTIONS: dict[str, dict] = {
    "baseline": {"embed_dim": 8, "hidden": 6, "word_dim": 5},
    "han": {"embed_dim": 8, "word_dim": 6, "hidden": 5, "attention_dim": 4, "channel_reduction": 8},
    # a 64-pixel-high image's last map has 4 rows: at most 4 stripes
    "mgel": {"embed_dim": 8, "word_dim": 6, "channel_reduction": 4, "granularities": [1, 2, 4]},
    "mia": {"embed_dim": 8, "hidden": 6, "word_dim": 5, "mlp_hidden": 7},
    "nafs": {"bert_random_init": True, "bert_layers": 1, "bert_hidden": 32, "embed_dim": 16},
    "pma": {"embed_dim": 8, "hidden": 6, "word_dim": 5, "pose_widths": [4, 4, 4, 4]},
}
# Switches that change how scores are computed: the scoring contract is checked with each of them too.
SCORING_VARIANTS: dict[str, list[dict]] = {
    "han": [{"normalize": True}],
    "mia": [{"relation": False}, {"fine": False}, {"units": "words"}, {"score": "local"}],
    "nafs": [
        {"alignment": "separate"},
        {"test_score": "paper"},
        {"nonlocal_attention": False},
        {"test_score": "mean", "attention_norm": "paper", "focal": True},
    ],
    "pma": [{"fa_pose": False}, {"fa_units": "words"}, {"coarse": False}, {"ca_attention": "top_m"}],
}
# Values each method must refuse (an unknown option is checked for every method).
BAD_OPTIONS: dict[str, list[dict]] = {
    "baseline": [{"cell": "gru2"}, {"backbone": "vit"}, {"embed_dim": 0}, {"margin": -1},
                 {"ranking_weight": 0, "id_weight": 0}, {"frozen_epochs": 0, "full_epochs": 0}],
    "han": [{"spatial_source": "low"}, {"ranking": "hinge"}, {"rank_directions": "i2t"},
            {"ranking": "none", "classification": False}, {"backbone": "alexnet"}],
    "mgel": [{"granularities": ()}, {"granularities": (2, 2)}, {"pooling": "sum"}, {"embed_dim": 7},
             {"triplet": False, "identity": False, "pal": False}],
    "mia": [{"units": "characters"}, {"score": "best"}, {"schedule": "random"}, {"step1_objectives": "none"},
            {"global_contrast": False, "relation": False, "fine": False},
            {"relation": False, "score": "relation"}, {"parts": 0}, {"backbone": "alexnet"}],
    "nafs": [{"alignment": "both"}, {"image_scales": ["patch"]}, {"text_scales": ["words"]},
             {"alignment": "separate", "image_scales": ["global", "patch"]}, {"staircase": False},
             {"test_score": "max"}, {"backbone": "vit"}, {"lambda_softmax": 0}],
    "pma": [{"ca_attention": "max"}, {"fa_units": "chars"}, {"pose_widths": [4, 4]}, {"ca_top_m": 25},
            {"backbone": "vit"}],
}  # fmt: skip
N_PHRASES = (2, 1, 2, 0, 3, 1)  # caption 3 has no noun phrase
N_SPANS = (2, 1, 0, 2, 2, 1)  # caption 2 has no sub-sentence
SHORT = [2, 5]  # the two shortest captions: a batch of them is padded to 3 words, the others to 7


def contract_batch(seed: int = 0) -> Batch:
    """method_batch's 6 (image, caption) pairs with every key a method may read: pose maps (1/8 of the
    image), noun phrases and BERT word pieces."""
    return with_pose(with_word_pieces(with_phrases(tiny_batch(seed), N_PHRASES), N_SPANS), seed)


def make(name: str, overrides: dict | None = None, seed: int = 0) -> Method:
    """The method on tiny widths; the CNN keeps its ImageNet weights (offline): a fresh MobileNetV2's
    eval-mode maps are ~0, which would make every image look alike."""
    torch.manual_seed(seed)
    return create_method(name, TINY_INFO, {**TINY_OPTIONS.get(name, {}), **(overrides or {})})


def features(model: Method, batch: Batch) -> tuple[Features, Features]:
    with torch.no_grad():
        return model.encode_texts(batch), model.encode_images(batch)


def scores(model: Method, text: Features, image: Features) -> torch.Tensor:
    with torch.no_grad():
        return model.similarity(text, image)


def subset(batch: Batch, rows: list[int]) -> Batch:
    return {k: v[rows] for k, v in batch.items()}


def embedded(model: Method, batch: Batch, encode: str) -> Features:
    """Features of the batch encoded as `ped embed` does it: in two batches (the short captions, then the
    rest), zero-padded to one width by the engine's `stack_padded`, then put back in the batch's order."""
    rest = [i for i in range(len(TINY_LENGTHS)) if i not in SHORT]
    with torch.no_grad():
        parts = [getattr(model, encode)(subset(batch, rows)) for rows in (SHORT, rest)]
    joined = {k: stack_padded([p[k] for p in parts]) for k in parts[0]}
    return index_features(joined, torch.tensor(SHORT + rest).argsort())


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> bool:
    """Equal up to float32 summation order: with two threads PMA's fine scores of one pair computed in
    differently shaped batches differed by 1e-4 (a padding bug moves them by far more)."""
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=1e-4)


SCORING = [(n, {}) for n in METHODS] + [(n, o) for n in METHODS for o in SCORING_VARIANTS.get(n, [])]


@pytest.fixture(scope="module", params=SCORING, ids=[f"{n}-{json.dumps(o)}" if o else n for n, o in SCORING])
def scored(request: pytest.FixtureRequest) -> tuple[Method, Features, Features, torch.Tensor]:
    """(model in eval mode, text features, image features, similarity) of the contract batch."""
    name, overrides = request.param
    model = make(name, overrides).eval()
    text, image = features(model, contract_batch())
    return model, text, image, scores(model, text, image)


@pytest.fixture(scope="module", params=METHODS)
def model(request: pytest.FixtureRequest) -> Method:
    return make(request.param).eval()


# ---- features and scoring --------------------------------------------------------------------------------
def test_features_are_per_item_with_a_global_vector(scored) -> None:
    """`ped embed` stores every tensor row by row, and the shortlist is the cosine of the `global` rows."""
    _, text, image, _ = scored
    for side in (text, image):
        assert side["global"].dim() == 2 and side["global"].is_floating_point()
        assert all(v.shape[0] == len(TINY_LENGTHS) for v in side.values())
        masks = [k for k in side if k.endswith("_mask")]
        assert all(side[k].dtype == torch.bool and k.removesuffix("_mask") in side for k in masks), masks


def test_pair_similarity_is_the_diagonal_of_similarity(scored) -> None:
    model, text, image, sim = scored
    n = len(TINY_LENGTHS)
    assert sim.shape == (n, n) and torch.isfinite(sim).all()
    assert sim.std() > 1e-3  # images and captions are told apart, so the checks below can fail
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        assert close(model.pair_similarity(text, image), sim.diagonal())
        assert close(model.pair_similarity(text, index_features(image, perm)), sim[torch.arange(n), perm])


def test_scores_do_not_depend_on_the_engines_chunks(scored, monkeypatch) -> None:
    """The engine scores blocks of texts × images; a method may cut them further under its score_budget."""
    model, text, image, sim = scored
    blocks = [
        [scores(model, index_features(text, t), index_features(image, i)) for i in (slice(0, 4), slice(4, 6))]
        for t in (slice(0, 1), slice(1, 6))
    ]
    assert close(torch.cat([torch.cat(row, 1) for row in blocks]), sim)
    if hasattr(model, "score_budget"):  # cross-attention methods (PairwiseMethod): one text per sub-chunk
        monkeypatch.setattr(model, "score_budget", 1)
        assert close(scores(model, text, image), sim)


def test_scores_survive_float16_storage(scored) -> None:
    """`ped embed` stores floating features as float16 by default; the engine reads them back as float32."""
    model, text, image, sim = scored
    stored = {k: v.half().float() if v.is_floating_point() else v for k, v in image.items()}
    assert close(scores(model, text, stored), sim, atol=5e-2 * max(1.0, float(sim.abs().max())))


def test_shortlist_similarity_reads_the_shortlisted_scores(scored) -> None:
    model, text, image, sim = scored
    index = torch.tensor([[5, 0, 2], [1, 1, 4], [0, 3, 5], [2, 4, 1], [3, 5, 0], [4, 2, 3]])
    rows = torch.arange(len(TINY_LENGTHS))[:, None]
    with torch.no_grad():
        assert close(model.shortlist_similarity(text, image, index), sim[rows, index])
        assert close(model.shortlist_similarity(text, image, index, queries="image"), sim.T[rows, index])


def test_the_default_rerank_applies_to_the_scores(scored) -> None:
    """`ped eval` re-ranks by `default_rerank` with `rerank_options` unless told `--rerank none`."""
    model, text, image, sim = scored
    if model.default_rerank is None:
        assert model.rerank_options == {}
        return
    rerank = RERANKERS[model.default_rerank]
    out = rerank(sim, text["global"], image["global"], **model.rerank_options)
    assert out.shape == sim.shape and torch.isfinite(out).all()


def test_scores_ignore_padding_and_the_rest_of_the_batch(scored) -> None:
    model, text, image, sim = scored
    batch = contract_batch()
    padded, _ = features(model, repad(batch, 12))  # more padding in tokens, word pieces, phrases, spans
    assert close(scores(model, padded, image), sim)
    texts, images = embedded(model, batch, "encode_texts"), embedded(model, batch, "encode_images")
    assert close(scores(model, texts, images), sim)
    with torch.no_grad():
        assert close(model.pair_similarity(texts, images), sim.diagonal())


def test_explain_covers_every_image_or_says_nothing(scored) -> None:
    """`ped query --html` and `ped serve` draw any method's `Explanation` of one query against a ranking."""
    model, text, image, _ = scored
    with torch.no_grad():
        out = model.explain(index_features(text, slice(2, 3)), image)
    if out is not None:
        assert isinstance(out, Explanation) and out.label
        assert out.size == len(TINY_LENGTHS)


# ---- the frozen-trunk cache and pose -------------------------------------------------------------------
def test_the_cached_trunk_gives_the_features_of_the_full_forward_pass(model) -> None:
    """All feature keys, from the trunk outputs as the engine stores them on CPU (float32 .npy)."""
    frozen = [s.name for s in model.stages(TrainConfig()) if s.freeze_trunk]
    if type(model).image_trunk is Method.image_trunk:
        assert not frozen, f"stages {frozen} freeze the trunk, but {model.name} has no image_trunk"
        pytest.skip(f"{model.name} has no freezable trunk")
    batch = contract_batch()
    with torch.no_grad():
        direct = model.encode_images(batch)
        out = model.image_trunk(batch)
        outs = out if isinstance(out, tuple) else (out,)
        stored = tuple(torch.from_numpy(np.array(t.numpy(), dtype=np.float32)) for t in outs)
        trunk = stored if isinstance(out, tuple) else stored[0]
        cached = model.encode_images({k: v for k, v in batch.items() if k != "image"} | {"trunk": trunk})
    assert direct["global"].std(0).max() > 1e-3  # the images are told apart
    assert set(cached) == set(direct)
    for key, value in direct.items():
        assert close(cached[key], value, atol=1e-6), key


def test_images_need_pose_maps_only_when_the_method_says_so(model) -> None:
    """`ped query` computes pose maps for a gallery only for methods whose `needs_pose` is true."""
    batch = contract_batch()
    del batch["pose"]
    if model.needs_pose:
        with pytest.raises(PedError, match="pose"):
            features(model, batch)
    else:
        _, image = features(model, batch)
        assert set(image) >= {"global"}


# ---- options and checkpoints ---------------------------------------------------------------------------
BAD = [(n, {"no_such_option": 1}) for n in METHODS]
BAD += [(n, b) for n in METHODS for b in BAD_OPTIONS.get(n, [])]


@pytest.mark.parametrize(("name", "bad"), BAD, ids=[f"{n}-{json.dumps(b)}" for n, b in BAD])
def test_bad_options_are_refused_with_a_clear_message(name: str, bad: dict) -> None:
    with pytest.raises(PedError) as err:
        make(name, bad)
    message = str(err.value)
    assert any(key in message for key in bad), f"the message does not name the option: {message}"
    assert err.value.hint, f"no fix is suggested: {message}"
    if "no_such_option" in bad:
        fields = [f.name for f in dataclasses.fields(method_class(name).Config)]
        assert name in message and all(f in err.value.hint for f in fields)


def test_a_checkpoint_gives_identical_scores(model, tmp_path: Path) -> None:
    """The engine's round trip: the config through JSON (config.json), the weights through
    `save_checkpoint` / `load_checkpoint`, into a model built afresh with other random weights."""
    config = json.loads(json.dumps(dataclasses.asdict(model.cfg), default=str))
    rebuilt = create_method(model.name, TINY_INFO, config)
    assert json.dumps(dataclasses.asdict(rebuilt.cfg), default=str) == json.dumps(config)
    rebuilt.eval()
    batch = contract_batch()
    expected = scores(model, *features(model, batch))
    torch.manual_seed(1)
    for p in rebuilt.parameters():  # other weights everywhere, pretrained parts included
        torch.nn.init.normal_(p, std=0.1)
    assert not close(scores(rebuilt, *features(rebuilt, batch)), expected)
    save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict()})
    rebuilt.load_state_dict(load_checkpoint(tmp_path / "best.pt")["model"])
    assert torch.equal(scores(rebuilt, *features(rebuilt, batch)), expected)


# ---- training ------------------------------------------------------------------------------------------
def test_every_parameter_of_the_score_learns_or_starts_pretrained(scored) -> None:
    """`ped train` refuses a schedule that would leave part of the test score at its random init."""
    model = scored[0]
    complete_stage(model, model.stages(TrainConfig()), contract_batch())


@pytest.mark.parametrize("name", METHODS)
def test_every_stage_gives_finite_losses_that_reach_its_trainable_parameters(name: str) -> None:
    """Each stage as the engine runs it: its trainable set, frozen parts in eval mode, and the trunk
    output in the batch (computed once in eval mode) when the stage freezes the trunk."""
    method = make(name)
    stages = method.stages(TrainConfig(epochs=1))
    assert stages and all(s.losses for s in stages)
    for stage in stages:
        trainable = dict(set_trainable(method, stage))
        assert trainable, stage.name
        batch = contract_batch()
        if stage.freeze_trunk:
            method.eval()
            with torch.no_grad():
                batch["trunk"] = method.image_trunk(batch)
            del batch["image"]
        train_mode(method)
        method.zero_grad(set_to_none=True)
        out = method.losses(batch, stage)
        missing = set(stage.losses) - set(out)
        assert not missing, f"stage '{stage.name}' gave no {missing}"
        for loss in stage.losses:
            assert out[loss].dim() == 0 and torch.isfinite(out[loss]), (stage.name, loss)
            assert out[loss].requires_grad, f"{stage.name}: {loss} reaches no trainable parameter"
        sum(out[loss] for loss in stage.losses).backward()
        grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
        assert set(grads) <= set(trainable), f"{stage.name}: frozen parameters got gradients"
        assert all(torch.isfinite(g).all() for g in grads.values()), stage.name
        assert any(g.abs().sum() > 0 for g in grads.values()), stage.name
