"""Turn a method's `Explanation` into what a result page draws for each matched image: a heat grid over
the image and the text units with the part each one matched (as the papers' figures show). The static
HTML report (`pedcli.engine.search.report`) and `ped serve` both draw from `View`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pedcli.models.explanation import Explanation

FOCUS_SHOWN = 3  # units named in a focus label ("the sentence attends to region 1 0.70, global …")


@dataclass
class View:
    """What to draw for one matched image."""

    grid: np.ndarray | None = None  # [rows, cols] in 0..1 (min–max scaled), None = no heat map
    selected: np.ndarray | None = None  # bool [rows, cols]: regions the method kept
    label: str = ""  # what the grid shows
    phrases: list[tuple[str, str, float]] = field(default_factory=list)  # (phrase, matched part, weight)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the `ped serve` API)."""
        return {
            "grid": None if self.grid is None else np.round(self.grid.astype(np.float64), 4).tolist(),
            "selected": None if self.selected is None else self.selected.astype(bool).tolist(),
            "label": self.label,
            "phrases": [{"phrase": p, "part": part, "weight": round(w, 4)} for p, part, w in self.phrases],
        }


def _unit(grid: np.ndarray) -> np.ndarray:
    """Scale to 0..1 by min–max, so the strongest cell is always fully drawn."""
    lo, hi = float(grid.min()), float(grid.max())
    return (grid - lo) / (hi - lo) if hi > lo else np.ones_like(grid)


def _view(expl: Explanation, i: int, phrases: list[str]) -> View:
    grid = None if expl.grid is None else _unit(expl.grid[i].astype(np.float32))
    selected = None if expl.selected is None else expl.selected[i].astype(bool)
    label = expl.label if expl.grid is not None else ""
    if expl.focus is not None:
        weights = expl.focus[i]
        best = np.argsort(-weights, kind="stable")[:FOCUS_SHOWN]
        label = f"{expl.label} " + ", ".join(f"{expl.parts[k]} {weights[k]:.2f}" for k in best)
    links: list[tuple[str, str, float]] = []
    if expl.links is not None:
        texts = expl.link_texts if expl.link_texts is not None else phrases
        for text, w in zip(texts, expl.links[i], strict=False):  # the best-weighted part of each text unit
            links.append((str(text), expl.parts[int(w.argmax())], float(w.max())))
    return View(grid, selected, label, links)


def views(expl: Explanation | None, n_images: int, phrases: list[str]) -> list[View]:
    """One `View` per image of the explained batch (empty views when the method explains nothing)."""
    if expl is None or expl.size == 0:
        return [View() for _ in range(n_images)]
    if expl.size != n_images:
        raise ValueError(f"the explanation covers {expl.size} images, not {n_images}")
    return [_view(expl, i, phrases) for i in range(n_images)]
