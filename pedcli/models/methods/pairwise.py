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
        """[n_query, K] with the same kernels as `similarity`, without a copy of the larger side per pair.

        The pairs are grouped by their item of the side with more elements per item (a PMA image's 36
        vectors, a NAFS caption's ~70 keys and values): each group is one row that reads that item once,
        against the other side's items, which are prepared once and gathered per pair. When the queries
        are that side, the rows are simply the queries and their K items."""
        n, k = index.shape
        own_q = torch.arange(n, device=index.device).repeat_interleave(k)
        t_idx, i_idx = (own_q, index.reshape(-1)) if queries == "text" else (index.reshape(-1), own_q)
        return self._score_pairs(text_feats, image_feats, t_idx, i_idx, k).view(n, k)

    def _score_pairs(
        self, text: Features, image: Features, t_idx: Tensor, i_idx: Tensor, width: int
    ) -> Tensor:
        """Scores of the pairs (t_idx[p], i_idx[p]) in rows of `width` pairs sharing one item. The
        gathered copies go into buffers reused from chunk to chunk: a fresh large buffer per chunk costs
        a page fault per page, which made the copies 5-20x slower than the scoring on a 2-core machine."""
        gather_text = _item_size(text) < _item_size(image)
        owners, others = (i_idx, t_idx) if gather_text else (t_idx, i_idx)
        n_owners = (image if gather_text else text)["global"].shape[0]
        grid, row_owner, slot, order = _group_rows(owners, others, n_owners, width)
        gathered = self._ready_text(text) if gather_text else self.image_side(image)
        scores = torch.empty(grid.shape, device=text["global"].device)
        step = self._step(gathered if gather_text else text, width, gathered)
        buffers = {k: v.new_empty((min(step, len(grid)) * width, *v.shape[1:])) for k, v in gathered.items()}
        for rows in torch.arange(len(grid), device=grid.device).split(step):
            other = gather_rows(gathered, grid[rows], buffers)
            if gather_text:
                own = self.image_side(index_features(image, row_owner[rows]))
                scores[rows] = self.scores(other, own, "texts_per_image")
            else:
                own = self._ready_text(index_features(text, row_owner[rows]))
                scores[rows] = self.scores(own, other, "images_per_text")
        out = torch.empty(len(owners), device=scores.device)
        out[order] = scores[slot]
        return out


def _item_size(feats: Features) -> int:
    """Elements per item of a feature dict (as stored: padded units count)."""
    return sum(v[0].numel() for v in feats.values()) if len(feats["global"]) else 0


def _group_rows(
    owners: Tensor, others: Tensor, n_owners: int, width: int
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor], Tensor]:
    """Pairs (owners[p], others[p]) grouped by owner into rows of `width` (a group longer than that takes
    several rows, the last one padded with item 0): (grid [R, width] of `others`, the owner of each row
    [R], the (row, column) slot of each pair in owner-sorted order, that order)."""
    order = torch.argsort(owners, stable=True)
    own, oth = owners[order], others[order]
    counts = torch.bincount(own, minlength=n_owners)
    pos = torch.arange(len(own), device=own.device) - (counts.cumsum(0) - counts)[own]
    rows_per = (counts + width - 1) // width
    row = (rows_per.cumsum(0) - rows_per)[own] + pos // width
    col = pos % width
    grid = torch.zeros(int(rows_per.sum()), width, dtype=torch.long, device=own.device)
    grid[row, col] = oth
    row_owner = torch.repeat_interleave(torch.arange(n_owners, device=own.device), rows_per)
    return grid, row_owner, (row, col), order
