"""NAFS (pedcli/models/methods/nafs.py): its equations on hand-made tensors, then the model on tiny widths."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from method_batch import TINY_INFO, TINY_LENGTHS, tiny_batch

from pedcli.errors import PedError
from pedcli.models.methods import nafs
from pedcli.models.methods.base import Batch, TrainConfig, create_method

TINY = {"bert_random_init": True, "bert_layers": 1, "bert_hidden": 32, "embed_dim": 16}
CLS, SEP = 101, 102
LENGTHS = (12, 9, 6, 12, 8, 5)  # word pieces incl. [CLS] and [SEP]
SPANS = (((1, 4), (5, 8), (9, 11)), ((1, 8),), ((1, 3), (4, 5)), ((1, 11),), ((1, 3), (3, 7)), ())


def nafs_batch(seed: int = 0) -> Batch:
    """method_batch's 6 pairs plus word pieces with sub-sentence spans (caption 5 has none)."""
    batch = tiny_batch(seed)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS)
    mask = (torch.arange(max(LENGTHS))[None] < lengths[:, None]).long()
    ids = torch.randint(1000, 2000, mask.shape, generator=g)
    ids[:, 0] = CLS
    ids[torch.arange(len(LENGTHS)), lengths - 1] = SEP
    spans = torch.full((len(LENGTHS), 3, 2), -1)
    for i, caption in enumerate(SPANS):
        for k, span in enumerate(caption):
            spans[i, k] = torch.tensor(span)
    n_spans = torch.tensor([len(s) for s in SPANS])
    return {**batch, "bert_ids": ids * mask, "bert_mask": mask, "bert_spans": spans, "n_spans": n_spans}


def make(**overrides):
    torch.manual_seed(0)
    return create_method("nafs", TINY_INFO, {**TINY, **overrides})


def features(model, batch: Batch | None = None):
    batch = nafs_batch() if batch is None else batch
    with torch.no_grad():
        return model.encode_texts(batch), model.encode_images(batch)


@pytest.fixture(scope="module")
def model():
    return make().eval()  # ImageNet MobileNetV2 (offline): an untrained CNN's eval-mode maps are ~0


# ---- the focal trick and the contextual non-local attention, eqs. 2–5 ------------------------------
def test_focal_trick_zeroes_every_unit_at_or_below_its_row_mean() -> None:
    s_hat = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.6, 0.1, 0.3, 9.0]])
    mask = torch.tensor([[True] * 4, [True] * 4, [True, True, True, False]])
    out = nafs.focal(s_hat, mask.float(), dim=-1)
    by_paper = torch.zeros_like(s_hat)  # s̃_ab = [Σ_c (ŝ_ab − ŝ_ac)]_+ ŝ_ab over the valid c
    for a in range(3):
        for b in range(4):
            if mask[a, b]:
                by_paper[a, b] = (s_hat[a, b] - s_hat[a][mask[a]]).sum().clamp(min=0) * s_hat[a, b]
    assert torch.allclose(out, by_paper)
    assert out[0].tolist() == pytest.approx([0.5, 0.06, 0.0, 0.0])  # mean 0.25: the two 0.1 are dropped
    assert (out[1] == 0).all()  # all equal: nothing stands out
    assert out[2, 3] == 0 and out[2, 1] == 0 and out[2, 0] > 0  # a masked unit neither counts nor keeps any


def _focal_by_hand(x):
    """s̃_ab = [Σ_c (ŝ_ab − ŝ_ac)]_+ ŝ_ab, one entry at a time."""
    rows, cols = x.shape
    return torch.tensor(
        [[F.relu((x[a, b] - x[a]).sum()) * x[a, b] for b in range(cols)] for a in range(rows)]
    )


