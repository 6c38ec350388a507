"""Retrieval metrics as a pure function of a similarity matrix (IRRA's definitions), in bounded memory.

Definitions, per query, over the gallery ranked by descending score (all in percent, averaged over queries):
- R@K: 1 if any of the first K gallery items has the query's person id (CMC at K).
- AP: mean over the query's positives of precision at the positive's rank (the denominator is the number of
  positives in the gallery, so a positive ranked last still counts).
- INP: (number of positives) / (rank of the last positive) — how much of the list a user must read to
  find every match (Ye et al., "Deep learning for person re-identification", TPAMI 2021).

Ties: the order is a *stable* sort by descending score, so equal scores keep gallery order (lower gallery
index first). This makes every metric deterministic and reproducible across chunk sizes; a method that
outputs constant scores therefore gets the metrics of the gallery's own order, not a lucky guess.

No sort is needed for the metrics: under that order the rank of gallery item j is 1 + the number of
items that beat it (higher score, or equal score and lower index), and only the ranks of the positives
matter. Counting is O(positives × gallery) per query and vectorises, where sorting every row costs more.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pedcli.errors import PedError

DEFAULT_KS = (1, 5, 10)
# Elements of the [chunk, n_gallery] working arrays per chunk: ~4 M keeps each chunk around 100 MB.
CHUNK_ELEMENTS = 1 << 22


def chance_r1(query_pids: torch.Tensor | np.ndarray, gallery_pids: torch.Tensor | np.ndarray) -> float:
    """R@1 (%) of a random ranking: the mean share of the gallery showing each query's person."""
    q, g = torch.as_tensor(query_pids), torch.as_tensor(gallery_pids)
    return 100 * float((q[:, None] == g[None, :]).double().mean())


def rank_order(scores: torch.Tensor) -> torch.Tensor:
    """Gallery indices sorted by descending score; ties keep gallery order (the module's tie rule)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def top_k_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """`rank_order(scores)[:, :k]`, via topk: only rows with a tie at the k-th place get a full sort."""
    k = min(k, scores.shape[1])
    idx = scores.topk(k, dim=1).indices.sort(1).values  # the k best, by gallery index
    order = torch.sort(scores.gather(1, idx), dim=1, descending=True, stable=True).indices
    out = idx.gather(1, order)
    kth = scores.gather(1, out[:, -1:])
    ambiguous = (scores >= kth).sum(1) > k  # which of the tied items made the cut is not defined by topk
    if bool(ambiguous.any()):
        out[ambiguous] = rank_order(scores[ambiguous])[:, :k]
    return out


def _chunk_sums(
    sim: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor, ks: Sequence[int]
) -> torch.Tensor:
    """Per-query [hit@k for k in ks..., AP, INP] for one chunk of queries (values in 0..1)."""
    c, ng = sim.shape
    matches = gallery_pids[None, :] == query_pids[:, None]  # [c, ng], gallery order
    n_pos = matches.sum(1)
    if bool((n_pos == 0).any()):
        missing = query_pids[n_pos == 0].unique()[:5].tolist()
        raise PedError(
            f"{int((n_pos == 0).sum())} queries have no match in the gallery (person ids {missing}...)",
            "evaluate on a split where every query's person appears in the gallery",
        )
    rows, cols = matches.nonzero(as_tuple=True)  # every (query, positive) pair, grouped by query
    rank = torch.empty(rows.numel(), dtype=torch.long)
    step = max(1, CHUNK_ELEMENTS // ng)
    for s in range(0, rows.numel(), step):
        r, j = rows[s : s + step], cols[s : s + step]
        scores = sim.index_select(0, r)  # [p, ng]
        own = scores.gather(1, j[:, None])
        higher = torch.count_nonzero(scores > own, dim=1)
        tied = torch.count_nonzero(scores == own, dim=1) > 1  # rare with real scores: fix only those
        if bool(tied.any()):
            t = tied.nonzero().squeeze(1)
            earlier = torch.arange(ng) < j[t, None]
            higher[t] += torch.count_nonzero((scores[t] == own[t]) & earlier, dim=1)
        rank[s : s + step] = higher + 1  # 1-based rank of this positive
    # the nth positive of its query (ranks are distinct within a query): order pairs by (query, rank)
    order = torch.argsort(rows * (ng + 1) + rank)
    start = torch.cumsum(n_pos, 0) - n_pos
    nth = torch.empty_like(rank)
    nth[order] = torch.arange(rows.numel()) - start[rows[order]] + 1
    ap = torch.zeros(c, dtype=torch.float64).index_add_(0, rows, nth / rank.double())
    first = torch.full((c,), ng + 1, dtype=torch.long).scatter_reduce_(0, rows, rank, "amin")
    last = torch.zeros(c, dtype=torch.long).scatter_reduce_(0, rows, rank, "amax")
    hits = [(first <= k).double() for k in ks]
    return torch.stack([*hits, ap / n_pos, n_pos / last.double()], 1)


def retrieval_metrics(
    sim: torch.Tensor,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    chunk: int | None = None,
) -> dict[str, float]:
    """R@K, mAP and mINP (percent) of ranking the gallery for each query row of `sim` [nq, ng].

    Queries are processed `chunk` rows at a time (default: about CHUNK_ELEMENTS elements per chunk), so
    the memory is bounded whatever the number of queries. Scores may be -inf (unscored, ranked last);
    NaN is refused because it has no place in an order.
    """
    nq, ng = sim.shape
    query_pids = torch.as_tensor(query_pids).reshape(-1)
    gallery_pids = torch.as_tensor(gallery_pids).reshape(-1)
    if query_pids.numel() != nq or gallery_pids.numel() != ng:
        raise ValueError(
            f"similarity is {nq}x{ng} but there are {query_pids.numel()} query and "
            f"{gallery_pids.numel()} gallery ids"
        )
    if ng == 0 or nq == 0:
        raise PedError("cannot evaluate an empty query set or gallery", "check the split has data")
    chunk = chunk or max(1, CHUNK_ELEMENTS // ng)
    totals = torch.zeros(len(ks) + 2, dtype=torch.float64)
    for start in range(0, nq, chunk):
        block = sim[start : start + chunk]
        if bool(torch.isnan(block).any()):
            raise PedError("the similarity matrix contains NaN", "check the model's features for NaN/inf")
        totals += _chunk_sums(block, query_pids[start : start + chunk], gallery_pids, ks).sum(0)
    means = (totals / nq * 100).tolist()
    out = {f"R@{k}": v for k, v in zip(ks, means, strict=False)}
    out.update({"mAP": means[-2], "mINP": means[-1], "queries": nq, "gallery": ng})
    return out


def bidirectional_metrics(
    sim: torch.Tensor,
    text_pids: torch.Tensor,
    image_pids: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    chunk: int | None = None,
) -> dict[str, dict[str, float]]:
    """Text→image (rows of `sim` [nt, ni]) and image→text (rows of sim.T) metrics."""
    return {
        "t2i": retrieval_metrics(sim, text_pids, image_pids, ks, chunk),
        "i2t": retrieval_metrics(sim.T, image_pids, text_pids, ks, chunk),
    }
