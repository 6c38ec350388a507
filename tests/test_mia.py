"""MIA (pedcli/models/methods/mia.py): eqs. 6–18 on hand-made tensors, then the model on tiny widths."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from method_batch import TINY_INFO, tiny_batch, with_phrases

from pedcli.engine.stages import set_trainable
from pedcli.errors import PedError
from pedcli.models.methods import mia
from pedcli.models.methods.base import Batch, Features, TrainConfig, create_method

TINY = {"pretrained": "none", "embed_dim": 8, "hidden": 6, "word_dim": 5, "mlp_hidden": 7}
N_PHRASES = (2, 1, 2, 0, 3, 1)  # caption 3 has no noun phrase
CHANNELS = 1280  # MobileNetV2's last map


def mia_batch(seed: int = 0) -> Batch:
    """method_batch's 6 pairs plus noun-phrase spans inside each caption and a random cached trunk
    (an untrained CNN's eval-mode maps are ~0, so images would all look alike)."""
    g = torch.Generator().manual_seed(seed + 1)
    trunk = (torch.randn(6, CHANNELS, generator=g), torch.randn(6, 6, CHANNELS, generator=g))
    return {**with_phrases(tiny_batch(seed), N_PHRASES, slots=4), "trunk": trunk}


def make(**overrides):
    torch.manual_seed(0)
    return create_method("mia", TINY_INFO, {**TINY, **overrides})


def features(model, batch: Batch | None = None) -> tuple[Features, Features]:
    batch = mia_batch() if batch is None else batch
    with torch.no_grad():
        return model.encode_texts(batch), model.encode_images(batch)


@pytest.fixture(scope="module")
def model():
    return make().eval()


# ---- eqs. 6–17 on hand-made features ---------------------------------------------------------------
def hand_features(seed: int = 0) -> tuple[Features, Features]:
    """2 captions (3 and 1 valid phrases of 4 slots) × 3 images of 6 parts, width 5, in the stored form
    (`mia.unit_features`) but with arbitrary MLP outputs."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])

    def r(*shape):
        return torch.randn(*shape, generator=g)

    def mlp(_):
        return lambda units: r(*units.shape)

    text = {"global": r(2, 5), "phrases_mask": mask}
    text |= mia.unit_features(r(2, 4, 5) * mask[..., None], "phrases", {"rga": mlp(0), "bfm": mlp(1)})
    image = {"global": r(3, 5)} | mia.unit_features(r(3, 6, 5), "parts", {"rga": mlp(0), "bfm": mlp(1)})
    return text, image


def by_the_equations(text: Features, image: Features, t: int, i: int) -> dict[str, torch.Tensor]:
    """One pair, literally as eqs. 6–17 read (aggregated vectors formed, phrases of caption t only)."""
    cos = F.cosine_similarity
    valid = text["phrases_mask"][t]
    sentence, img, parts = text["global"][t], image["global"][i], image["parts"][i]  # T, I, P_1..P_n
    phrases = text["phrases"][t][valid]  # N_1..N_m
    v = torch.softmax(cos(image["rga_parts"][i], sentence[None], dim=-1), 0)  # eq. 6
    s_i = cos((v[:, None] * parts).sum(0), sentence, dim=0)  # eqs. 7–8
    c = torch.softmax(cos(text["rga_phrases"][t][valid], img[None], dim=-1), 0)  # eq. 9
    s_t = cos((c[:, None] * phrases).sum(0), img, dim=0)  # eqs. 10–11
    a = cos(text["bfm_phrases"][t][valid][:, None], image["bfm_parts"][i][None], dim=-1)  # [m, n]
    alpha = torch.softmax(a, dim=1)  # eq. 13
    s_p = cos(alpha @ parts, phrases, dim=-1).mean()  # eqs. 12, 14
    beta = torch.softmax(a.T, dim=1)  # eq. 16
    s_n = cos(beta @ phrases, parts, dim=-1).mean()  # eqs. 15, 17
    return {"s_G": cos(sentence, img, dim=0), "s_I": s_i, "s_T": s_t, "s_P": s_p, "s_N": s_n, "v": v, "c": c,
            "alpha": alpha, "beta": beta}  # fmt: skip


ALL = {"s_G", "s_I", "s_T", "s_P", "s_N"}


def test_batched_similarities_follow_eqs_4_to_17(model) -> None:
    text, image = hand_features()
    comps = model.components(text, image, layout="all", which=ALL)
    for t in range(2):
        m = int(text["phrases_mask"][t].sum())
        for i in range(3):
            ref = by_the_equations(text, image, t, i)
            for name in ALL:
                assert comps[name][t, i].item() == pytest.approx(ref[name].item(), abs=1e-5), (name, t, i)
            assert torch.allclose(comps["v"][t, i], ref["v"], atol=1e-6)
            assert torch.allclose(comps["c"][t, i, :m], ref["c"], atol=1e-6)
            assert torch.allclose(comps["alpha"][t, i, :m], ref["alpha"], atol=1e-6)
            assert torch.allclose(comps["beta"][t, i, :, :m], ref["beta"], atol=1e-6)


def test_attention_weights_sum_to_one_over_the_right_axis(model) -> None:
    text, image = hand_features(seed=1)
    comps = model.components(text, image, layout="all", which=ALL)
    mask = text["phrases_mask"][:, None, :]  # [nt, 1, M]
    assert comps["v"].shape == (2, 3, 6)  # eq. 6: over the image parts
    assert torch.allclose(comps["v"].sum(-1), torch.ones(2, 3))
    assert comps["c"].shape == (2, 3, 4)  # eq. 9: over the caption's valid phrases
    assert torch.allclose(comps["c"].sum(-1), torch.ones(2, 3))
    assert (comps["c"] * ~mask).abs().max() == 0
    assert comps["alpha"].shape == (2, 3, 4, 6)  # eq. 13: each phrase over the parts
    assert torch.allclose(comps["alpha"].sum(-1), torch.ones(2, 3, 4))
    assert comps["beta"].shape == (2, 3, 6, 4)  # eq. 16: each part over the valid phrases
    assert torch.allclose(comps["beta"].sum(-1), torch.ones(2, 3, 6))
    assert (comps["beta"] * ~mask[:, :, None, :]).abs().max() == 0


def test_a_phrase_attends_most_to_the_part_it_names(model) -> None:
    text, image = hand_features(seed=2)
    text["bfm_phrases"][0, 1] = 3.0 * image["bfm_parts"][2, 4]  # phrase 1 of caption 0 ≈ part 4 of image 2
    comps = model.components(text, image, layout="all", which={"s_P", "s_N"})
    assert comps["alpha"][0, 2, 1].argmax() == 4
    assert comps["beta"][0, 2, 4].argmax() == 1


def test_a_caption_without_phrases_scores_zero_locally(model) -> None:
    text, image = hand_features()
    text["phrases_mask"][1] = False
    comps = model.components(text, image, layout="all", which=ALL)
    for name in ("s_T", "s_P", "s_N"):
        assert torch.all(comps[name][1] == 0) and torch.isfinite(comps[name]).all(), name


def test_fused_score_is_eq_18(model) -> None:
    text, image = hand_features()
    comps = model.components(text, image, layout="all", which=ALL)
    s_r, s_l = (comps["s_I"] + comps["s_T"]) / 2, (comps["s_P"] + comps["s_N"]) / 2
    assert torch.allclose(model.similarity(text, image), comps["s_G"] + 1.0 * s_r + 0.5 * s_l, atol=1e-6)
    for overrides, expected in [
        ({"lambda1": 2.0, "lambda2": 0.0}, comps["s_G"] + 2.0 * s_r),  # Table XI
        ({"score": "global"}, comps["s_G"]),  # Table III "MIA (G)" / "(R)" / "(L)"
        ({"score": "relation"}, s_r),
        ({"score": "local"}, s_l),
        ({"relation": False}, comps["s_G"] + 0.5 * s_l),  # a granularity not trained gets λ = 0
        ({"global_contrast": False}, 1.0 * s_r + 0.5 * s_l),
    ]:
        assert torch.allclose(make(**overrides).similarity(text, image), expected, atol=1e-6), overrides


# ---- the model ---------------------------------------------------------------------------------------
def test_feature_shapes_and_a_training_step_through_the_cnn() -> None:
    m = make()
    batch = {k: v for k, v in mia_batch().items() if k != "trunk"}  # through the backbone
    _, step2, step3 = m.stages(TrainConfig())
    out = m.losses(batch, step2)
    assert set(out) == {"identity", "match_global", "match_i2t", "match_t2i"}
    sum(out.values()).backward()
    assert m.backbone.stages[0][0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.bfm.parameters())  # BFM waits for step 3
    assert set(m.losses(batch, step3)) == {"match_p2n", "match_n2p"}
    m.eval()
    text, image = features(m, batch)
    assert {k: tuple(v.shape) for k, v in text.items()} == {
        "global": (6, 8), "phrases": (6, 4, 8), "phrases_mask": (6, 4), "phrases_gram": (6, 4, 4),
        "rga_phrases": (6, 4, 8), "bfm_phrases": (6, 4, 8),
    }  # fmt: skip
    assert {k: tuple(v.shape) for k, v in image.items()} == {
        "global": (6, 8), "parts": (6, 6, 8), "parts_gram": (6, 6, 6), "rga_parts": (6, 6, 8),
        "bfm_parts": (6, 6, 8),
    }  # fmt: skip
    assert torch.allclose(image["parts_gram"], image["parts"] @ image["parts"].transpose(1, 2))
    assert torch.allclose(text["bfm_phrases"].norm(dim=-1), torch.ones(6, 4))  # enter only through cosines
    assert text["phrases_mask"].sum(1).tolist() == list(N_PHRASES)


def test_noun_phrases_are_encoded_on_their_own(model) -> None:
    batch = mia_batch()
    changed = {**batch, "tokens": batch["tokens"].clone()}
    changed["tokens"][0, 6] = 1 + changed["tokens"][0, 6] % 29  # caption 0: 7 words, phrases [0,4) [4,7)
    a, _ = features(model, batch)
    b, _ = features(model, changed)
    assert torch.allclose(a["phrases"][0, 0], b["phrases"][0, 0])  # the first phrase does not see word 6
    assert not torch.allclose(a["phrases"][0, 1], b["phrases"][0, 1])
    assert not torch.allclose(a["global"][0], b["global"][0])
    # the same phrase, alone, in another caption gives the same N_j: no context leaks in
    other = {**batch, "tokens": batch["tokens"].clone()}
    other["tokens"][1, :4] = batch["tokens"][0, :4]
    other["phrases"] = batch["phrases"].clone()
    other["phrases"][1, 0] = torch.tensor([0, 4])
    c, _ = features(model, other)
    assert torch.allclose(c["phrases"][1, 0], a["phrases"][0, 0], atol=1e-6)


def test_word_units_encode_every_word() -> None:
    m = make(units="words").eval()
    text, _ = features(m)
    assert text["phrases_mask"].sum(1).tolist() == mia_batch()["lengths"].tolist()  # Table VII


# ---- the step training strategy and the ablation switches ------------------------------------------------
def learning(m, stage) -> set[str]:
    return {name.split(".")[0] for name, _ in m.trainable_parameters(stage)}


def test_three_step_schedule_of_the_paper() -> None:
    m = make()
    step1, step2, step3 = m.stages(TrainConfig())
    assert [(s.name, s.epochs, s.lr, s.freeze_trunk) for s in (step1, step2, step3)] == [
        ("step1", 10, 1e-3, True), ("step2", 20, 2e-4, False), ("step3", 5, 2e-4, True)
    ]  # fmt: skip
    assert step1.losses == ("identity",)  # eq. 21
    assert step2.losses == ("identity", "match_global", "match_i2t", "match_t2i")  # eq. 22
    assert step3.losses == ("match_p2n", "match_n2p")  # eq. 23
    # step 1: the text path, the global visual FC and the classifier; the pretrained CNN stays fixed
    assert learning(m, step1) == {"text", "sentence_fc", "image_fc", "classifier"}
    # step 2: GC and RGA including the CNN, not the BFM MLPs
    assert learning(m, step2) == {"backbone", "text", "sentence_fc", "image_fc", "classifier", "part_conv",
                                  "phrase_fc", "rga"}  # fmt: skip
    # step 3: only MLP-V-BFM and MLP-T-BFM
    names = {name for name, _ in m.trainable_parameters(step3)}
    assert names == {name for name, _ in m.named_parameters() if name.startswith("bfm.")}
    assert {n.split(".")[1] for n in names} == {"part_mlp", "text_mlp"}
    quick = m.stages(TrainConfig(epochs=1, lr=0.01))
    assert all(s.epochs == 1 and s.lr == 0.01 for s in quick)


def test_step3_gradients_reach_only_the_bfm_mlps() -> None:
    m = make()
    step3 = m.stages(TrainConfig())[2]
    set_trainable(m, step3)
    sum(m.losses(mia_batch(), step3).values()).backward()
    grads = {name.split(".")[0] for name, p in m.named_parameters() if p.grad is not None}
    assert grads == {"bfm"}


def test_without_rga_step3_also_trains_the_part_conv_and_phrase_fc() -> None:
    """GC + BFM (Table III) and the Fine rows: nothing before step 3 reaches the 1×1 conv or the phrase
    FC (only RGA's and BFM's losses do), so step 3 trains them with the BFM MLPs."""
    m = make(relation=False)
    stages = m.stages(TrainConfig())
    assert [s.name for s in stages] == ["step1", "step2", "step3"]
    assert {"part_conv", "phrase_fc"}.isdisjoint(learning(m, stages[0]) | learning(m, stages[1]))
    assert learning(m, stages[2]) == {"bfm", "part_conv", "phrase_fc"}
    set_trainable(m, stages[2])
    sum(m.losses(mia_batch(), stages[2]).values()).backward()
    for name, p in m.named_parameters():
        if name.split(".")[0] in ("part_conv", "phrase_fc", "bfm"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # with RGA, step 2 trains them and step 3 stays the paper's (the BFM MLPs alone)
    assert learning(make(), make().stages(TrainConfig())[2]) == {"bfm"}


def test_matching_positives_are_by_image_not_by_person(monkeypatch) -> None:
    """§III-B.1: the captions of one image are negatives for the other images of the same person. A hand
    batch: captions 0 and 1 describe image 7; captions 2 and 3 describe two images of person 20."""
    m = make(relation=False, fine=False)
    sim = torch.tensor([[0.9, 0.8, 0.5, 0.1],
                        [0.7, 0.6, 0.2, 0.3],
                        [0.1, 0.4, 0.9, 0.85],
                        [0.2, 0.3, 0.6, 0.7]])  # fmt: skip
    monkeypatch.setattr(m, "components", lambda *_: {"s_G": sim})
    batch = {**mia_batch(), "pid": torch.tensor([10, 10, 20, 20]), "image_index": torch.tensor([7, 7, 8, 9])}
    stage = m.stages(TrainConfig())[1]
    got = m.losses(batch, dataclasses.replace(stage, losses=("match_global",)))["match_global"]
    pos = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    hinge = 0.0  # eq. 20 over every positive (i, j), both directions, every negative k
    for i in range(4):
        for j in range(4):
            if pos[i, j]:
                for k in range(4):
                    if not pos[i, k]:
                        hinge += max(0.0, 0.2 - sim[i, j].item() + sim[i, k].item())  # text i, image k
                    if not pos[k, j]:
                        hinge += max(0.0, 0.2 - sim[i, j].item() + sim[k, j].item())  # text k, image j
    assert got.item() == pytest.approx(hinge / pos.sum().item())
    # by person, image 9 would count as a positive of caption 2 (0.85) and its hinges would vanish
    assert got.item() > 0.05


@pytest.mark.parametrize(
    ("overrides", "schedule"),
    [
        ({"schedule": "together"}, [  # Table IV "GC + RGA + BFM": BFM learns with everything in step 2
            ("step1", ("identity",)),
            ("step2", ("identity", "match_global", "match_i2t", "match_t2i", "match_p2n", "match_n2p")),
        ]),
        ({"merge_steps": True}, [  # Table VI: steps 1 and 2 in one stage
            ("steps_1_2", ("identity", "match_global", "match_i2t", "match_t2i")),
            ("step3", ("match_p2n", "match_n2p")),
        ]),
        ({"step1_objectives": "id+mat", "step2_objectives": "mat", "fine": False}, [  # Table V
            ("step1", ("identity", "match_global", "match_i2t", "match_t2i")),
            ("step2", ("match_global", "match_i2t", "match_t2i")),
        ]),
        ({"relation": False, "schedule": "together"}, [  # Table III "GC + BFM"
            ("step1", ("identity",)), ("step2", ("identity", "match_global", "match_p2n", "match_n2p")),
        ]),
        ({"global_contrast": False, "relation": False, "schedule": "together"}, [  # Table IV "Fine"
            ("step1", ("identity",)), ("step2", ("identity", "match_p2n", "match_n2p")),
        ]),
        ({"step2_frozen_epochs": 3, "fine": False}, [  # step 2's objectives on the frozen CNN first
            ("step1", ("identity",)),
            ("step2_frozen", ("identity", "match_global", "match_i2t", "match_t2i")),
            ("step2", ("identity", "match_global", "match_i2t", "match_t2i")),
        ]),
    ],
)  # fmt: skip
def test_schedule_switches(overrides, schedule) -> None:
    m = make(**overrides)
    stages = m.stages(TrainConfig())
    assert [(s.name, s.losses) for s in stages] == schedule
    for stage in stages:
        if stage.name != "step3":
            assert ("backbone" in learning(m, stage)) != stage.freeze_trunk


def test_step2_frozen_epochs_add_a_frozen_copy_of_step2() -> None:
    _, lead, step2, _ = make(step2_frozen_epochs=3).stages(TrainConfig())
    assert (lead.epochs, lead.lr, lead.freeze_trunk) == (3, 1e-3, True)  # `step2_frozen_lr`, step 1's rate
    assert step2.lr == 2e-4
    assert (step2.epochs, step2.freeze_trunk) == (20, False)
    with pytest.raises(PedError, match="step2_frozen_epochs"):
        make(step2_frozen_epochs=3, merge_steps=True)


def test_merged_steps_train_everything_at_the_step2_rate() -> None:
    (merged, _) = make(merge_steps=True).stages(TrainConfig())
    assert (merged.epochs, merged.lr, merged.freeze_trunk) == (30, 2e-4, False)


EVERY_PART_KEY = {"parts", "parts_gram", "rga_parts", "bfm_parts"}


@pytest.mark.parametrize(
    ("overrides", "image_keys"),
    [
        ({}, EVERY_PART_KEY),
        ({"relation": False, "fine": False}, set()),  # Table III "GC"
        ({"fine": False}, {"parts", "parts_gram", "rga_parts"}),  # "GC + RGA"
        ({"relation": False}, {"parts", "parts_gram", "bfm_parts"}),  # "GC + BFM"
        (
            {"global_contrast": False, "relation": False},
            {"parts", "parts_gram", "bfm_parts"},
        ),  # Table IV "Fine"
        ({"units": "words"}, EVERY_PART_KEY),  # Table VII
        ({"schedule": "together"}, EVERY_PART_KEY),  # Table IV
        ({"merge_steps": True}, EVERY_PART_KEY),  # Table VI
        ({"step1_objectives": "mat", "step2_objectives": "mat"}, EVERY_PART_KEY),
        ({"lambda1": 1.5, "lambda2": 0.7, "score": "relation"}, EVERY_PART_KEY),
    ],
)
def test_every_switch_builds_and_takes_a_training_step(overrides, image_keys) -> None:
    m = make(**overrides)
    batch = mia_batch()
    for stage in m.stages(TrainConfig(epochs=1)):
        set_trainable(m, stage)
        before = [p.detach().clone() for _, p in m.trainable_parameters(stage)]
        opt = torch.optim.Adam([p for _, p in m.trainable_parameters(stage)], lr=1e-2)
        out = m.losses(batch, stage)
        assert set(out) == set(stage.losses)
        total = sum(out.values())
        assert torch.isfinite(total)
        total.backward()
        opt.step()
        after = [p for _, p in m.trainable_parameters(stage)]
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)), stage.name
    m.eval()
    text, image = features(m, batch)
    assert set(image) == {"global"} | image_keys
    assert m.similarity(text, image).shape == (6, 6)


def test_explain_gives_the_bfm_weights_of_each_phrase_over_the_parts(model) -> None:
    text, image = features(model)
    out = model.explain(text, image)
    assert out.grid.shape == (6, 6, 1) and out.parts == [f"stripe {k}" for k in range(1, 7)]
    assert out.links.shape == (6, N_PHRASES[0], 6)  # [images, valid phrases of query 0, parts]
    assert out.links.sum(-1) == pytest.approx(1.0, abs=1e-5)
    assert out.details["parts_to_phrases"].shape == (6, 6, N_PHRASES[0])
    assert out.details["phrase_relation"].shape == (6, N_PHRASES[0])
    sim = model.similarity(text, image)[0]
    s = out.details["scores"]
    fused = s["s_G"] + (s["s_I"] + s["s_T"]) / 2 + 0.5 * (s["s_P"] + s["s_N"]) / 2
    assert torch.allclose(torch.as_tensor(fused), sim, atol=1e-5)


def test_a_stage_without_losses_is_a_clear_error() -> None:
    m = make(global_contrast=False, relation=False, step2_objectives="mat")  # "Fine" in three steps
    with pytest.raises(PedError, match="step2"):
        m.stages(TrainConfig())
