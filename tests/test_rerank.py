"""Re-ranking: RVN on a toy worked by hand, k-reciprocal on a constructed hard query, chunk invariance."""

from __future__ import annotations

import math

import pytest
import torch

from pedcli.engine.retrieval import rerank
from pedcli.engine.retrieval.metrics import rank_order, retrieval_metrics
from pedcli.engine.retrieval.rerank import kreciprocal, rvn
from pedcli.engine.retrieval.scoring import cosine_matrix


def unit(*degrees: float) -> torch.Tensor:
    """2-D unit vectors at these angles: cosine similarity is the cosine of the angle between them."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], 1).float()


def test_rvn_toy_by_hand() -> None:
    # Images at 0°, 10°, 30°, 65°, 90°; l = 2 nearest images of each image (itself first):
    #   N(0°) = {0, 1}, N(10°) = {1, 0}, N(30°) = {2, 1}, N(65°) = {3, 4}, N(90°) = {4, 3}.
    # Text at 22°: its 2 nearest images are 30° (8° away) and 10° (12° away): N_t2i = {2, 1}.
    # Jaccard |A∩B| / (2l − |A∩B|): image 0 → 1/3, 1 → 1/3, 2 → 2/2 = 1, 3 → 0, 4 → 0.
    images, text = unit(0, 10, 30, 65, 90), unit(22)
    sim = torch.tensor([[0.9, 0.3, 0.2, 0.6, 0.1]])  # the method's own scores (not the cosines)
    jaccard = torch.tensor([[1 / 3, 1 / 3, 1.0, 0.0, 0.0]])
    out = rvn(sim, text, images, neighbours=2, weight=0.5)
    assert torch.allclose(out, 0.5 * sim + 0.5 * jaccard)
    # ranking goes from 0, 3, 1, 2, 4 to 0, 2, 1, 3, 4 (0.617, 0.600, 0.317, 0.300, 0.050)
    assert rank_order(sim).tolist() == [[0, 3, 1, 2, 4]]
    assert rank_order(out).tolist() == [[0, 2, 1, 3, 4]]
    assert torch.allclose(rvn(sim, text, images, neighbours=2, weight=0.0), sim)


def test_rvn_compares_image_indices_not_text_indices() -> None:
    # Two texts, three images: text 1's neighbour sets are image sets, whatever texts exist. If text rows
    # were confused with image rows, text 1's result would depend on the other text's position.
    images = unit(0, 5, 80)
    texts = unit(85, 3)
    sim = torch.zeros(2, 3)
    out = rvn(sim, texts, images, neighbours=1, weight=1.0)
    # text 1 (3°): nearest image is image 1 (5°); N_i2i with l = 1 is each image itself → only image 1 matches
    assert out[1].tolist() == [0.0, 1.0, 0.0]
    assert torch.equal(rvn(sim.flip(0), texts.flip(0), images, neighbours=1, weight=1.0), out.flip(0))


def hard_query_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Person A: images at 0°, 8°, texts at 25° (hard: closer to B's image at 40°) and 4°.
    Person B: images at 40°, 48°, texts at 43° and 46°."""
    images, texts = unit(0, 8, 40, 48), unit(25, 4, 43, 46)
    return texts, images, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1])


def test_kreciprocal_fixes_the_hard_query() -> None:
    texts, images, tp, ip = hard_query_case()
    sim = cosine_matrix(texts, images)
    assert rank_order(sim)[0, 0] == 2  # the hard text ranks B's image first
    out = kreciprocal(sim, texts, images, k1=2, k2=1, lam=0.3)
    # Worked by hand (k1 = 2, so 3 nearest images incl. itself; k2 = 1: no query expansion):
    #  hard text's 2 nearest images {2, 1}; image 2's 2 nearest texts are B's → R(text) = {1}, V_T = e_1.
    #  Image sets R*: 0 → {0, 1}, 1 → {1, 0, 2}, 2 → {2, 3, 1}, 3 → {3, 2}; V = exp(cos − 1), normalised:
    #  V_0[1] = e^(cos8°−1) / (1 + e^(cos8°−1)) = .4976,
    #  V_1[1] = 1 / (1 + e^(cos8°−1) + e^(cos32°−1)) = .3510, V_2[1] = e^(cos32°−1) / (same sum) = .3015,
    #  V_3[1] = 0. d_J = 1 − m / (2 − m) with m = V_g[1];
    #  score = 0.3·cos(angle to the image) − 0.7·d_J with angles 25°, 17°, 15°, 23°.
    m = torch.tensor([0.4976, 0.3510, 0.3015, 0.0])
    angles = torch.tensor([25.0, 17.0, 15.0, 23.0]) * math.pi / 180
    assert torch.allclose(out[0], 0.3 * angles.cos() - 0.7 * (1 - m / (2 - m)), atol=1e-3)
    assert rank_order(out)[0].tolist() == [0, 1, 2, 3]
    before, after = retrieval_metrics(sim, tp, ip), retrieval_metrics(out, tp, ip)
    assert before["R@1"] == pytest.approx(75.0)
    assert after["R@1"] == pytest.approx(100.0) and after["mAP"] == pytest.approx(100.0)


def test_kreciprocal_lambda_one_keeps_scores() -> None:
    texts, images, _, _ = hard_query_case()
    sim = cosine_matrix(texts, images)
    assert torch.allclose(kreciprocal(sim, texts, images, k1=2, k2=2, lam=1.0), sim)


def test_rerankers_do_not_depend_on_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    texts, images = torch.randn(30, 6, generator=g), torch.randn(25, 6, generator=g)
    sim = cosine_matrix(texts, images)
    whole = (rvn(sim, texts, images, neighbours=4), kreciprocal(sim, texts, images, k1=5, k2=3))
    monkeypatch.setattr(rerank, "GATHER_ELEMENTS", 1)  # one row per chunk
    chunked = (rvn(sim, texts, images, neighbours=4), kreciprocal(sim, texts, images, k1=5, k2=3))
    for a, b in zip(whole, chunked, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