def _by_hand(iq, iv, tk, tv, lam, use_focal=True, norm="paper"):
    """Eqs. 2–5 and the text-image mirror for one pair, written out unit by unit; norm="official" is the
    authors' release: LeakyReLU(0.1) and an L2 norm in place of eq. 2's [·]_+ and the sum."""
    cos = F.normalize(iq, dim=1) @ F.normalize(tk, dim=1).T  # [m, n]
    s = F.relu(cos) if norm == "paper" else F.leaky_relu(cos, 0.1)  # eq. 2
    m, n = s.shape

    def normalise(x):  # over dim 0
        scale = x.sum(0, keepdim=True) if norm == "paper" else x.norm(dim=0, keepdim=True)
        return x / scale.clamp(min=1e-8)

    s_hat = normalise(s)  # over the visual units a
    s_til = _focal_by_hand(s_hat) if use_focal else s_hat
    alpha = torch.softmax(lam * s_til, dim=1)  # eq. 3
    r = alpha @ tv
    big_s = torch.stack([F.cosine_similarity(iv[a], r[a], dim=0) for a in range(m)]).mean()  # eqs. 4–5
    s2_hat = normalise(s.T)  # s'_ab [n, m] over the textual units a
    s2_til = _focal_by_hand(s2_hat) if use_focal else s2_hat
    r2 = torch.softmax(lam * s2_til, dim=1) @ iv
    big_s2 = torch.stack([F.cosine_similarity(tv[a], r2[a], dim=0) for a in range(n)]).mean()
    return big_s, big_s2


@pytest.mark.parametrize(("norm", "use_focal"), [("paper", True), ("paper", False), ("official", False)])
def test_attention_scores_follow_eqs_2_to_5_in_both_directions(norm, use_focal) -> None:
    opts = {"attention_norm": norm, "focal": use_focal, "lambda_softmax": 5.0}
    m = make(test_score="mean", **opts).eval()
    text, image = features(m)
    s, s2 = m._attention(text, image, layout="all")[:2]
    for t, i in [(0, 1), (5, 5), (2, 3)]:
        valid = text["scales"][t] > 0
        expect = _by_hand(image["queries"][i], image["values"][i], text["keys"][t][valid],
                          text["values"][t][valid], 5.0, use_focal, norm)  # fmt: skip
        assert s[t, i].item() == pytest.approx(expect[0].item(), abs=1e-5)
        assert s2[t, i].item() == pytest.approx(expect[1].item(), abs=1e-5)
    assert torch.allclose(m.similarity(text, image), (s + s2) / 2, atol=1e-6)
    paper = make(test_score="paper", **opts).eval()  # eq. 5: S alone
    assert torch.allclose(paper.similarity(text, image), s, atol=1e-6)
    official = make(test_score="official", **opts).eval()  # the release: global cosine + S
    cos = F.normalize(text["global"], dim=-1) @ F.normalize(image["global"], dim=-1).T
    assert torch.allclose(official.similarity(text, image), cos + s, atol=1e-6)


def test_the_default_is_the_release_s_attention_and_score() -> None:
    cfg = nafs.NAFSConfig()
    assert (cfg.attention_norm, cfg.focal, cfg.test_score) == ("official", False, "official")


def _attention_entropy(overrides: dict, n_text: int = 60, dim: int = 768) -> tuple[float, float]:
    """Mean entropy (nats) of image→text attention (each of the 6 image units over the text units) and of
    text→image attention (each text unit over the image units), on random unit features."""
    m = make(**overrides).eval()
    g = torch.Generator().manual_seed(0)
    n_img, n_pairs = m.n_image_units, 16

    def unit(*shape):
        return F.normalize(torch.randn(*shape, dim, generator=g), dim=-1)

    text = {"global": unit(n_pairs), "keys": unit(n_pairs, n_text), "values": unit(n_pairs, n_text),
            "scales": torch.full((n_pairs, n_text), 3, dtype=torch.int8)}  # fmt: skip
    image = {"global": unit(n_pairs), "queries": unit(n_pairs, n_img), "values": unit(n_pairs, n_img)}
    with torch.no_grad():
        alpha, alpha2 = m._attention(text, image, layout="pairs")[2:]  # [pairs, m, n]

    def entropy(p, dim):
        return float(-(p * p.clamp(min=1e-12).log()).sum(dim).mean())

    return entropy(alpha, -1), entropy(alpha2, -2)


