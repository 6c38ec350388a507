"""Retrieval metrics: a hand-computed example (ties, several positives, both directions), chunking, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pedcli.engine.retrieval.metrics import bidirectional_metrics, rank_order, retrieval_metrics, top_k_order
from pedcli.errors import PedError

# 3 text queries × 5 gallery images. Worked by hand (ranks are 1-based; ties keep gallery order):
#  q0 pid 1: order 0,1,3,4,2 → pids 1,2,3,2,1: positives at ranks 1 and 5: AP = (1/1 + 2/5)/2 = 0.7, INP = 2/5
#  q1 pid 2: 0.9 first (image 3), then the 0.5 tie in index order 0,1,2,4 → pids 3,1,2,1,2:
#            positives at ranks 3 and 5: AP = (1/3 + 2/5)/2 = 11/30, INP = 2/5
#  q2 pid 3: order 2,0,1,3,4 → pids 1,1,2,3,2: positive at rank 4: AP = INP = 1/4
SIM = torch.tensor(
    [
        [0.9, 0.8, 0.1, 0.5, 0.2],
        [0.5, 0.5, 0.5, 0.9, 0.5],
        [0.3, 0.2, 0.4, 0.1, 0.0],
    ]
)
TEXT_PIDS = torch.tensor([1, 2, 3])
IMAGE_PIDS = torch.tensor([1, 2, 1, 3, 2])


def test_hand_computed_text_to_image() -> None:
    m = retrieval_metrics(SIM, TEXT_PIDS, IMAGE_PIDS, ks=(1, 3, 5))
    assert m["R@1"] == pytest.approx(100 * 1 / 3)  # only q0 hits at rank 1
    assert m["R@3"] == pytest.approx(100 * 2 / 3)  # q0, q1 (rank 3)
    assert m["R@5"] == pytest.approx(100.0)
    assert m["mAP"] == pytest.approx(100 * (0.7 + 11 / 30 + 0.25) / 3)
    assert m["mINP"] == pytest.approx(100 * (0.4 + 0.4 + 0.25) / 3)
    assert (m["queries"], m["gallery"]) == (3, 5)


def test_hand_computed_image_to_text() -> None:
    # Image queries rank the 3 texts by their column of SIM; each image has exactly one matching text:
    #  img0 pid1 [.9,.5,.3] → q0 at rank 1; img1 pid2 [.8,.5,.2] → q1 at rank 2;
    #  img2 pid1 [.1,.5,.4] → q0 at rank 3; img3 pid3 [.5,.9,.1] → q2 at rank 3; img4 pid2 [.2,.5,0] → rank 1.
    m = bidirectional_metrics(SIM, TEXT_PIDS, IMAGE_PIDS, ks=(1, 2))["i2t"]
    assert m["R@1"] == pytest.approx(100 * 2 / 5)
    assert m["R@2"] == pytest.approx(100 * 3 / 5)
    ap = [1, 1 / 2, 1 / 3, 1 / 3, 1]
    assert m["mAP"] == pytest.approx(100 * sum(ap) / 5)
    assert m["mINP"] == pytest.approx(m["mAP"])  # one positive each: INP = AP = 1/rank


def test_ties_keep_gallery_order() -> None:
    sim = torch.zeros(3, 4)  # every score tied
    m = retrieval_metrics(sim, torch.tensor([7, 8, 9]), torch.tensor([7, 8, 8, 9]), ks=(1, 2))
    # q7: rank 1; q8: ranks 2, 3 (AP (1/2 + 2/3)/2, INP 2/3); q9: rank 4
    assert m["R@1"] == pytest.approx(100 / 3)
    assert m["R@2"] == pytest.approx(200 / 3)
    assert m["mAP"] == pytest.approx(100 * (1 + (1 / 2 + 2 / 3) / 2 + 1 / 4) / 3)
    assert m["mINP"] == pytest.approx(100 * (1 + 2 / 3 + 1 / 4) / 3)
    assert rank_order(torch.tensor([[0.0, 1.0, 0.0, 1.0]])).tolist() == [[1, 3, 0, 2]]


def _reference(sim: torch.Tensor, qp: torch.Tensor, gp: torch.Tensor, k: int) -> tuple[float, float, float]:
    """Straightforward per-query loop, written independently of the vectorised code."""
    hits, aps, inps = [], [], []
    for row, pid in zip(sim.tolist(), qp.tolist(), strict=True):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        pos = [r + 1 for r, j in enumerate(order) if gp[j] == pid]
        hits.append(pos[0] <= k)
        aps.append(sum((i + 1) / r for i, r in enumerate(pos)) / len(pos))
        inps.append(len(pos) / pos[-1])
    n = len(hits)
    return 100 * sum(hits) / n, 100 * sum(aps) / n, 100 * sum(inps) / n


def test_chunked_equals_unchunked_and_reference() -> None:
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 6, (37, 23), generator=g).float()  # many ties
    sim[0, :5] = float("-inf")  # unscored pairs are allowed and rank last
    qp = torch.randint(0, 5, (37,), generator=g)
    gp = torch.cat([torch.arange(5), torch.randint(0, 5, (18,), generator=g)])  # every pid present
    whole = retrieval_metrics(sim, qp, gp, ks=(1, 5), chunk=1000)
    for chunk in (1, 4, 10):
        assert retrieval_metrics(sim, qp, gp, ks=(1, 5), chunk=chunk) == pytest.approx(whole)
    r5, ap, inp = _reference(sim, qp, gp, 5)
    assert (whole["R@5"], whole["mAP"], whole["mINP"]) == pytest.approx((r5, ap, inp))


def test_top_k_order_is_the_head_of_the_full_order() -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 4, (50, 12), generator=g).float()  # ties everywhere, also at the cut
    scores[:10] = torch.randn(10, 12, generator=g)  # and rows without ties
    for k in (1, 3, 12, 20):
        assert torch.equal(top_k_order(scores, k), rank_order(scores)[:, :k])


def test_k_beyond_gallery_is_clamped() -> None:
    m = retrieval_metrics(SIM, TEXT_PIDS, IMAGE_PIDS, ks=(10,))
    assert m["R@10"] == pytest.approx(100.0)


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(PedError, match="no match"):
        retrieval_metrics(SIM, torch.tensor([1, 2, 4]), IMAGE_PIDS)
    nan = SIM.clone()
    nan[1, 1] = float("nan")
    with pytest.raises(PedError, match="NaN"):
        retrieval_metrics(nan, TEXT_PIDS, IMAGE_PIDS)
    with pytest.raises(ValueError, match="ids"):
        retrieval_metrics(SIM, TEXT_PIDS[:2], IMAGE_PIDS)


def test_chance_r1_is_the_mean_share_of_matching_gallery_items():
    from pedcli.engine.retrieval.metrics import chance_r1

    # query 1 matches 2 of 4 gallery items, query 2 one of 4: (50 + 25) / 2
    assert chance_r1(torch.tensor([1, 2]), torch.tensor([1, 1, 2, 3])) == pytest.approx(37.5)
    assert chance_r1(np.array([3]), np.array([1, 2])) == 0.0
