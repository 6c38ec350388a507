"""Turn a method's `explain()` output into what the query page draws: a heat grid over the image and the
noun phrases with the part they matched (as the papers' figures show).

Methods return different things (pedcli/models/methods/*.py `explain`); the keys read here:
  region_grid (rows, cols) + regions [n_image, rows·cols]   attention over a region grid (PMA, MIA)
  selected bool [n_image, rows·cols]                        regions the attention kept (PMA, eq. 9)
  spatial_attention [n_image, (1,) h, w]                    a spatial map (HAN, eq. 1)
  granularities + stripe_similarity [n_text, n_image, g]    per-stripe cosines (MGEL); the finest is drawn
  phrases + parts: [n_image, n_parts, m]                    weight of each phrase per body part (PMA)
  phrases without parts: [n_image, m, rows]                 weight of each phrase over the stripes (MIA)
  image_units, text_units + text_to_image [n_image, t, u]    named units, no geometry (NAFS): each text
                         unit with the image unit it attends to most; regions [n_image, u] the sentence's
Anything else is ignored: the page then shows the thumbnail alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class View:
    """What to draw for one matched image."""

    grid: np.ndarray | None = None  # [rows, cols] in 0..1 (max-normalised), None = no heat map
    selected: np.ndarray | None = None  # bool [rows, cols]: regions the method kept
    label: str = ""  # what the grid shows
    phrases: list[tuple[str, str, float]] = field(default_factory=list)  # (phrase, matched part, weight)


def _array(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu().float() if hasattr(x, "detach") else x, dtype=np.float32)


def _unit(grid: np.ndarray) -> np.ndarray:
    """Scale to 0..1 by min–max, so the strongest cell is always fully drawn."""
    lo, hi = float(grid.min()), float(grid.max())
    return (grid - lo) / (hi - lo) if hi > lo else np.ones_like(grid)


def _grid(expl: dict[str, Any], i: int) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    if "regions" in expl and "region_grid" in expl:
        rows, cols = (int(v) for v in expl["region_grid"])
        grid = _array(expl["regions"])[i].reshape(rows, cols)
        sel = np.asarray(expl["selected"])[i].reshape(rows, cols).astype(bool) if "selected" in expl else None
        return _unit(grid), sel, "attention over regions"
    if "spatial_attention" in expl:
        grid = _array(expl["spatial_attention"])[i]
        return _unit(grid.reshape(grid.shape[-2:])), None, "spatial attention"
    if "stripe_similarity" in expl:
        finest = max(expl["stripe_similarity"], key=lambda s: s.shape[-1])
        stripes = _array(finest)[0, i]
        return _unit(stripes[:, None]), None, f"similarity of {len(stripes)} stripes"
    if "regions" in expl and "image_units" in expl:
        weights = _array(expl["regions"])[i]
        best = np.argsort(-weights, kind="stable")[:3]
        top = ", ".join(f"{expl['image_units'][k]} {weights[k]:.2f}" for k in best)
        return None, None, f"the sentence attends to {top}"
    return None, None, ""


def _phrases(expl: dict[str, Any], i: int, phrases: list[str]) -> list[tuple[str, str, float]]:
    if "text_to_image" in expl and "image_units" in expl:
        units = [str(u) for u in expl["image_units"]]
        weights = _array(expl["text_to_image"])[i]  # [text units, image units]
        pairs = zip(expl["text_units"], weights, strict=True)
        return [(str(t), units[int(w.argmax())], float(w.max())) for t, w in pairs]
    if "phrases" not in expl:
        return []
    weights = _array(expl["phrases"])[i]
    if "parts" in expl:  # [parts, m]: the part whose weight for the phrase is largest
        names = [str(p) for p in expl["parts"]]
        weights = weights.T
    else:  # [m, stripes]
        names = [f"stripe {k + 1}" for k in range(weights.shape[-1])]
    return [(text, names[int(w.argmax())], float(w.max())) for text, w in zip(phrases, weights, strict=False)]


def views(expl: dict[str, Any] | None, n_images: int, phrases: list[str]) -> list[View]:
    """One `View` per image of the explained batch (empty views when the method explains nothing)."""
    if not expl:
        return [View() for _ in range(n_images)]
    out = []
    for i in range(n_images):
        grid, sel, label = _grid(expl, i)
        out.append(View(grid, sel, label, _phrases(expl, i, phrases)))
    return out