def test_the_attention_neither_collapses_nor_spreads_evenly() -> None:
    """Issue: with eqs. 2–3 taken literally (λ = 20, 6 image units, ~60 text units) image→text attention is
    one-hot and text→image attention uniform, so S' involves no attention. The release's normalisation
    keeps both directions' mean entropy strictly inside (0.05, 0.95·log n) on random unit features."""
    i2t, t2i = _attention_entropy({})
    assert 0.05 < i2t < 0.95 * math.log(60)
    assert 0.05 < t2i < 0.95 * math.log(6)
    i2t, t2i = _attention_entropy({"attention_norm": "paper", "focal": True})  # eqs. 2–3 as written
    assert not (i2t > 0.05 and t2i < 0.95 * math.log(6))  # i2t near one-hot and/or t2i near uniform


def test_separate_alignment_attends_only_within_the_scale_pairs(model) -> None:
    m = make(alignment="separate").eval()
    text, image = features(m)
    alpha, alpha2 = m._attention(text, image, layout="all")[2:]
    codes = text["scales"].long()  # [nt, n]; image units: 1 global, 2 regions, 3 patches
    image_codes = torch.tensor([1, 2, 2, 3, 3, 3])
    allowed = (codes[:, None, None, :] == image_codes[None, None, :, None]) & (codes[:, None, None, :] > 0)
    assert (alpha[~allowed.expand_as(alpha)] == 0).all() and (alpha2[~allowed.expand_as(alpha2)] == 0).all()
    assert torch.allclose(alpha[0, 0, 0, :1], torch.ones(1))  # the global unit sees only the sentence
    assert (alpha[5, :, 1:3] == 0).all()  # caption 5 has no sub-sentence: its regions align with nothing
    # the joint model has the same weights (make() seeds the initialisation): only the alignment differs
    s = m._attention(text, image, layout="all")[0]
    assert not torch.allclose(s, model._attention(*features(model), layout="all")[0])


