"""The typed `Explanation` every method's `explain()` returns, and the `View` the result pages draw from it:
one shape for regions, stripes, spatial maps, phrase → part links and unit focus (no key sniffing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pedcli.engine.search.explain_view import View, views
from pedcli.models.explanation import Explanation, as_array


def test_regions_with_kept_cells_and_phrase_links() -> None:
    grid = np.arange(48.0).reshape(2, 6, 4)
    pma = Explanation(
        "attention over regions",
        grid=grid,
        selected=grid % 5 == 0,
        parts=["head", "torso"],
        links=np.array([[[0.9, 0.1], [0.2, 0.8]]] * 2),  # [images, phrases, parts]
    )
    v = views(pma, 2, ["a red shirt", "black shoes"])
    assert v[1].grid.shape == (6, 4) and v[1].grid.max() == 1 and v[1].grid[0, 0] == 0
    assert v[0].selected[0, 0] and not v[0].selected[0, 1]
    assert [(p, part) for p, part, _ in v[0].phrases] == [("a red shirt", "head"), ("black shoes", "torso")]
    assert v[0].label == "attention over regions"


def test_stripes_and_named_text_units() -> None:
    mgel = Explanation("similarity of 3 stripes", grid=np.array([[[0.1], [0.7], [0.3]]] * 2))
    assert views(mgel, 2, [])[0].grid[:, 0].argmax() == 1
    mia = Explanation(
        "attention over stripes",
        grid=np.ones((1, 3, 1)),
        parts=["stripe 1", "stripe 2", "stripe 3"],
        links=np.array([[[0.1, 0.2, 0.7]]]),
    )
    (mv,) = views(mia, 1, ["a bag"])
    assert mv.phrases[0][:2] == ("a bag", "stripe 3") and (mv.grid == 1).all()  # a flat grid: all drawn


def test_focus_without_geometry() -> None:
    nafs = Explanation(
        "the sentence attends to",
        parts=["global", "region 1", "patch 1"],
        links=np.array([[[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]]),
        link_texts=["sentence", "word 1"],
        focus=np.array([[0.2, 0.7, 0.1]]),
    )
    (nv,) = views(nafs, 1, ["ignored: the method names its own text units"])
    assert nv.grid is None and nv.label == "the sentence attends to region 1 0.70, global 0.20, patch 1 0.10"
    assert [(t, u) for t, u, _ in nv.phrases] == [("sentence", "region 1"), ("word 1", "patch 1")]


def test_nothing_to_show_and_json() -> None:
    assert views(None, 2, [])[0] == View() and views(Explanation("nothing"), 3, []) == [View()] * 3
    grid = np.array([[[0.0, 2.0]]])
    d = views(Explanation("g", grid=grid, selected=grid > 1), 1, [])[0].to_dict()
    assert d == {"grid": [[0.0, 1.0]], "selected": [[False, True]], "label": "g", "phrases": []}
    with pytest.raises(ValueError, match="covers 1 images, not 2"):
        views(Explanation("g", grid=grid), 2, [])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"grid": np.zeros((2, 3))}, "grid has shape"),
        ({"grid": np.zeros((2, 3, 1)), "selected": np.zeros((2, 4, 1), bool)}, "same shape"),
        ({"links": np.zeros((2, 1, 3)), "parts": ["a", "b"]}, "weighs 3 parts, 2 named"),
        ({"links": np.zeros((2, 1, 2)), "parts": ["a", "b"], "link_texts": ["x", "y"]}, "name every row"),
        ({"grid": np.zeros((2, 3, 1)), "focus": np.zeros((3, 2)), "parts": ["a", "b"]}, "focus has shape"),
    ],
)
def test_inconsistent_shapes_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        Explanation("bad", **kwargs)


def test_as_array_takes_tensors_and_arrays() -> None:
    t = torch.tensor([[1.0, 2.0]], dtype=torch.float16, requires_grad=False)
    assert as_array(t).dtype == np.float32 and as_array(torch.tensor([True]), bool).tolist() == [True]
    assert as_array([[1, 2]]).shape == (1, 2)
