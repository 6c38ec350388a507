"""MGEL (pedcli/models/methods/mgel.py) and its part alignment loss, on tiny widths and 128×32 images
(8 rows at stride 16: the finest granularity's 8 stripes are disjoint rows)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from method_batch import TINY_INFO, tiny_batch

from pedcli.errors import PedError
from pedcli.models.backbones import stripe_pool, stripe_rows
from pedcli.models.losses.part_alignment import co_attend, part_alignment_loss
from pedcli.models.methods.base import TrainConfig, create_method

TINY = {"pretrained": "none", "embed_dim": 8, "word_dim": 6, "channel_reduction": 4}
MGEL_INFO = dataclasses.replace(TINY_INFO, image_size=(128, 32))


def make(**overrides):
    torch.manual_seed(0)
    return create_method("mgel", MGEL_INFO, {**TINY, **overrides})


def mgel_batch(seed: int = 0):
    """method_batch's tiny batch with 128×32 images."""
    batch = tiny_batch(seed)
    batch["image"] = torch.randn(6, 3, *MGEL_INFO.image_size, generator=torch.Generator().manual_seed(seed))
    return batch


def trunk_batch():
    """A batch whose image path starts from a cached trunk map (random: a fresh backbone's output in
    eval mode is nearly zero), as in a frozen-trunk stage."""
    batch = mgel_batch()
    batch["trunk"] = torch.randn(6, 1280, 8, 2, generator=torch.Generator().manual_seed(1))
    return batch


@pytest.fixture(scope="module")
def model():
    return make().eval()


# ---- part alignment loss (eqs. 3–9) ----------------------------------------------------------------
def test_co_attention_gates_each_modality_by_its_agreement_with_the_mix() -> None:
    v, z = torch.tensor([[[2.0]]]), torch.tensor([[[-1.0]]])
    v_hat, z_hat, m = co_attend(v, z)
    assert m.item() == pytest.approx(0.5)  # eq. 5
    assert v_hat.item() == pytest.approx(2.0 * 0.5 * (1 + math.tanh(2.0 * 0.5)))  # eq. 6
    assert z_hat.item() == pytest.approx(-1.0 * 0.5 * (1 + math.tanh(-1.0 * 0.5)))


def test_part_alignment_loss_by_hand() -> None:
    # two pairs of different people, one part of 2 channels; the pooling is the identity
    v = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    z = torch.tensor([[[1.0, 0.0]], [[0.0, -2.0]]])
    # pull (eqs. 3-4): activations 0.5/0.5 and 0.5/1.0 -> (0 + 0.25) / 2
    pull = 0.125
    # mixes m = [1, 0] and [0, -0.5]. The gates of eq. 6 are positive, so v̂, ẑ keep the directions
    # of v, z: v̂_1 = [0, +] sits at cosine -1 from its own mix and 0 from the other one: 0.2 + 1 + 0;
    # every other anchor is at cosine 1 from its mix and 0 from the other: no hinge. Eq. 8 averages
    # each term over the anchors.
    mix = (0.0 + (0.2 + 1.0 + 0.0)) / 2 + 0.0
    value = part_alignment_loss(v, z, lambda p: p.mean(1), torch.tensor([0, 1]), margin=0.2)
    assert value.item() == pytest.approx(pull + mix)


def test_part_alignment_loss_has_no_negatives_within_one_person() -> None:
    v = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], requires_grad=True)
    z = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # same activations: no pull either
    value = part_alignment_loss(v, z, lambda p: p.mean(1), torch.tensor([7, 7]))
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(v.grad).all()