# ---- the locality-constrained BERT, eq. 1 ----------------------------------------------------------
def test_a_cls_is_inserted_before_each_sub_sentence() -> None:
    ids = torch.tensor([[CLS, 11, 12, 13, 14, 15, SEP, 0]])  # [CLS] a b , c d [SEP]
    mask = (ids > 0).long()
    seq = nafs.locality_sequence(ids, mask, torch.tensor([[[1, 3], [4, 6], [-1, -1]]]), torch.tensor([2]))
    assert seq.ids[0].tolist() == [CLS, CLS, 11, 12, 13, CLS, 14, 15, SEP, 0, 0]
    assert seq.mask[0].tolist() == [1] * 9 + [0, 0]
    assert seq.cls_pos[0].tolist() == [1, 5, 0] and seq.span_valid[0].tolist() == [True, True, False]
    assert seq.word_pos[0].tolist() == [0, 2, 3, 4, 6, 7, 8, 9]
    att = seq.attention[0]
    assert att[1].nonzero().flatten().tolist() == [1, 2, 3]  # itself and "a b"
    assert att[5].nonzero().flatten().tolist() == [5, 6, 7]  # itself and "c d"
    assert att[0].nonzero().flatten().tolist() == [0, 2, 3, 4, 6, 7, 8]  # pieces never see the extra [CLS]
    loose = nafs.locality_sequence(ids, mask, torch.tensor([[[1, 3]]]), torch.tensor([1]), local=False)
    assert loose.attention[0, 1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


def _sub_cls_states(model, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        units, codes = model.text_units(batch)
    return units, codes


@pytest.mark.parametrize("locality", [True, False])
def test_a_sub_sentence_cls_cannot_see_outside_its_span(locality) -> None:
    """One BERT layer, so a state depends on the tokens its query attends to and nothing else."""
    m = make(locality=locality).eval()
    batch = nafs_batch()
    outside = batch["bert_ids"].clone()
    outside[0, 6] = 1999 if outside[0, 6] != 1999 else 1998  # inside caption 0's second span (5, 8)
    before, codes = _sub_cls_states(m, batch)
    after, _ = _sub_cls_states(m, {**batch, "bert_ids": outside})
    subs = (codes[0] == 2).nonzero().flatten().tolist()
    assert len(subs) == 3
    changed = [not torch.allclose(before[0, k], after[0, k], atol=1e-6) for k in subs]
    assert changed == ([False, True, False] if locality else [True, True, True])
    assert not torch.allclose(before[0, 0], after[0, 0])  # the sentence [CLS] sees everything
    assert torch.allclose(before[1:], after[1:], atol=1e-6)  # other captions untouched


# ---- the staircase, split & shuffle ------------------------------------------------------------------
def test_split_shuffle_permutes_whole_stripes() -> None:
    torch.manual_seed(1)
    x = torch.arange(7.0)[None, None, :, None].expand(4, 2, 7, 3)  # row index as the value
    out = nafs.split_shuffle(x, 3)  # stripes of 3, 2, 2 rows
    stripes = [[0.0, 1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    orders = set()
    for b in range(4):
        col = out[b, 0, :, 0].tolist()
        assert sorted(col) == list(range(7)) and (out[b] == out[b, :1, :, :1]).all()
        pieces, i = [], 0
        while i < 7:
            stripe = next(s for s in stripes if s[0] == col[i])
            assert col[i : i + len(stripe)] == stripe  # a stripe moves as a whole
            pieces.append(stripes.index(stripe))
            i += len(stripe)
        orders.add(tuple(pieces))
    assert len(orders) > 1  # shuffled independently per image


def test_split_shuffle_happens_only_in_training() -> None:
    m = make(pretrained="none")
    image = nafs_batch()["image"]
    m.train()
    with torch.no_grad():
        torch.manual_seed(0)
        a = m.staircase(image)
        torch.manual_seed(1)
        b = m.staircase(image)
    assert torch.allclose(a[:, 0], b[:, 0])  # the global branch is not shuffled
    assert not torch.allclose(a[:, 1:], b[:, 1:])  # region and patch branches are
    m.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        c = m.staircase(image)
        torch.manual_seed(1)
        assert torch.equal(c, m.staircase(image))
    plain = make(pretrained="none", split_shuffle=False).train()
    with torch.no_grad():
        torch.manual_seed(0)
        d = plain.staircase(image)
        torch.manual_seed(1)
        assert torch.equal(d, plain.staircase(image))


def test_branches_start_as_copies_of_the_later_stages(model) -> None:
    stages = model.staircase.backbone.stages
    region, patch = model.staircase.region_branch, model.staircase.patch_branch
    for copy, stage in [(region[0], stages[2]), (region[1], stages[3]), (patch, stages[3])]:
        pairs = list(zip(copy.parameters(), stage.parameters(), strict=True))
        assert all(torch.equal(a, b) and a is not b for a, b in pairs)
    strides = [c.stride for c in stages[3].modules() if isinstance(c, torch.nn.Conv2d)]
    assert all(s == (1, 1) for s in strides)  # last stage at stride 1 (§4.1)


# ---- the model ---------------------------------------------------------------------------------------
def test_feature_shapes_and_schedule(model) -> None:
    text, image = features(model)
    assert {k: tuple(v.shape) for k, v in image.items()} == {
        "global": (6, 16), "queries": (6, 6, 16), "values": (6, 6, 16)}  # fmt: skip
    n = 1 + 3 + max(LENGTHS) - 1  # sentence, 3 sub-sentence slots, the pieces after [CLS]
    assert {k: tuple(v.shape) for k, v in text.items()} == {
        "global": (6, 16), "keys": (6, n, 16), "values": (6, n, 16), "scales": (6, n)}  # fmt: skip
    codes = text["scales"].long()
    assert (codes == 2).sum(1).tolist() == [len(s) for s in SPANS]
    assert (codes == 3).sum(1).tolist() == [x - 2 for x in LENGTHS]  # every piece but [CLS] and [SEP]
    (joint,) = model.stages(TrainConfig())
    assert (joint.lr, joint.lr_mult, joint.losses) == (1.1e-3, {"staircase": 0.1, "text": 0.1},
                                                       ("cmpm", "cmpc", "csal"))  # fmt: skip
    m = make(frozen_epochs=2, pretrained="none")
    warm, _ = m.stages(TrainConfig())
    learning = {name.split(".")[0] for name, _ in m.trainable_parameters(warm)}
    assert warm.freeze_trunk and warm.epochs == 2 and warm.lr_mult == {"text": 0.1}
    assert "text" in learning and "staircase" not in learning  # BERT learns at the extractor rate
    warm, _ = make(frozen_epochs=2, pretrained="none", warmup_text=False).stages(TrainConfig())
    assert {"staircase", "text"}.isdisjoint(warm.trainable)


BILSTM = {"word_dim": 5, "lstm_hidden": 6}
SWITCHES = [  # (overrides, losses, image units, text scale codes present)
    ({}, {"cmpm", "cmpc", "csal"}, 6, {1, 2, 3}),
    ({"image_scales": ["global"], "text_scales": ["sentence"], "nonlocal_attention": False},
     {"cmpm", "cmpc"}, None, None),  # Table 2 "Global"
    ({"image_scales": ["global", "patch"], "text_scales": ["sentence", "word"]},
     {"cmpm", "cmpc", "csal"}, 4, {1, 3}),  # Table 2 "Local+Global"
    ({"alignment": "separate"}, {"cmpm", "cmpc", "csal"}, 6, {1, 2, 3}),  # Table 3
    ({"staircase": False, "split_shuffle": False, "nonlocal_attention": False, "image_scales": ["global"]},
     {"cmpm", "cmpc"}, None, None),  # Table 4 row 2 ("BERT")
    ({"split_shuffle": False, "nonlocal_attention": False}, {"cmpm", "cmpc"}, None, None),  # row 3
    ({"split_shuffle": False}, {"cmpm", "cmpc", "csal"}, 6, {1, 2, 3}),  # row 4
    ({"staircase": False, "split_shuffle": False}, {"cmpm", "cmpc", "csal"}, 6, {1, 2, 3}),
    ({"locality": False}, {"cmpm", "cmpc", "csal"}, 6, {1, 2, 3}),
    ({"attention_norm": "paper", "focal": True}, {"cmpm", "cmpc", "csal"}, 6, {1, 2, 3}),  # eqs. 2–3
    ({"frozen_epochs": 1}, {"cmpm", "cmpc", "csal"}, 6, {1, 2, 3}),
    ({"text_encoder": "bilstm", "staircase": False, "split_shuffle": False, "nonlocal_attention": False,
      "image_scales": ["global"], "text_scales": ["sentence"], **BILSTM},
     {"cmpm", "cmpc"}, None, None),  # Table 4 row 1 ("baseline": bi-LSTM, ResNet, CMPM + CMPC)
    ({"text_encoder": "bilstm", "text_scales": ["sentence", "word"], **BILSTM},
     {"cmpm", "cmpc", "csal"}, 6, {1, 3}),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "losses", "units", "codes"), SWITCHES)
def test_every_switch_builds_and_takes_a_training_step(overrides, losses, units, codes) -> None:
    """On the trunk's output (as a frozen-trunk stage gets it from the engine's cache), so the step is quick;
    gradients through the CNN are tested below."""
    m = make(pretrained="none", **overrides)
    batch = nafs_batch()
    stage = m.stages(TrainConfig())[0]
    with torch.no_grad():
        batch["trunk"] = m.eval().image_trunk(batch)
    del batch["image"]
    m.train()
    trainable = [p for _, p in m.trainable_parameters(stage)]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    out = m.losses(batch, stage)
    assert set(out) == losses
    total = sum(out.values())
    assert torch.isfinite(total)
    before = [p.detach().clone() for p in m.text_fc.parameters()]
    total.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, m.text_fc.parameters(), strict=True))
    m.eval()
    text, image = features(m, batch)
    if units is None:
        assert set(image) == set(text) == {"global"}
    else:
        assert image["queries"].shape[1] == units
        assert set(text["scales"].unique().tolist()) - {0} == codes
    assert m.similarity(text, image).shape == (6, 6)
    assert hasattr(m.text, "bert") == (m.cfg.text_encoder == "bert")


def test_the_bilstm_reads_words_not_word_pieces() -> None:
    m = make(text_encoder="bilstm", text_scales=["sentence", "word"], **BILSTM).eval()
    batch = {k: v for k, v in nafs_batch().items() if not k.startswith("bert_") and k != "n_spans"}
    text = m.encode_texts(batch)
    assert (text["scales"] == 3).sum(1).tolist() == list(TINY_LENGTHS)  # one unit per word


@pytest.mark.parametrize(("overrides", "message"), [
    ({"image_scales": ["global"], "text_scales": ["sentence"]}, "nonlocal_attention=false"),  # Table 2
    ({"text_encoder": "bilstm"}, "text_scales=\\[sentence\\]"),  # sub-sentences need the BERT's [CLS]
])  # fmt: skip
def test_contradictory_switches_are_refused(overrides, message) -> None:
    with pytest.raises(PedError) as err:
        make(**overrides)
    assert re.search(message, str(err.value))


def test_gradients_reach_cnn_bert_and_branches_in_the_joint_stage() -> None:
    m = make(pretrained="none").train()
    (joint,) = m.stages(TrainConfig())
    out = m.losses(nafs_batch(), joint)
    out["csal"].backward(retain_graph=True)
    for part in (m.staircase.region_branch, m.staircase.patch_branch, m.text):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    m.zero_grad()
    out["cmpm"].backward()
    patch = m.staircase.patch_branch.parameters()
    assert all(p.grad is None or not p.grad.any() for p in patch)  # CMPM reads the global branch only


def test_csal_is_cmpm_on_the_attention_scores(model) -> None:
    batch = nafs_batch()
    (joint,) = model.stages(TrainConfig())
    with torch.no_grad():
        csal = model.losses(batch, joint)["csal"]
        s, s2 = model._attention(*features(model, batch), layout="all")[:2]  # [texts, images]
    y = (batch["pid"][:, None] == batch["pid"][None, :]).float()
    q = y / y.sum(1, keepdim=True)

    def kl(scores):  # mean over rows of KL(softmax(S/τ) ‖ q)
        p = torch.softmax(scores / 0.1, dim=1)
        return (p * (p.log() - (q + 1e-8).log())).sum(1).mean()

    assert csal.item() == pytest.approx(0.1 * (kl(s.T) + kl(s2)).item(), rel=1e-4)


def test_unit_order_does_not_change_the_score(model) -> None:
    """The text units are a set (padding: tests/test_method_contract.py)."""
    text, image = features(model)
    perm = torch.randperm(text["scales"].shape[1])
    shuffled = {k: v[:, perm] if k != "global" else v for k, v in text.items()}
    assert torch.allclose(model.similarity(shuffled, image), model.similarity(text, image), atol=1e-5)


def test_rvn_is_the_default_re_ranking(model) -> None:
    assert model.default_rerank == "rvn"
    assert model.rerank_options == {"neighbours": 10, "weight": 0.5}
    assert make(rvn=False, pretrained="none").default_rerank is None


def test_explain_names_the_units_and_their_attention(model) -> None:
    text, image = features(model)
    out = model.explain({k: v[2:3] for k, v in text.items()}, image)
    assert out.parts == ["global", "region 1", "region 2", "patch 1", "patch 2", "patch 3"]
    words = [f"word {k}" for k in range(1, 5)]
    assert out.link_texts == ["sentence", "subsentence 1", "subsentence 2", *words]
    assert out.details["image_to_text"].shape == (6, 6, 7) and out.links.shape == (6, 7, 6)
    assert out.details["image_to_text"].sum(-1) == pytest.approx(1.0, abs=1e-5)
    assert out.focus == pytest.approx(out.links[:, 0]) and out.grid is None


def test_the_bert_model_must_be_the_caches_tokenizer(tmp_path) -> None:
    other = tmp_path / "other_bert"
    other.mkdir()
    (other / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(PedError, match="tokenizer the cache was built with"):
        make(bert_model=str(other), pretrained="none")
    batch = nafs_batch()
    del batch["bert_ids"]
    with pytest.raises(PedError, match="BERT word pieces"):
        make(pretrained="none").encode_texts(batch)
