"""PMA (pedcli/models/methods/pma.py): its equations on hand-made tensors, then the model on tiny widths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from method_batch import TINY_INFO, tiny_batch, with_phrases, with_pose

from pedcli.data.schema import KEYPOINTS
from pedcli.errors import PedError
from pedcli.models.methods import pma
from pedcli.models.methods.base import Batch, TrainConfig, create_method
from pedcli.pose.keypoints import PARTS

TINY = {"embed_dim": 8, "hidden": 6, "word_dim": 5, "pose_widths": [4, 4, 4, 4]}
N_PHRASES = (2, 1, 2, 0, 3, 1)  # caption 3 has no noun phrase


def pma_batch(seed: int = 0) -> Batch:
    """method_batch's 6 pairs plus 1/8-resolution pose maps and noun-phrase spans inside each caption."""
    return with_pose(with_phrases(tiny_batch(seed), N_PHRASES), seed)


def make(**overrides):
    torch.manual_seed(0)
    return create_method("pma", TINY_INFO, {**TINY, **overrides})


def features(model, batch: Batch | None = None):
    batch = pma_batch() if batch is None else batch
    with torch.no_grad():
        return model.encode_texts(batch), model.encode_images(batch)


@pytest.fixture(scope="module")
def model():
    return make().eval()  # ImageNet MobileNetV2 (offline): an untrained CNN's eval-mode maps are ~0


# ---- coarse alignment, eqs. 7–9 --------------------------------------------------------------------
def test_hard_attention_keeps_exactly_the_regions_at_or_above_tau() -> None:
    s = torch.zeros(3, 24)
    # exp weights e², e^0.5, 22 × 1: mean 1.29 < e^0.5 = 1.65, so region 1 passes τ = 1/24 as well ...
    s[0, 0], s[0, 1] = 2.0, 0.5
    # ... but next to e³ the mean is 1.82 > 1.65: the same cosine 0.5 is now dropped (τ is relative)
    s[1, 0], s[1, 1] = 3.0, 0.5
    # row 2: all equal, every q = τ exactly: eq. 9's ≥ keeps all of them
    w = pma.coarse_attention(s, "hard")
    assert w[0].nonzero().flatten().tolist() == [0, 1]
    assert w[1].nonzero().flatten().tolist() == [0]
    assert w[2].tolist() == [1.0] * 24
    q = torch.softmax(s[:2], dim=1)
    assert torch.equal(w[:2] > 0, q >= 1 / 24)
    assert ((w * s).sum(1)[:2] == torch.tensor([2.5, 3.0])).all()  # eq. 9: S_ca sums the kept s_ij


def test_soft_and_top_m_attention() -> None:
    s = torch.randn(2, 24)
    assert torch.allclose(pma.coarse_attention(s, "soft"), torch.softmax(s, dim=1))
    top = pma.coarse_attention(s, "top_m", top_m=5)
    assert (top.sum(1) == 5).all()
    assert torch.equal(top.bool(), s >= s.topk(5, dim=1).values[:, -1:])


def test_ca_score_sums_the_cosines_of_the_kept_regions(model) -> None:
    text, image = features(model)
    t, i = 2, 4
    s = F.cosine_similarity(text["sentence"][t][None], image["regions"][i], dim=1)  # eq. 7, [24]
    kept = torch.softmax(s, 0) >= 1 / 24  # eqs. 8–9
    ca = model._coarse(text, image, layout="all")[0]
    assert 0 < kept.sum() < 24
    assert ca[t, i].item() == pytest.approx(s[kept].sum().item(), abs=1e-5)


# ---- fine-grained alignment, eqs. 10–13 ------------------------------------------------------------
def test_fa_score_follows_eqs_10_to_13(model) -> None:
    text, image = features(model)
    t, i = 4, 5  # caption 4 has three phrases
    valid = text["phrases_mask"][t]
    phrases = text["phrases"][t][valid] * text["phrase_norms"][t][valid, None]  # stored as unit + norm
    total = 0.0
    for k in range(len(PARTS)):
        alpha = torch.softmax(F.cosine_similarity(image["parts"][i, k][None], phrases, dim=1), 0)  # eq. 11
        e_pn = (alpha[:, None] * phrases).sum(0)  # eq. 10
        total += F.cosine_similarity(e_pn, image["fa_parts"][i, k], dim=0).item()  # eqs. 12–13
    fa = model._fine_pose(text, image, layout="all")[0]
    assert fa[t, i].item() == pytest.approx(total, abs=1e-5)
    assert (fa[3] == 0).all()  # no noun phrase: nothing to align


def test_fa_image_side_attends_over_the_regions_by_pose_part(model) -> None:
    batch = pma_batch()
    with torch.no_grad():
        parts = model.pose_parts(batch)
        grid = model.image_trunk(batch)
        regions = model.fa_region_fc(grid.flatten(2).transpose(1, 2))
        fa_parts = model.encode_images(batch)["fa_parts"]
    alpha = torch.softmax(F.cosine_similarity(parts[1, 3][None], regions[1], dim=1), 0)
    assert torch.allclose(fa_parts[1, 3], F.normalize((alpha[:, None] * regions[1]).sum(0), dim=0), atol=1e-5)