# ---- the model --------------------------------------------------------------------------------------
def test_forward_backward_and_feature_shapes() -> None:
    m = make()
    batch = mgel_batch()
    (stage,) = m.stages(TrainConfig())
    assert stage.losses == ("triplet", "identity", "pal") and not stage.freeze_trunk
    losses = m.losses(batch, stage)
    assert set(losses) == {"triplet", "identity", "pal"}
    sum(losses.values()).backward()
    for name in ("backbone", "text_encoder", "image_gab", "text_gab", "part_attention", "gcp", "global_fc"):
        grads = [p.grad for p in getattr(m, name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    m.eval()
    with torch.no_grad():
        img, txt = m.encode_images(batch), m.encode_texts(batch)
    for feats in (img, txt):
        assert feats["global"].shape == (6, 4 * 8)  # 4 granularities of c = 8, concatenated
        assert feats["parts"].shape == (6, 1 + 2 + 4 + 8, 8)
        assert torch.allclose(feats["global"].norm(dim=1), torch.ones(6))


def test_similarity_matrix_diagonal_matches_pair_similarity(model) -> None:
    batch = mgel_batch(seed=1)
    with torch.no_grad():
        txt, img = model.encode_texts(batch), model.encode_images(batch)
        sim = model.similarity(txt, img)
        pair = model.pair_similarity(txt, img)
    assert sim.shape == (6, 6)
    assert torch.allclose(sim.diagonal(), pair, atol=1e-6)
    # the score is the mean over granularities of the cosine of their global embeddings (sec. 3.3)
    per_gran = [
        F.cosine_similarity(t, i, dim=1)
        for t, i in zip(txt["global"].split(8, 1), img["global"].split(8, 1), strict=True)
    ]
    assert torch.allclose(pair, torch.stack(per_gran).mean(0), atol=1e-6)


def test_part_attention_sums_to_one_over_the_valid_words(model) -> None:
    batch = mgel_batch()
    with torch.no_grad():
        _, attns = model.text_parts(batch)
    assert attns[0] is None  # the single-stripe granularity pools the words directly
    mask = torch.arange(8)[None, :] < batch["lengths"][:, None]
    for n, attn in zip((2, 4, 8), attns[1:], strict=True):
        assert attn.shape == (6, n, 8, 8)
        assert torch.allclose(attn.sum(-1), torch.ones(6, n, 8))  # softmax over the attended words
        assert (attn * ~mask[:, None, None, :]).abs().max() == 0  # padding gets no weight


def test_stripes_only_see_their_rows() -> None:
    m = make(gab=False).eval()  # GAB's channel attention pools the whole map, so test without it
    trunk = torch.randn(2, m.backbone.channels[-1], 8, 2)
    changed = trunk.clone()
    changed[:, :, 4:] += 5.0  # the bottom half only
    with torch.no_grad():
        before, after = m.image_parts(trunk), m.image_parts(changed)
    halves = m.cfg.granularities.index(2)
    assert torch.allclose(before[halves][:, 0], after[halves][:, 0])  # top stripe untouched
    assert not torch.allclose(before[halves][:, 1], after[halves][:, 1])


@pytest.mark.parametrize(("h", "n"), [(12, 8), (24, 8), (8, 8), (7, 3), (12, 6)])
def test_stripes_partition_the_rows(h: int, n: int) -> None:
    rows = torch.eye(h).reshape(1, h, h, 1)  # channel r lights row r only
    seen = stripe_pool(rows, n, "max")[0]  # [n, h]: which rows each stripe pools
    assert seen.sum(0).tolist() == [1.0] * h  # every row in exactly one stripe
    sizes = seen.sum(1).tolist()
    assert max(sizes) - min(sizes) <= 1 and [list(r) for r in stripe_rows(h, n)] == [
        seen[i].nonzero().flatten().tolist() for i in range(n)
    ]


def test_the_finest_granularity_gets_disjoint_rows_of_the_last_map() -> None:
    m = make()
    with torch.no_grad():
        rows = m.image_trunk(mgel_batch()).shape[2]
    assert rows == 8 and rows % max(m.cfg.granularities) == 0  # stride 16: 3 rows a stripe at 384×128
    with pytest.raises(PedError, match="8 stripes needs a last map at least 8 rows"):
        create_method("mgel", TINY_INFO, TINY)  # 64-pixel-high images: 4 rows
    assert create_method("mgel", TINY_INFO, {**TINY, "granularities": (1, 2, 4)}).cfg.last_stride == 1


@pytest.mark.parametrize(
    ("overrides", "global_dim", "n_parts", "losses"),
    [
        ({"granularities": (8,)}, 8, 8, {"triplet", "identity", "pal"}),  # Table 2: no multi-granularity
        ({"granularities": [1, 2]}, 16, 3, {"triplet", "identity", "pal"}),  # Table 3: G-12 (list, as JSON)
        ({"global_embedding": False}, 8 * 15, 15, {"triplet", "identity", "pal"}),  # Table 2
        ({"gab": False}, 32, 15, {"triplet", "identity", "pal"}),  # Table 4
        ({"gcp": False}, 32, 15, {"triplet", "identity", "pal"}),
        ({"pal": False}, 32, 15, {"triplet", "identity"}),
        ({"triplet": False, "pal": False}, 32, 15, {"identity"}),
        ({"identity": False, "pal": False}, 32, 15, {"triplet"}),
        ({"pooling": "avg"}, 32, 15, {"triplet", "identity", "pal"}),
        ({"pooling": "max"}, 32, 15, {"triplet", "identity", "pal"}),
    ],
)
def test_every_ablation_switch_builds_and_trains(overrides, global_dim, n_parts, losses) -> None:
    m = make(**overrides)
    batch = trunk_batch()  # the backbone is covered above; here the cached-trunk path keeps the test fast
    (stage,) = m.stages(TrainConfig(epochs=1))
    out = m.losses(batch, stage)
    assert set(out) == losses
    total = sum(out.values())
    assert torch.isfinite(total)
    total.backward()
    with torch.no_grad():
        feats = m.encode_texts(batch)
    assert feats["global"].shape == (6, global_dim)
    assert feats["parts"].shape == (6, n_parts, 8)


def test_switches_change_the_model() -> None:
    assert not hasattr(make(gab=False), "image_gab")
    assert set(make(granularities=(1, 4)).part_attention) == {"4"}
    batch = trunk_batch()
    with torch.no_grad():
        pooled = [make(pooling=p).eval().encode_images(batch)["global"] for p in ("avg", "max")]
    assert not torch.allclose(*pooled)


def test_warmup_stage_freezes_the_backbone() -> None:
    m = make(warmup_epochs=2)
    warmup, joint = m.stages(TrainConfig())
    assert warmup.freeze_trunk and warmup.epochs == 2 and joint.epochs == 50
    assert (warmup.lr, joint.lr) == (1e-3, 2e-4)  # the paper's rate is for the whole network
    learning = {name.split(".")[0] for name, _ in m.trainable_parameters(warmup)}
    assert "backbone" not in learning and {"text_encoder", "gcp"} <= learning


def test_explain_gives_each_stripe_its_cosine(model) -> None:
    batch = mgel_batch()
    with torch.no_grad():
        txt, img = model.encode_texts(batch), model.encode_images(batch)
        out = model.explain(txt, img)
    assert out.details["granularities"] == [1, 2, 4, 8]
    assert [s.shape for s in out.details["stripe_similarity"]] == [(6, n) for n in (1, 2, 4, 8)]
    # text 0, image 5, granularity of 4 stripes, stripe 3 = part 1 + 2 + 3 of the flattened parts
    expected = F.cosine_similarity(txt["parts"][0, 6], img["parts"][5, 6], dim=0)
    assert out.details["stripe_similarity"][2][5, 3].item() == pytest.approx(expected.item(), abs=1e-6)
    assert (out.grid[..., 0] == out.details["stripe_similarity"][3]).all()  # the finest is drawn
