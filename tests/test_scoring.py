"""Chunked exact scoring and the two-stage shortlist, with a toy cross-term method."""

from __future__ import annotations

import pytest
import torch
from toy_method import ToyMethod, random_features

from pedcli.engine.retrieval.metrics import rank_order, retrieval_metrics
from pedcli.engine.retrieval.scoring import (
    cosine_matrix,
    score_matrix,
    shortlist,
    shortlist_scores,
    two_stage_scores,
)
from pedcli.errors import PedError
from pedcli.models.methods.base import Method


@pytest.fixture(scope="module")
def setup() -> tuple[ToyMethod, dict, dict]:
    text, image = random_features(23, 17)
    return ToyMethod().eval(), text, image


def test_chunked_scores_equal_one_shot(setup) -> None:
    method, text, image = setup
    one_shot = method.similarity(text, image)
    assert one_shot.shape == (23, 17)
    for tc, ic in ((1, 1), (5, 4), (7, 100), (100, 3)):
        assert torch.allclose(score_matrix(method, text, image, tc, ic), one_shot, atol=1e-6)


def test_pair_similarity_matches_the_diagonal(setup) -> None:
    method, text, image = setup
    n = 17
    t = {k: v[:n] for k, v in text.items()}
    diag = method.similarity(t, image).diagonal()
    assert torch.allclose(method.pair_similarity(t, image), diag, atol=1e-6)
    # the base class's row-by-row default agrees with the batched override
    assert torch.allclose(Method.pair_similarity(method, t, image), diag, atol=1e-6)


def test_shortlist_is_cosine_top_k() -> None:
    g = torch.Generator().manual_seed(1)
    q, gal = torch.randn(9, 4, generator=g), torch.randn(12, 4, generator=g)
    idx = shortlist(q, gal, 5, chunk=2)
    assert idx.shape == (9, 5)
    cos = cosine_matrix(q, gal)
    assert torch.equal(idx, rank_order(cos)[:, :5])
    outside = cos.scatter(1, idx, float("-inf"))
    assert torch.all(cos.gather(1, idx).amin(1) >= outside.amax(1))
    assert shortlist(q, gal, 50).shape == (9, 12)  # k clamps to the gallery size


@pytest.mark.parametrize("queries", ["text", "image"])
def test_two_stage_with_full_shortlist_is_exact(setup, queries: str) -> None:
    method, text, image = setup
    exact = score_matrix(method, text, image)
    n_gallery = 17 if queries == "text" else 23
    two = two_stage_scores(method, text, image, k=n_gallery, pair_chunk=7, queries=queries)
    assert torch.allclose(two, exact, atol=1e-6)
    if queries == "text":  # hence identical metrics
        pids_t, pids_i = torch.arange(23) % 4, torch.arange(17) % 4
        expected = retrieval_metrics(exact, pids_t, pids_i)
        assert retrieval_metrics(two, pids_t, pids_i) == pytest.approx(expected)


def test_two_stage_small_k_agrees_on_the_shortlist(setup) -> None:
    method, text, image = setup
    k = 4
    exact = score_matrix(method, text, image)
    two = two_stage_scores(method, text, image, k=k, pair_chunk=5)
    idx = shortlist(text["global"], image["global"], k)
    # shortlisted pairs carry their exact score …
    assert torch.allclose(two.gather(1, idx), exact.gather(1, idx), atol=1e-6)
    # … the ranking's first k items are exactly the shortlist, in exact-score order …
    top = rank_order(two)[:, :k]
    assert torch.equal(top.sort(1).values, idx.sort(1).values)
    assert torch.equal(top, idx.gather(1, rank_order(exact.gather(1, idx))))
    # … and the unscored rest follows in cosine order below them
    cos = cosine_matrix(text["global"], image["global"])
    rest = rank_order(two)[:, k:]
    assert torch.all(cos.gather(1, rest)[:, :-1] >= cos.gather(1, rest)[:, 1:])
    assert torch.all(two.gather(1, rest).amax(1) < two.gather(1, idx).amin(1))


def test_two_stage_rejects_empty_shortlist(setup) -> None:
    method, text, image = setup
    with pytest.raises(PedError, match="at least 1"):
        two_stage_scores(method, text, image, k=0)


@pytest.mark.parametrize("queries", ["text", "image"])
def test_shortlist_scores_are_the_exact_scores_of_the_shortlist(setup, queries: str) -> None:
    """The one re-scoring helper of two-stage eval and `ped query`: any chunking, any repeated rows."""
    method, text, image = setup
    exact = score_matrix(method, text, image)
    full = exact if queries == "text" else exact.T
    g = torch.Generator().manual_seed(3)
    index = torch.randint(0, full.shape[1], (full.shape[0], 5), generator=g)
    expected = full.gather(1, index)
    for pair_chunk in (1, 7, 10_000):
        got = shortlist_scores(method, text, image, index, queries, pair_chunk=pair_chunk, device="cpu")
        assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-6)