def test_fa_without_pose_lets_each_phrase_attend_over_the_regions() -> None:
    m = make(fa_pose=False).eval()
    text, image = features(m)
    t, i = 0, 1
    cosines = []
    regions = image["fa_regions"][i] * image["fa_region_norms"][i, :, None]
    for e in text["phrases"][t][text["phrases_mask"][t]]:
        beta = torch.softmax(F.cosine_similarity(e[None], regions, dim=1), 0)
        cosines.append(F.cosine_similarity(e, (beta[:, None] * regions).sum(0), dim=0).item())
    fa = m._fine_no_pose(text, image, layout="all")[0]
    assert len(cosines) == 2 and fa[t, i].item() == pytest.approx(sum(cosines) / 2, abs=1e-5)


def test_body_parts_are_the_grouped_keypoint_maps(model) -> None:
    """FA sums the 14 maps into the 6 parts (group_parts): a knee-only pose changes leg and foot only."""
    batch = pma_batch()
    zero = {**batch, "pose": torch.zeros_like(batch["pose"])}
    knee = {**batch, "pose": torch.zeros_like(batch["pose"])}
    knee["pose"][:, KEYPOINTS.index("left_knee"), 1:3, 1:3] = 1.0
    with torch.no_grad():
        changed = (model.pose_parts(knee) - model.pose_parts(zero)).abs().amax(dim=(0, 2)) > 1e-6
    assert [p for p, c in zip(PARTS, changed.tolist(), strict=True) if c] == ["leg", "foot"]


def test_noun_phrases_are_encoded_on_their_own(model) -> None:
    batch = pma_batch()
    outside = batch["tokens"].clone()
    outside[4, 0] = 3 if outside[4, 0] != 3 else 4  # inside caption 4's first phrase only
    with torch.no_grad():
        before = model.encode_texts(batch)["phrases"][4]
        after = model.encode_texts({**batch, "tokens": outside})["phrases"][4]
    assert not torch.allclose(before[0], after[0])
    assert torch.allclose(before[1:], after[1:], atol=1e-6)  # context outside a phrase is not read


# ---- the model ---------------------------------------------------------------------------------------
def test_feature_shapes_and_schedule(model) -> None:
    text, image = features(model)
    assert {k: tuple(v.shape) for k, v in image.items()} == {
        "global": (6, 16), "regions": (6, 24, 8), "parts": (6, 6, 8), "fa_parts": (6, 6, 8)}  # fmt: skip
    assert {k: tuple(v.shape) for k, v in text.items()} == {"global": (6, 16), "sentence": (6, 8),
        "phrases": (6, 3, 8), "phrase_norms": (6, 3), "phrases_mask": (6, 3)}  # fmt: skip
    units = (
        image["regions"],
        image["parts"],
        image["fa_parts"],
        text["sentence"],
        text["phrases"][text["phrases_mask"]],
    )
    for unit in units:
        assert torch.allclose(unit.norm(dim=-1), torch.ones(()), atol=1e-5)  # cosines need no normalising
    assert text["phrases_mask"].sum(1).tolist() == list(N_PHRASES)
    assert model.backbone.stages[0][0][0].in_channels == 17  # image + 14 pose maps
    frozen, full = model.stages(TrainConfig())
    assert (frozen.freeze_trunk, frozen.lr, full.freeze_trunk, full.lr) == (True, 1e-3, False, 2e-4)
    learning = {name.split(".")[0] for name, _ in model.trainable_parameters(frozen)}
    assert "backbone" not in learning and {"pose_cnn", "text", "region_proj"} <= learning


ALL = {"ca_ranking", "ca_identity", "fa_ranking", "fa_identity", "part"}
POSE_FA = {"regions", "parts", "fa_parts"}
SWITCHES = [  # (overrides, losses, image feature keys besides "global")
    ({}, ALL, POSE_FA),
    ({"pose_concat": False}, ALL, POSE_FA),  # Table 3
    ({"coarse": False}, {"global_ranking", "global_identity", "fa_ranking", "fa_identity", "part"},
     {"avg", "parts", "fa_parts"}),  # Table 3
    ({"fine": False}, {"ca_ranking", "ca_identity"}, {"regions"}),  # Table 3
    ({"ca_attention": "soft"}, ALL, POSE_FA),  # Table 4
    ({"ca_attention": "top_m", "ca_top_m": 5}, ALL, POSE_FA),  # Table 4
    ({"fa_pose": False}, ALL - {"part"}, {"regions", "fa_regions", "fa_region_norms"}),  # Table 5
    ({"fa_units": "words"}, ALL, POSE_FA),  # Table 5
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "losses", "image_keys"), SWITCHES)
def test_every_switch_builds_and_takes_a_training_step(overrides, losses, image_keys) -> None:
    """Step 1 of the schedule (CNN frozen, its output cached as the engine does) with each switch."""
    m = make(pretrained="none", **overrides)
    batch = pma_batch()
    frozen, _ = m.stages(TrainConfig())
    with torch.no_grad():
        batch["trunk"] = m.image_trunk(batch)
    del batch["image"]
    opt = torch.optim.Adam([p for _, p in m.trainable_parameters(frozen)], lr=1e-2)
    out = m.losses(batch, frozen)
    assert set(out) == losses
    total = sum(out.values())
    assert torch.isfinite(total)
    before = [p.detach().clone() for p in m.region_proj.parameters()]
    total.backward()
    assert all(
        torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None
    )  # caption 3: no phrase
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, m.region_proj.parameters(), strict=True))
    m.eval()
    text, image = features(m, batch)
    assert set(image) == {"global"} | image_keys
    assert m.similarity(text, image).shape == (6, 6)


