"""Losses on small tensors whose expected values are worked out by hand below."""

from __future__ import annotations

import math

import pytest
import torch

from pedcli.models.losses import (
    SharedClassifier,
    cmpc_loss,
    cmpm_loss,
    identity_loss,
    sum_of_hinges,
    triplet_hardest,
)

# text i (row) against image j (column); every item its own person
SIM = torch.tensor([[0.8, 0.7, 0.1], [0.2, 0.5, 0.4], [0.6, 0.3, 0.9]])
PIDS = torch.tensor([0, 1, 2])
MARGIN = 0.3


def test_triplet_hardest_uses_the_hardest_negative_of_each_row_and_column() -> None:
    # pair 0: row max negative 0.7, column max negative 0.6; pair 1: 0.4 and 0.7; pair 2: all hinges < 0
    expected = ((0.3 - 0.8 + 0.7) + (0.3 - 0.8 + 0.6) + (0.3 - 0.5 + 0.4) + (0.3 - 0.5 + 0.7)) / 3
    assert triplet_hardest(SIM, PIDS, MARGIN).item() == pytest.approx(expected)


def test_sum_of_hinges_adds_every_violating_negative() -> None:
    # pair 0: row 0.7 (0.1 does not violate), column 0.6 (0.2 does not);
    # pair 1: row 0.4 (0.2 sits exactly on the margin), column 0.7 and 0.3; pair 2: none
    expected = (
        (0.3 - 0.8 + 0.7) + (0.3 - 0.8 + 0.6) + (0.3 - 0.5 + 0.4) + (0.3 - 0.5 + 0.7) + (0.3 - 0.5 + 0.3)
    ) / 3
    assert sum_of_hinges(SIM, PIDS, MARGIN).item() == pytest.approx(expected)


@pytest.mark.parametrize("loss", [triplet_hardest, sum_of_hinges])
def test_same_person_pairs_are_positives_not_negatives(loss) -> None:
    sim = torch.tensor([[0.1, 0.9], [0.9, 0.1]], requires_grad=True)
    # different people: the 0.9 off-diagonal scores are violating negatives
    assert loss(sim, torch.tensor([0, 1])).item() > 0
    # one person: no negatives at all, so nothing to rank and no NaN gradient
    value = loss(sim, torch.tensor([5, 5]))
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(sim.grad).all()


def test_identity_loss_ignores_unlabelled_rows() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 5.0]], requires_grad=True)
    value = identity_loss(logits, torch.tensor([0, -100]))
    assert value.item() == pytest.approx(math.log(1 + math.exp(-2.0)))
    none = identity_loss(logits, torch.tensor([-100, -100]))
    none.backward()
    assert none.item() == 0.0
    assert logits.grad is not None


def test_shared_classifier_is_bias_free_by_default() -> None:
    clf = SharedClassifier(4, 3)
    assert clf.fc.bias is None
    assert clf(torch.zeros(2, 4)).abs().sum().item() == 0.0
    assert SharedClassifier(4, 3, bias=True).fc.bias is not None


def _kl(p: list[float], q: list[float], eps: float) -> float:
    return sum(pi * math.log(pi / (qi + eps)) for pi, qi in zip(p, q, strict=True))


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("pids", [[0, 1], [4, 4]])
def test_cmpm_is_kl_to_the_true_matching_distribution_in_both_directions(pids: list[int]) -> None:
    image = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # normalised: the unit axes
    eps = 1e-8
    q = [[1.0, 0.0], [0.0, 1.0]] if pids == [0, 1] else [[0.5, 0.5], [0.5, 0.5]]
    # image onto normalised text: x_i · z̄_j = [[2, 0], [0, 1]]; text onto normalised image: [[1, 0], [0, 3]]
    i2t = (_kl(_softmax([2, 0]), q[0], eps) + _kl(_softmax([0, 1]), q[1], eps)) / 2
    t2i = (_kl(_softmax([1, 0]), q[0], eps) + _kl(_softmax([0, 3]), q[1], eps)) / 2
    assert cmpm_loss(image, text, torch.tensor(pids), eps).item() == pytest.approx(i2t + t2i, rel=1e-5)


def test_cmpc_classifies_projections_with_normalised_weights() -> None:
    image = torch.tensor([[2.0, 0.0]])
    text = torch.tensor([[1.0, 1.0]])
    weight = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # normalised to the unit axes
    # image on text: (2/√2)·(1,1)/√2 = (1, 1) -> logits (1, 1); text on image: (1, 0) -> logits (1, 0)
    expected = math.log(2.0) + math.log(1 + math.exp(-1.0))
    assert cmpc_loss(image, text, torch.tensor([0]), weight).item() == pytest.approx(expected, rel=1e-6)
