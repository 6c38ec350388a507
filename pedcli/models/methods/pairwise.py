"""The shape PMA, MIA and NAFS share: a score that needs the pair (cross-attention), not two vectors.

A subclass writes one `scores(text, image, layout)` for the four pair layouts of
`pedcli.models.attention` (every text × every image, aligned pairs, and the two shortlist layouts) and
says which text keys hold padded units. This base turns it into the contract's `similarity`,
`pair_similarity` and `shortlist_similarity`: texts float32, their unused unit columns trimmed, the
per-item derived quantities (`text_side` / `image_side`: Gram matrices, unit vectors) computed once per
item, and texts scored in sub-chunks so no intermediate exceeds `score_budget` elements.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from pedcli.models.attention import Layout, as_float, gather_rows, trim_units
from pedcli.models.methods.base import Features, Method, index_features


class PairwiseMethod(Method):
    """Base of the cross-attention methods: everything but the score itself written once."""

    # Largest [text, image, units, units] intermediate of one scoring call, in elements.
    score_budget: ClassVar[int] = 1 << 24
    # Largest copy of shortlisted items [texts, K, item elements] one shortlist scoring call gathers.
    gather_budget: ClassVar[int] = 1 << 22
    unit_keys: ClassVar[tuple[str, ...]] = ()  # text keys [B, M, ...] with one row per unit slot
    square_unit_keys: ClassVar[tuple[str, ...]] = ()  # text keys [B, M, M] (stored Gram matrices)

    # ---- what a subclass writes ---------------------------------------------------------------------
    def scores(self, text: Features, image: Features, layout: Layout) -> Tensor:
        """The method's test score of every pair of the layout, from `text_side` / `image_side` output."""
        raise NotImplementedError

    def pair_width(self, units: int) -> int:
        """Elements per (text, image) pair of the largest scoring intermediate, given `units` text units."""
        raise NotImplementedError

    def unit_mask(self, text: Features) -> Tensor | None:
        """[B, M] valid text units (None: the texts have no padded units)."""
        return text.get("phrases_mask")

    def text_side(self, text: Features) -> Features:
        """Text features as scoring reads them, plus what it derives from one text alone; idempotent."""
        return as_float(text)

    def image_side(self, image: Features) -> Features:
        """Image features as scoring reads them, plus what it derives from one image alone; idempotent."""
        return as_float(image)

    # ---- written once ------------------------------------------------------------------------------
    def trim(self, text: Features) -> Features:
        """Drop the unit columns no text of this set uses."""
        used = self.unit_mask(text)
        return text if used is None else trim_units(text, used, self.unit_keys, self.square_unit_keys)

    def _ready_text(self, text: Features) -> Features:
        return self.text_side(self.trim(as_float(text)))

    def _step(self, text: Features, per_text: int, gathered: Features | None = None) -> int:
        """Texts per scoring call such that `per_text` pairs per text keep the largest intermediate under
        `score_budget` and, for a shortlist, the copy of the `gathered` side's items under
        `gather_budget`."""
        used = self.unit_mask(text)
        cols = used.any(0).nonzero() if used is not None else None
        units = int(cols.max()) + 1 if cols is not None and cols.numel() else 1
        step = self.score_budget // max(1, per_text * self.pair_width(units))
        if gathered is not None and len(gathered["global"]):
            item = sum(v[0].numel() for v in gathered.values())
            step = min(step, self.gather_budget // max(1, per_text * item))
        return max(1, step)

    def _chunks(self, text: Features, per_text: int, gathered: Features | None = None) -> tuple[Tensor, ...]:
        """Text rows in sub-chunks of similar unit counts (each trims its own padding)."""
        used = self.unit_mask(text)
        if used is None:
            order = torch.arange(text["global"].shape[0], device=text["global"].device)
        else:
            order = torch.argsort(used.sum(1), stable=True)
        return order.split(self._step(text, per_text, gathered))

    def similarity(self, text_feats: Features, image_feats: Features) -> Tensor:
        """[n_text, n_image], texts in sub-chunks (see `_chunks`)."""
        nt, ni = text_feats["global"].shape[0], image_feats["global"].shape[0]
        out = torch.empty(nt, ni, device=text_feats["global"].device)
        image = self.image_side(image_feats)
        for rows in self._chunks(text_feats, ni):
            out[rows] = self.scores(self._ready_text(index_features(text_feats, rows)), image, "all")
        return out

    def pair_similarity(self, text_feats: Features, image_feats: Features) -> Tensor:
        return self.scores(self._ready_text(text_feats), self.image_side(image_feats), "pairs")

    def shortlist_similarity(
        self, text_feats: Features, image_feats: Features, index: Tensor, queries: str = "text"
    ) -> Tensor:
        """[n_query, K] with the same kernels as `similarity`: each query is read once; the other side
        is prepared once per item, then each query's K items are gathered in chunks small enough to
        stay in memory already touched (a fresh large buffer costs a page fault per page)."""
        n, k = index.shape
        out = torch.empty(n, k, device=text_feats["global"].device)
        if queries == "text":
            image = self.image_side(image_feats)
            for rows in self._chunks(text_feats, k, image):
                text = self._ready_text(index_features(text_feats, rows))
                out[rows] = self.scores(text, gather_rows(image, index[rows]), "images_per_text")
            return out
        text = self._ready_text(text_feats)
        step = self._step(text, k, text)
        for s in range(0, n, step):
            image = self.image_side(index_features(image_feats, slice(s, s + step)))
            out[s : s + step] = self.scores(gather_rows(text, index[s : s + step]), image, "texts_per_image")
        return out