def _uniform(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    valid = mask.expand_as(x).float()
    return valid / valid.sum(-1, keepdim=True).clamp(min=1)


@pytest.mark.parametrize("overrides", [{}, {"coarse": False}, {"fine": False}])
def test_shortlist_feature_is_the_score_under_uniform_attention(overrides, monkeypatch) -> None:
    """The cosine shortlist reads "global": with every attention uniform, S = S_ca + λ3·S_fa is exactly
    the dot product of the text and image "global" (so it ranks as the score does, to first order)."""
    m = make(pretrained="none", **overrides).eval()
    monkeypatch.setattr(pma, "coarse_attention", lambda s, *a, **k: torch.full_like(s, 1 / s.shape[-1]))
    monkeypatch.setattr(pma.att, "masked_softmax", _uniform)
    text, image = features(m, pma_batch())
    with torch.no_grad():
        exact = m.similarity(text, image)
    assert exact.std() > 1e-3
    assert torch.allclose(text["global"] @ image["global"].T, exact, atol=1e-5)


def test_the_second_step_trains_the_cnn_through_both_branches() -> None:
    m = make(pretrained="none")
    _, full = m.stages(TrainConfig())
    out = m.losses(pma_batch(), full)
    for name in ("ca_ranking", "fa_ranking"):
        m.zero_grad()
        out[name].backward(retain_graph=True)
        assert m.backbone.stages[0][0][0].weight.grad.abs().sum() > 0, name
    assert m.pose_cnn.fc.weight.grad.abs().sum() > 0  # the pose CNN learns from FA's ranking loss


def test_score_is_ca_plus_lambda3_fa(model) -> None:
    text, image = features(model)
    ca = model._coarse(text, image, layout="all")[0]
    fa = model._fine_pose(text, image, layout="all")[0]
    assert torch.allclose(model.similarity(text, image), ca + fa, atol=1e-5)
    heavier = make(lambda3=2.0).eval()
    assert torch.allclose(heavier.similarity(*features(heavier)), ca + 2 * fa, atol=1e-5)


def test_pose_is_needed_only_by_the_switches_that_read_it() -> None:
    batch = pma_batch()
    del batch["pose"]
    with pytest.raises(PedError, match="pose"):
        make().encode_images(batch)
    m = make(pose_concat=False, fa_pose=False).eval()
    assert m.backbone.stages[0][0][0].in_channels == 3
    assert set(m.encode_images(batch)) == {"global", "regions", "fa_regions", "fa_region_norms"}


def test_explain_shows_the_kept_regions_and_the_phrase_weights(model) -> None:
    text, image = features(model)
    out = model.explain({k: v[4:5] for k, v in text.items()}, image)
    assert out.grid.shape == out.selected.shape == (6, 6, 4) and out.parts == list(PARTS)
    assert (out.selected == (out.grid >= 1 / 24 * (1 - 1e-6))).all()
    assert out.links.shape == (6, 3, 6)  # images × the caption's three phrases × parts
    assert out.links.sum(1) == pytest.approx(1.0, abs=1e-5)  # each part's weights over the phrases
    ca = model._coarse(text, image, layout="all")[0][4]
    kept = out.selected.reshape(6, 24)
    kept_sum = torch.from_numpy((out.details["region_similarity"] * kept).sum(1))
    assert torch.allclose(kept_sum, ca, atol=1e-5)


def test_tau_is_one_over_the_number_of_regions() -> None:
    s = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0]])  # q = 3/6, 1/6, 1/6, 1/6 against τ = 1/4
    assert pma.coarse_attention(s, "hard").tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_a_shortlist_grouped_by_image_matches_exact_scores(model) -> None:
    """PMA's images hold more elements than its captions, so a text shortlist is scored in rows of one
    image and the captions that shortlisted it; an image shortlisted by more captions than a row holds
    takes several rows (here every caption shortlists images 0 and 1)."""
    text, image = features(model)
    with torch.no_grad():
        sim = model.similarity(text, image)
        index = torch.tensor([[0, 1, 0], [1, 0, 4], [0, 1, 5], [1, 0, 2], [0, 1, 3], [1, 0, 0]])
        got = model.shortlist_similarity(text, image, index)
        assert torch.allclose(got, sim.gather(1, index), atol=1e-5)
        got = model.shortlist_similarity(text, image, index, queries="image")
        assert torch.allclose(got, sim.T.gather(1, index), atol=1e-5)
