"""What a method's `explain()` returns: one typed shape for every method, so the query page, the HTML
report and `ped serve` draw any method's attention without knowing which method produced it.

An explanation is always of ONE query against n images (the images of a ranking, in order):

- `grid` [n, rows, cols]: attention with geometry, rows top to bottom (PMA's 6×4 regions, MIA's and
  MGEL's horizontal stripes as [n, stripes, 1], HAN's spatial map). Raw values; viewers rescale them.
- `selected` bool [n, rows, cols]: the cells the method kept (PMA's hard attention, eq. 9).
- `parts` names the units that `links` and `focus` weigh ("head", "stripe 3", "region 1", …).
- `links` [n, len(link_texts), len(parts)]: how much each text unit attends to each part; the rows are
  `link_texts`, or the query's noun phrases when `link_texts` is None (the caller knows them).
- `focus` [n, len(parts)]: the whole sentence's weight per part, for methods without geometry (NAFS).
- `details`: method-specific arrays (component scores, raw cosines) for analysis and tests; never drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Explanation:
    """The attention behind one query's matches with n images (see the module docstring)."""

    label: str  # what `grid` (or `focus`) shows, in words
    grid: np.ndarray | None = None
    selected: np.ndarray | None = None
    parts: list[str] = field(default_factory=list)
    links: np.ndarray | None = None
    link_texts: list[str] | None = None
    focus: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Shapes are checked once here, so a viewer can index without guarding."""
        n = self.size
        for name in ("grid", "selected", "links", "focus"):
            arr = getattr(self, name)
            if arr is not None and (arr.shape[0] != n or arr.ndim != {"focus": 2}.get(name, 3)):
                raise ValueError(f"Explanation.{name} has shape {arr.shape}; expected {n} images first")
        if self.selected is not None and (self.grid is None or self.selected.shape != self.grid.shape):
            raise ValueError("Explanation.selected needs a grid of the same shape")
        for name, arr in (("links", self.links), ("focus", self.focus)):
            if arr is not None and arr.shape[-1] != len(self.parts):
                raise ValueError(f"Explanation.{name} weighs {arr.shape[-1]} parts, {len(self.parts)} named")
        texts = self.link_texts
        if self.links is not None and texts is not None and len(texts) != self.links.shape[1]:
            raise ValueError("Explanation.link_texts must name every row of links")

    @property
    def size(self) -> int:
        """Number of images explained."""
        for arr in (self.grid, self.links, self.focus):
            if arr is not None:
                return int(arr.shape[0])
        return 0


def as_array(x: Any, dtype: Any = np.float32) -> np.ndarray:
    """A tensor or array as a CPU numpy array (methods call this on their attention tensors)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x
        x = x.numpy()
    return np.asarray(x, dtype=dtype)
