"""Two-stage re-scoring of the cross-attention methods (`PairwiseMethod.shortlist_similarity`): pairs in
rows sharing one item, rows sorted by the texts' unit counts so each call cuts its own padding, the row
width chosen to waste the fewest padded slots; scores equal to exact scoring whatever the grouping."""

from __future__ import annotations

import pytest
import torch
from method_batch import TINY_INFO

from pedcli.models import attention as att
from pedcli.models.methods import create_method, mia
from pedcli.models.methods.pairwise import PairwiseMethod, _group_rows, _row_width

N_TEXT, N_IMAGE, K, UNITS = 40, 30, 7, 10


def _units(g: torch.Generator, n: int) -> torch.Tensor:
    """[n, UNITS] masks with 1 to UNITS leading units valid."""
    counts = torch.randint(1, UNITS + 1, (n,), generator=g)
    return torch.arange(UNITS)[None, :] < counts[:, None]


def pma_side(g: torch.Generator, d: int) -> tuple[dict, dict]:
    mask = _units(g, N_TEXT)
    sentence = torch.nn.functional.normalize(torch.randn(N_TEXT, d, generator=g), dim=-1)
    text = {"global": torch.randn(N_TEXT, 2 * d, generator=g), "sentence": sentence, "phrases_mask": mask,
            "phrases": torch.randn(N_TEXT, UNITS, d, generator=g) * mask[..., None],
            "phrase_norms": torch.rand(N_TEXT, UNITS, generator=g) * mask}  # fmt: skip
    image = {key: torch.nn.functional.normalize(torch.randn(N_IMAGE, n, d, generator=g), dim=-1)
             for key, n in (("regions", 24), ("parts", 6), ("fa_parts", 6))}  # fmt: skip
    return text, {"global": torch.randn(N_IMAGE, 2 * d, generator=g), **image}


def mia_side(g: torch.Generator, d: int) -> tuple[dict, dict]:
    def mlp(u: torch.Tensor) -> torch.Tensor:
        return torch.randn(u.shape, generator=g)

    mask = _units(g, N_TEXT)
    text = mia.unit_features(torch.randn(N_TEXT, UNITS, d, generator=g) * mask[..., None], "phrases",
                             {"rga": mlp, "bfm": mlp})  # fmt: skip
    text |= {"global": torch.randn(N_TEXT, d, generator=g), "phrases_mask": mask}
    image = mia.unit_features(torch.randn(N_IMAGE, 6, d, generator=g), "parts", {"rga": mlp, "bfm": mlp})
    return text, {"global": torch.randn(N_IMAGE, d, generator=g), **image}


SIDES = {"pma": pma_side, "mia": mia_side}
OPTIONS = {"pma": {"pose_widths": [4, 4, 4, 4]}, "mia": {"mlp_hidden": 7}}


@pytest.fixture(scope="module", params=sorted(SIDES))
def setup(request: pytest.FixtureRequest) -> tuple[PairwiseMethod, dict, dict, torch.Tensor]:
    """(method, text, image features, exact scores): PMA's texts are gathered (rows of one image), MIA's
    images (rows of one text)."""
    torch.manual_seed(0)
    options = {"embed_dim": 8, "hidden": 6, "word_dim": 5, "pretrained": "none", **OPTIONS[request.param]}
    method = create_method(request.param, TINY_INFO, options).eval()
    text, image = SIDES[request.param](torch.Generator().manual_seed(1), 8)
    with torch.no_grad():
        return method, text, image, method.similarity(text, image)


def _skewed_shortlist(n_query: int, n_item: int, seed: int) -> torch.Tensor:
    """[n_query, K] distinct items per query, a few items in most shortlists (hubs, as a cosine shortlist
    of random features gives), so groups differ in size and some span several rows."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.linspace(1.0, 0.05, n_item) ** 3
    return torch.stack([torch.multinomial(weights, K, generator=g) for _ in range(n_query)])


@pytest.mark.parametrize("budget", [None, 1])
def test_shortlist_scores_equal_exact_scores(setup, budget, monkeypatch) -> None:
    """Both query sides, with the default copy budget and with one row per call."""
    method, text, image, sim = setup
    if budget is not None:
        monkeypatch.setattr(method, "gather_budget", budget)
        monkeypatch.setattr(method, "min_gather_rows", 1)
    with torch.no_grad():
        index = _skewed_shortlist(N_TEXT, N_IMAGE, 2)
        got = method.shortlist_similarity(text, image, index)
        assert torch.allclose(got, sim.gather(1, index), atol=1e-5, rtol=1e-5)
        index = _skewed_shortlist(N_IMAGE, N_TEXT, 3)
        got = method.shortlist_similarity(text, image, index, queries="image")
        assert torch.allclose(got, sim.T.gather(1, index), atol=1e-5, rtol=1e-5)


def test_each_call_cuts_its_texts_to_their_longest(setup, monkeypatch) -> None:
    """Padding to the split's longest caption would make every call as costly as the longest one."""
    method, text, image, _ = setup
    seen: list[tuple[int, int]] = []
    scores = type(method).scores

    def spy(self, t: dict, i: dict, layout: att.Layout) -> torch.Tensor:
        mask = t["phrases_mask"]
        longest = int((mask * torch.arange(1, mask.shape[-1] + 1)).amax())
        seen.append((t["phrases"].shape[-2], longest))
        return scores(self, t, i, layout)

    monkeypatch.setattr(type(method), "scores", spy)
    monkeypatch.setattr(method, "gather_budget", 1)
    monkeypatch.setattr(method, "min_gather_rows", 1)
    with torch.no_grad():
        method.shortlist_similarity(text, image, _skewed_shortlist(N_TEXT, N_IMAGE, 4))
    assert len(seen) > 1 and all(width == longest for width, longest in seen), seen
    assert len({width for width, _ in seen}) > 1  # the set's texts do differ in length


def test_rows_hold_each_pair_once_in_unit_order_padded_with_their_own_item() -> None:
    owners = torch.tensor([2, 0, 2, 2, 0, 2, 2])
    others = torch.tensor([10, 11, 12, 13, 14, 15, 16])
    key = torch.tensor([5, 1, 3, 9, 0, 1, 4])
    grid, row_owner, (row, col), order = _group_rows(owners, others, 3, 3, key)
    assert row_owner.tolist() == [0, 2, 2]
    assert grid.tolist() == [[14, 11, 14], [15, 12, 16], [10, 13, 10]]
    assert torch.equal(grid[row, col], others[order])


def test_the_row_width_wastes_the_fewest_slots() -> None:
    owners = torch.repeat_interleave(torch.arange(3), torch.tensor([30, 30, 20]))
    assert _row_width(owners, 40) == 30  # 90 slots; 40 wide: 120, 20 wide: 100
    assert _row_width(torch.arange(5).repeat(8), 8) == 8  # every group fills one row
