"""The shape PMA, MIA and NAFS share: a score that needs the pair (cross-attention), not two vectors.

A subclass writes one `scores(text, image, layout)` for the four pair layouts of
`pedcli.models.attention` (every text × every image, aligned pairs, and the two shortlist layouts) and
says which text keys hold padded units. This base turns it into the contract's `similarity`,
`pair_similarity` and `shortlist_similarity`: texts float32, their unused unit columns trimmed, the
per-item derived quantities (`text_side` / `image_side`: Gram matrices, unit vectors) computed once per
item, and texts scored in sub-chunks so no intermediate exceeds `score_budget` elements.

A shortlist is scored in rows of pairs sharing one item (see `_score_pairs`), sorted by how many text
units the pairs use, so each call trims the padding of its own texts as exact scoring's chunks do.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from pedcli.models.attention import Layout, as_float, cut_units, gather_rows, trim_units
from pedcli.models.methods.base import Features, Method, index_features


class PairwiseMethod(Method):
    """Base of the cross-attention methods: everything but the score itself written once."""

    # Largest [text, image, units, units] intermediate of one scoring call, in elements: 8 MB of float32,
    # so a call's few intermediates stay in a 32 MB L3 cache between their elementwise passes. Exact
    # scoring at the CUHK-PEDES size, one thread (`bench_scoring.py --cpu-time --score-budget N`, process
    # CPU seconds beside two other jobs): 1 << 21 against 1 << 24 took MIA 137-141 s against 182-196,
    # PMA 111-117 against 126-140, NAFS (1 << 23 before) 359-363 against 452-457; 1 << 18 and 1 << 19
    # were slower again.
    score_budget: ClassVar[int] = 1 << 21
    # Largest copy of shortlisted items [rows, K, item elements] one shortlist scoring call gathers, but
    # never fewer than `min_gather_rows` rows: MIA's 2 texts per call at this budget spent a third of the
    # time in per-call overhead, while PMA is faster with this budget than with 4 times more.
    gather_budget: ClassVar[int] = 1 << 22
    min_gather_rows: ClassVar[int] = 8
    # Text keys [B, M, ...] with one row per unit slot, and [B, M, M] ones (Gram matrices), both those
    # stored and those `text_side` derives (a shortlist cuts prepared texts to their rows' unit count).
    unit_keys: ClassVar[tuple[str, ...]] = ()
    square_unit_keys: ClassVar[tuple[str, ...]] = ()
    # Whether `scores` reads "global" (else it is only the shortlist feature, and a shortlist does not copy
    # it per pair: a fifth of what PMA gathers per caption).
    scores_read_global: ClassVar[bool] = True

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

    def _rows_per_call(self, units: int, per_row: int, item: int = 0) -> int:
        """Rows of `per_row` pairs per scoring call, their texts using `units` unit slots: the largest
        intermediate under `score_budget` and the copy of `item` gathered elements per pair under
        `gather_budget`."""
        step = self.score_budget // max(1, per_row * self.pair_width(units))
        if item:
            step = min(step, max(self.min_gather_rows, self.gather_budget // max(1, per_row * item)))
        return max(1, step)

    def _unit_counts(self, text: Features) -> Tensor:
        """[B] unit slots each text needs (its last valid unit + 1; 1 where texts have no padded units)."""
        used = self.unit_mask(text)
        if used is None or not used.shape[1]:
            return torch.ones(text["global"].shape[0], dtype=torch.long, device=text["global"].device)
        return (used * torch.arange(1, used.shape[1] + 1, device=used.device)).amax(1).clamp(min=1)

    def _chunks(self, text: Features, per_text: int) -> tuple[Tensor, ...]:
        """Text rows in sub-chunks of similar unit counts (each trims its own padding), as many texts per
        chunk as keep `per_text` pairs per text under `score_budget` at the longest text's units."""
        counts = self._unit_counts(text)
        step = self._rows_per_call(int(counts.max()) if len(counts) else 1, per_text)
        return torch.argsort(counts, stable=True).split(step)

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

        The pairs are grouped by their item of the side read most per pair (a PMA image's 36 vectors, a
        NAFS caption's ~70 keys and values): each group is one row that reads that item once, against
        the other side's items, which are prepared once and gathered per pair (see `_score_pairs`)."""
        n, k = index.shape
        own_q = torch.arange(n, device=index.device).repeat_interleave(k)
        t_idx, i_idx = (own_q, index.reshape(-1)) if queries == "text" else (index.reshape(-1), own_q)
        return self._score_pairs(text_feats, image_feats, t_idx, i_idx, k).view(n, k)

    def _score_pairs(
        self, text: Features, image: Features, t_idx: Tensor, i_idx: Tensor, width: int
    ) -> Tensor:
        """Scores of the pairs (t_idx[p], i_idx[p]) in rows of at most `width` pairs sharing one item of
        the side read most per pair (`_gathers_texts`); the other side's items, prepared once for the
        whole set, are gathered per pair into buffers reused from call to call. Rows are scored by unit
        count, each call cutting its texts to their longest: random shortlists share almost no items,
        so the copies and the skinny GEMMs over them are the cost, and padding would multiply both."""
        units = self._unit_counts(text)
        gather_text = self._gathers_texts(text, image, units)
        if gather_text:  # rows of one image: its texts, fewest units first
            n_owners, owners, others, key = image["global"].shape[0], i_idx, t_idx, units[t_idx]
        else:  # rows of one text: its images
            n_owners, owners, others, key = text["global"].shape[0], t_idx, i_idx, None
        grid, row_owner, slot, order = _group_rows(owners, others, n_owners, _row_width(owners, width), key)
        row_units = units[grid].amax(1) if gather_text else units[row_owner]
        gathered = self._scored(self._ready_text(text) if gather_text else self.image_side(image))
        scores = torch.empty(grid.shape, device=grid.device)
        buffers: dict[str, Tensor] = {}
        for u in row_units.unique().tolist():
            src = cut_units(gathered, u, self.unit_keys, self.square_unit_keys) if gather_text else gathered
            step = self._rows_per_call(u, grid.shape[1], _item_size(src))
            for rows in (row_units == u).nonzero()[:, 0].split(step):
                other = gather_rows(src, grid[rows], buffers)
                if gather_text:
                    own = self.image_side(self._scored(index_features(image, row_owner[rows])))
                    scores[rows] = self.scores(other, own, "texts_per_image")
                else:
                    own = self._scored(self._ready_text(index_features(text, row_owner[rows])))
                    scores[rows] = self.scores(own, other, "images_per_text")
        out = torch.empty(len(owners), device=scores.device)
        out[order] = scores[slot]
        return out

    def _scored(self, feats: Features) -> Features:
        """The keys `scores` reads (without "global" where it reads it not)."""
        return feats if self.scores_read_global else {k: v for k, v in feats.items() if k != "global"}

    def _gathers_texts(self, text: Features, image: Features, units: Tensor) -> bool:
        """Whether a shortlist gathers texts (rows of one image) rather than images: only where a text has
        at most half the elements of an image (its unit rows counted at the set's mean unit count), as
        rows of one text need no padding (K images each) and trim their units exactly, rows of one image
        pad both (measured on MIA, whose texts and images are about the same size: 2.8 s against 3.4 s
        for 1,000 texts × 500 images)."""
        if not len(text["global"]) or not len(image["global"]):
            return False
        slots = self.unit_mask(text)
        fill = float(units.float().mean()) / slots.shape[1] if slots is not None and slots.shape[1] else 1.0
        keys, square = self.unit_keys, self.square_unit_keys
        per_text = sum(
            v[0].numel() * (fill**2 if k in square else fill if k in keys else 1.0) for k, v in text.items()
        )
        return 2 * per_text <= _item_size(image)


def _item_size(feats: Features) -> int:
    """Elements per item of a feature dict (as stored: padded units count)."""
    return sum(v[0].numel() for v in feats.values()) if len(next(iter(feats.values()))) else 0


def _row_width(owners: Tensor, width: int) -> int:
    """The row width, at most `width`, that wastes the fewest padded slots on groups of these sizes (a
    text shortlist gives each image a different number of texts); the widest of equals."""
    counts = torch.bincount(owners)
    counts = counts[counts > 0]
    if not len(counts):
        return max(1, width)
    widths = torch.arange(max(1, min(width, 16)), width + 1, device=counts.device)
    slots = ((counts[None, :] + widths[:, None] - 1) // widths[:, None] * widths[:, None]).sum(1)
    return int(widths[slots == slots.min()].max())


def _group_rows(
    owners: Tensor, others: Tensor, n_owners: int, width: int, key: Tensor | None = None
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor], Tensor]:
    """Pairs (owners[p], others[p]) grouped by owner (within an owner in order of `key`) into rows of
    `width` (a group longer than that takes several rows, the last one padded with its row's first
    item): (grid [R, width] of `others`, the owner of each row [R], the (row, column) slot of each pair
    in sorted order, that order)."""
    order = torch.argsort(owners, stable=True)
    if key is not None:
        first = torch.argsort(key, stable=True)
        order = first[torch.argsort(owners[first], stable=True)]
    own, oth = owners[order], others[order]
    counts = torch.bincount(own, minlength=n_owners)
    pos = torch.arange(len(own), device=own.device) - (counts.cumsum(0) - counts)[own]
    rows_per = (counts + width - 1) // width
    row = (rows_per.cumsum(0) - rows_per)[own] + pos // width
    col = pos % width
    grid = torch.full((int(rows_per.sum()), width), -1, dtype=torch.long, device=own.device)
    grid[row, col] = oth
    grid = torch.where(grid < 0, grid[:, :1], grid)
    row_owner = torch.repeat_interleave(torch.arange(n_owners, device=own.device), rows_per)
    return grid, row_owner, (row, col), order
