"""HAN (pedcli/models/methods/han.py) and its similarity ranking loss, on tiny widths and 64×32 images."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from method_batch import TINY_INFO, tiny_batch

from pedcli.engine.runs import read_config
from pedcli.errors import PedError
from pedcli.models.losses import similarity_ranking_loss
from pedcli.models.methods.base import TrainConfig, create_method
from pedcli.models.methods.han import HANConfig

TINY = {
    "pretrained": "none",
    "embed_dim": 8,
    "word_dim": 6,
    "hidden": 5,
    "attention_dim": 4,
    "channel_reduction": 8,
}
MID, LAST = (96, 4, 2), (1280, 2, 1)  # mobilenet_v2's stride-16 and stride-32 maps of a 64×32 image


def make(**overrides):
    torch.manual_seed(0)
    return create_method("han", TINY_INFO, {**TINY, **overrides})


def trunk_batch():
    """A batch whose image path starts from cached (mid, last) trunk maps, as in a frozen-trunk stage."""
    g = torch.Generator().manual_seed(1)
    return {**tiny_batch(), "trunk": (torch.randn(6, *MID, generator=g), torch.randn(6, *LAST, generator=g))}


@pytest.fixture(scope="module")
def model():
    return make().eval()


# ---- similarity ranking loss (eqs. 14–15) ---------------------------------------------------------
# images I0 = (1, 0), I1 = (1, 1); captions T0 = (1, 0), T1 = (1, 3); two people.
# Distances: D(T0,I0) = 0, D(T1,I1) = 2, D(T0,I1) = 1, D(T1,I0) = 3. Intra-image cosine S = 1/√2.
IMAGES = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
TEXTS = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
PIDS = torch.tensor([0, 1])
W = 1.0 - 1.0 / math.sqrt(2.0)  # β − S with β = 1


def test_similarity_ranking_loss_weights_each_hinge_by_hand() -> None:
    # w · [α + D(pos) − D(neg)]+ : anchor T0: W·(1.5 + 0 − 1); anchor T1: W·(1.5 + 2 − 3)
    expected = (W * 0.5 + W * 0.5) / 2
    assert similarity_ranking_loss(IMAGES, TEXTS, PIDS, margin=1.5).item() == pytest.approx(expected)
    # a satisfied hinge contributes nothing, whatever its weight (the distance form kept it on)
    assert similarity_ranking_loss(IMAGES, TEXTS, PIDS, margin=0.5).item() == pytest.approx(0.0)


def test_similarity_ranking_loss_both_directions_by_hand() -> None:
    t2i = (W * 0.5 + W * 0.5) / 2
    # anchor I0 against T1: 1.5 + 0 − 3 < 0 → 0; anchor I1 against T0: W·(1.5 + 2 − 1)
    i2t = (0.0 + W * 2.5) / 2
    value = similarity_ranking_loss(IMAGES, TEXTS, PIDS, margin=1.5, directions="both")
    assert value.item() == pytest.approx(t2i + i2t)


def test_plain_ranking_loss_is_eq_14_by_hand() -> None:
    # weight 1: anchor T0: 1.5 + 0 − 1; anchor T1: 1.5 + 2 − 3
    value = similarity_ranking_loss(IMAGES, TEXTS, PIDS, margin=1.5, intra_similarity=False)
    assert value.item() == pytest.approx((0.5 + 0.5) / 2)


def test_near_duplicate_negatives_switch_off_and_opposite_ones_count_twice() -> None:
    # twin images (S = 1, w = 0): both anchors' hinges are violated, yet nothing is pushed
    twin = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    texts = torch.tensor([[2.0, 2.0], [5.0, 0.0]])  # hinges 1 + √2 − 0 and 1 + √13 − √17, both > 0
    assert similarity_ranking_loss(twin, texts, PIDS, margin=1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert similarity_ranking_loss(twin, texts, PIDS, margin=1.0, intra_similarity=False).item() > 1
    # opposite images (S = −1, w = 2): anchor T0 = (0, 0) is √2 from both, hinge α = 1; T1 = I1 satisfied
    opposite = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    texts = torch.tensor([[0.0, 0.0], [-1.0, -1.0]])
    assert similarity_ranking_loss(opposite, texts, PIDS, margin=1.0).item() == pytest.approx(2 * 1.0 / 2)
    plain = similarity_ranking_loss(opposite, texts, PIDS, margin=1.0, intra_similarity=False)
    assert plain.item() == pytest.approx(1.0 / 2)


def test_printed_form_weights_the_negative_term_inside_the_hinge_by_hand() -> None:
    # cosines: s(T0,I0) = 1, s(T0,I1) = 1/√2, s(T1,I1) = 4/√20, s(T1,I0) = 1/√10
    # [α − s(pos) + w·s(neg)]+ : anchor T0: 1.5 − 1 + W/√2; anchor T1: 1.5 − 4/√20 + W/√10
    expected = ((0.5 + W / math.sqrt(2)) + (1.5 - 4 / math.sqrt(20) + W / math.sqrt(10))) / 2
    value = similarity_ranking_loss(IMAGES, TEXTS, PIDS, margin=1.5, form="printed")
    assert value.item() == pytest.approx(expected)
    # S = 1 (twin images, w = 0) keeps the positive pair's own term: 1 − s(T1, I1) = 1 − 1/√2 for T1
    twin, texts = torch.tensor([[1.0, 1.0], [2.0, 2.0]]), torch.tensor([[2.0, 2.0], [5.0, 0.0]])
    value = similarity_ranking_loss(twin, texts, PIDS, margin=1.0, form="printed")
    assert value.item() == pytest.approx((0.0 + 1 - 1 / math.sqrt(2)) / 2)
    assert similarity_ranking_loss(twin, texts, PIDS, margin=1.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="form"):
        similarity_ranking_loss(IMAGES, TEXTS, PIDS, form="cosine")


def test_the_intra_modal_similarity_is_detached() -> None:
    images = torch.tensor([[1.0, 0.0], [0.6, 0.8]], requires_grad=True)
    similarity_ranking_loss(images, TEXTS, PIDS, margin=3.0).backward()
    fixed = images.detach().clone().requires_grad_(True)
    weight = (1.0 - F.normalize(images.detach(), dim=1) @ F.normalize(images.detach(), dim=1).t()).detach()
    dist = torch.cdist(TEXTS, fixed)
    hinge = (3.0 + dist.diagonal()[:, None] - dist).clamp(min=0) * (PIDS[:, None] != PIDS[None, :])
    (weight * hinge).sum(1).mean().backward()
    torch.testing.assert_close(images.grad, fixed.grad)  # no gradient through S


def test_similarity_ranking_loss_skips_same_person_pairs_and_keeps_finite_gradients() -> None:
    images = IMAGES.clone().requires_grad_(True)
    value = similarity_ranking_loss(images, TEXTS, torch.tensor([4, 4]), margin=0.5)
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(images.grad).all()


# ---- the model --------------------------------------------------------------------------------------
def test_two_stage_schedule_of_the_paper() -> None:
    stage1, stage2 = make().stages(TrainConfig())
    assert (stage1.losses, stage1.epochs, stage1.lr) == (("cls",), 80, 1e-3)  # sec. 4.2
    assert (stage2.losses, stage2.epochs, stage2.lr) == (("rank", "cls"), 60, 2e-4)
    assert stage1.trainable == stage2.trainable == ("*",)


def test_forward_backward_and_feature_shapes() -> None:
    m = make()
    batch = tiny_batch()
    stage1, stage2 = m.stages(TrainConfig())
    assert set(m.losses(batch, stage1)) == {"cls"}
    losses = m.losses(batch, stage2)
    assert set(losses) == {"rank", "cls"}
    sum(losses.values()).backward()
    for name in (
        "backbone",
        "spatial_attention",
        "channel_attention",
        "text_encoder",
        "word_attention",
        "cross_modal",
        "fc2",
        "classifier",
    ):
        grads = [p.grad for p in getattr(m, name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    m.eval()
    with torch.no_grad():
        img, txt = m.encode_images(batch), m.encode_texts(batch)
    assert img["global"].shape == txt["global"].shape == (6, 8)
    assert img["spatial_attention"].shape == (6, 2, 1)  # the last map's size


def test_cross_modal_attention_weights_are_shared_by_both_modalities(model) -> None:
    # eqs. 10-13 with one W: zero it and both modalities' features are scaled by exactly 1 + sigmoid(0)
    m = make().eval()
    torch.nn.init.zeros_(m.cross_modal.fc.weight)
    torch.nn.init.zeros_(m.cross_modal.fc.bias)
    x = torch.randn(3, 8)
    assert torch.allclose(m.cross_modal(x), 1.5 * x)
    assert sum(1 for mod in m.modules() if type(mod).__name__ == "CrossModalAttention") == 1


def test_cubic_attention_is_eq_3() -> None:
    m = make(residual_weight=0.3).eval()
    for layer in (m.channel_attention.mlp[-1], m.spatial_attention.conv):  # both attentions → sigmoid(0)
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    mid, last = trunk_batch()["trunk"]
    att, spatial = m.cubic_attention(mid, last)
    assert torch.allclose(att, (0.5 * 0.5 + 0.3) * last)  # A_c ⊗ F ⊗ A_s + b·F
    assert torch.allclose(spatial, torch.full((6, 2, 1), 0.5))


def test_spatial_attention_comes_from_the_mid_level_map() -> None:
    batch = trunk_batch()
    mid, last = batch["trunk"]
    moved = {**batch, "trunk": (mid + torch.randn_like(mid), last)}
    for source, should_change in (("mid", True), ("last", False)):
        m = make(spatial_source=source).eval()
        with torch.no_grad():
            a, b = m.encode_images(batch), m.encode_images(moved)
        assert (not torch.allclose(a["spatial_attention"], b["spatial_attention"])) == should_change
        assert ((a["spatial_attention"] > 0) & (a["spatial_attention"] < 1)).all()


def test_word_attention_sums_to_one_over_the_valid_words(model) -> None:
    batch = tiny_batch()
    with torch.no_grad():
        _, alpha = model.text_semantic(batch)
    mask = torch.arange(8)[None, :] < batch["lengths"][:, None]
    assert torch.allclose(alpha.sum(1), torch.ones(6))  # eq. 8
    assert (alpha * ~mask).abs().max() == 0


def test_similarity_is_negative_euclidean_distance_and_matches_pair_similarity(model) -> None:
    batch = trunk_batch()
    with torch.no_grad():
        txt, img = model.encode_texts(batch), model.encode_images(batch)
        sim, pair = model.similarity(txt, img), model.pair_similarity(txt, img)
        own = model.similarity(img, img)  # an image against itself: distance 0, the best score
    assert sim.shape == (6, 6) and (sim <= 0).all()
    assert torch.allclose(sim.diagonal(), pair, atol=1e-5)
    assert torch.allclose(own.diagonal(), torch.zeros(6), atol=1e-3)
    assert (own.argmax(1) == torch.arange(6)).all()


def test_unidirectional_lstm_reads_only_the_preceding_words() -> None:
    m = make(bidirectional=False, self_attention=False).eval()
    batch = tiny_batch()
    changed = batch["tokens"].clone()
    changed[0, 6] = 3 if changed[0, 6] != 3 else 4  # the last word of caption 0 (length 7)
    with torch.no_grad():
        h, _, _ = m.text_encoder(batch["tokens"], batch["lengths"])
        h2, _, _ = m.text_encoder(changed, batch["lengths"])
    forward = slice(0, 5)  # hidden = 5 per direction; the model reads only this half
    assert torch.allclose(h[0, :6, forward], h2[0, :6, forward])
    assert not torch.allclose(h[0, :6, 5:], h2[0, :6, 5:])  # the backward half would have seen it


@pytest.mark.parametrize(
    ("overrides", "stage_losses"),
    [
        ({"spatial_attention": False}, [("cls",), ("rank", "cls")]),  # Table 2: ResNet50 + CA
        ({"channel_attention": False}, [("cls",), ("rank", "cls")]),  # + SA
        ({"spatial_attention": False, "channel_attention": False}, [("cls",), ("rank", "cls")]),  # plain
        ({"spatial_source": "last"}, [("cls",), ("rank", "cls")]),  # SA + CA on conv5
        ({"bidirectional": False}, [("cls",), ("rank", "cls")]),  # Table 3
        ({"self_attention": False}, [("cls",), ("rank", "cls")]),
        ({"cross_modal_attention": False}, [("cls",), ("rank", "cls")]),  # Table 4
        ({"ranking": "plain"}, [("cls",), ("rank", "cls")]),  # Table 5
        ({"ranking": "none"}, [("cls",), ("cls",)]),
        ({"classification": False}, [("rank",)]),
        ({"rank_directions": "both"}, [("cls",), ("rank", "cls")]),
        ({"stage1_freeze_trunk": True, "stage2_freeze_trunk": True}, [("cls",), ("rank", "cls")]),
        ({"stage2_frozen_epochs": 2}, [("cls",), ("rank", "cls"), ("rank", "cls")]),
        ({"stage2_frozen_epochs": 2, "classification": False}, [("rank",), ("rank",)]),
        ({"normalize": True}, [("cls",), ("rank", "cls")]),
    ],
)
def test_every_ablation_switch_builds_and_trains(overrides, stage_losses) -> None:
    m = make(**overrides)
    batch = trunk_batch()
    stages = m.stages(TrainConfig(epochs=1))
    assert [s.losses for s in stages] == stage_losses
    for stage in stages:
        out = m.losses(batch, stage)
        assert set(out) == set(stage.losses)
        total = sum(out.values())
        assert torch.isfinite(total)
        total.backward()
    with torch.no_grad():
        assert m.eval().encode_texts(batch)["global"].shape == (6, 8)


@pytest.mark.parametrize(("first", "second"), [(True, False), (False, True), (True, True)])
def test_frozen_stages_leave_the_backbone_out(first: bool, second: bool) -> None:
    m = make(stage1_freeze_trunk=first, stage2_freeze_trunk=second)
    for stage, frozen in zip(m.stages(TrainConfig()), (first, second), strict=True):
        assert stage.freeze_trunk == frozen
        learning = {name.split(".")[0] for name, _ in m.trainable_parameters(stage)}
        assert ("backbone" in learning) != frozen and "text_encoder" in learning


def test_stage2_frozen_epochs_run_the_joint_loss_on_the_frozen_cnn_first() -> None:
    m = make(stage2_frozen_epochs=3)
    stages = m.stages(TrainConfig())
    assert [(s.name, s.epochs, s.freeze_trunk) for s in stages] == [
        ("classification", 80, False), ("joint_frozen", 3, True), ("joint", 60, False)
    ]  # fmt: skip
    assert "backbone" not in {name.split(".")[0] for name, _ in m.trainable_parameters(stages[1])}
    # the paper's SGD where the CNN learns; the lead on the frozen CNN with Adam at `frozen_lr`
    assert [(s.optimizer, s.lr) for s in stages] == [("sgd", 1e-3), ("adam", 5e-4), ("sgd", 2e-4)]
    assert [s.momentum for s in stages[::2]] == [0.5, 0.9]
    # a lead with the stage's own recipe is more of the same stage
    frozen = make(stage2_frozen_epochs=3, stage2_freeze_trunk=True).stages(TrainConfig())
    assert [(s.name, s.epochs, s.freeze_trunk, s.optimizer, s.lr) for s in frozen][1:] == [
        ("joint", 63, True, "adam", 5e-4)
    ]  # fmt: skip


def test_frozen_stages_train_with_the_frozen_recipe() -> None:
    both = {"stage1_freeze_trunk": True, "stage2_freeze_trunk": True}
    assert [(s.optimizer, s.lr) for s in make(**both).stages(TrainConfig())] == [("adam", 5e-4)] * 2
    paper = make(**both, frozen_optimizer="sgd", frozen_lr=1e-3).stages(TrainConfig())
    assert [(s.optimizer, s.lr, s.momentum) for s in paper] == [("sgd", 1e-3, 0.5), ("sgd", 1e-3, 0.9)]
    assert [(s.optimizer, s.lr) for s in make(stage1_freeze_trunk=True).stages(TrainConfig())] == [
        ("adam", 5e-4), ("sgd", 2e-4)
    ]  # fmt: skip
    with pytest.raises(PedError, match="frozen_optimizer"):
        make(frozen_optimizer="rmsprop")


def test_normalize_puts_features_on_the_unit_sphere() -> None:
    m = make(normalize=True).eval()
    batch = trunk_batch()
    with torch.no_grad():
        txt, img = m.encode_texts(batch), m.encode_images(batch)
    assert torch.allclose(txt["global"].norm(dim=1), torch.ones(6), atol=1e-5)
    # on the sphere, Euclidean ranking is cosine ranking: the engine's cosine shortlist is exact
    cos = txt["global"] @ img["global"].t()
    assert torch.equal(m.similarity(txt, img).argsort(1), cos.argsort(1))


def test_explain_returns_the_spatial_attention(model) -> None:
    batch = trunk_batch()
    with torch.no_grad():
        img = model.encode_images(batch)
        out = model.explain(model.encode_texts(batch), img)
    a = img["spatial_attention"]
    assert torch.equal(torch.from_numpy(out.grid), a.reshape(a.shape[0], *a.shape[-2:]))
    assert make(spatial_attention=False).explain({}, {"global": torch.zeros(1, 8)}) is None


# ---- scale and eq. 2 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [256, 512, 1024, 2048])
def test_first_ranking_loss_of_an_untrained_model_is_bounded_at_any_width(width: int) -> None:
    # trunk maps in MobileNetV2's ReLU6 range, all positive like photographs' (the intra-image
    # similarity is then high, which made the old distance form grow to ~100-200 here, as ~545 on photos).
    # Bound: at initialisation positive and negative distances are alike, so each hinge is about α and
    # its weight at most 2: the loss stays below 2α per negative, 2α(B − 1) in all.
    g = torch.Generator().manual_seed(1)
    batch = {
        **tiny_batch(),
        "trunk": (6 * torch.rand(6, *MID, generator=g), 6 * torch.rand(6, *LAST, generator=g)),
    }
    m = make(embed_dim=width)
    rank = m.losses(batch, m.stages()[-1])["rank"].item()
    assert 0 < rank <= 2 * m.cfg.margin * (6 - 1)


def test_channel_relu_false_is_eq_2_as_printed() -> None:
    # without the ReLU, sigmoid⁻¹ of the weights is affine in the [avg; max] descriptors
    x = torch.rand(1, 5, 1280)
    for relu, affine in ((False, True), (True, False)):
        ca = make(channel_relu=relu).channel_attention
        with torch.no_grad():
            logit = [torch.logit(ca(k * x)) for k in (0.0, 1.0, 2.0)]
        assert torch.allclose(logit[2] - logit[1], logit[1] - logit[0], atol=1e-4) == affine


def test_a_run_saved_before_the_frozen_recipe_loads_with_the_recipe_it_trained_with(tmp_path) -> None:
    saved = {k: v for k, v in asdict(HANConfig()).items() if not k.startswith("frozen_")}
    saved |= {"stage2_frozen_lr": 2e-3, "stage2_frozen_epochs": 3}  # an earlier version's run
    (tmp_path / "config.json").write_text(json.dumps({"method": "han", "method_config": saved}))
    upgraded = read_config(tmp_path)["method_config"]
    assert "stage2_frozen_lr" not in upgraded
    recipe = {k: upgraded[k] for k in ("optimizer", "frozen_optimizer", "frozen_lr", "stage2_frozen_epochs")}
    lead = make(**recipe).stages(TrainConfig())[1]
    assert (lead.name, lead.optimizer, lead.lr, lead.momentum) == ("joint_frozen", "sgd", 2e-3, 0.9)
    current = {"method": "han", "method_config": asdict(HANConfig())}  # runs saved now pass unchanged
    (tmp_path / "config.json").write_text(json.dumps(current))
    assert read_config(tmp_path) == current
