"""Score every text against every image with a method, exactly or in two stages, in bounded memory.

Exact: `method.similarity` over text × image feature chunks. Two-stage: a cheap cosine shortlist of the
"global" features, then `shortlist_scores` (also `ped query`'s re-scoring): each query with its K
shortlisted items through `method.shortlist_similarity`, which cross-attention methods run with the
same batched kernels as exact scoring, reading each query once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pedcli.engine.retrieval.metrics import top_k_order
from pedcli.errors import PedError
from pedcli.models.methods.base import Features, Method, index_features

DEFAULT_TEXT_CHUNK = 512
DEFAULT_IMAGE_CHUNK = 1024
DEFAULT_PAIR_CHUNK = 1 << 20  # (query, shortlisted item) pairs per `shortlist_similarity` call


def num_items(feats: Features) -> int:
    return next(iter(feats.values())).shape[0]


@torch.inference_mode()
def score_matrix(
    method: Method,
    text_feats: Features,
    image_feats: Features,
    text_chunk: int = DEFAULT_TEXT_CHUNK,
    image_chunk: int = DEFAULT_IMAGE_CHUNK,
) -> torch.Tensor:
    """Exact scores [n_text, n_image] (float32, CPU); peak extra memory is one text × image chunk."""
    nt, ni = num_items(text_feats), num_items(image_feats)
    out = torch.empty(nt, ni, dtype=torch.float32)
    for t0 in range(0, nt, text_chunk):
        tf = index_features(text_feats, slice(t0, t0 + text_chunk))
        for i0 in range(0, ni, image_chunk):
            block = method.similarity(tf, index_features(image_feats, slice(i0, i0 + image_chunk)))
            out[t0 : t0 + text_chunk, i0 : i0 + image_chunk] = block.float().cpu()
    return out


@torch.inference_mode()
def cosine_matrix(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Cosine similarity [len(a), len(b)] (float32, CPU), `chunk` rows of `a` at a time."""
    bn = F.normalize(b.float(), dim=1)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float32)
    for s in range(0, a.shape[0], chunk):
        out[s : s + chunk] = (F.normalize(a[s : s + chunk].float(), dim=1) @ bn.T).cpu()
    return out


@torch.inference_mode()
def shortlist(
    query_global: torch.Tensor, gallery_global: torch.Tensor, k: int, chunk: int = 1024
) -> torch.Tensor:
    """Indices [n_query, k] of each query's k most cosine-similar gallery items (ties: lower index first)."""
    k = min(k, gallery_global.shape[0])
    rows = [
        top_k_order(cosine_matrix(query_global[s : s + chunk], gallery_global), k)
        for s in range(0, query_global.shape[0], chunk)
    ]
    return torch.cat(rows) if rows else torch.empty(0, k, dtype=torch.long)


@torch.inference_mode()
def shortlist_scores(
    method: Method,
    text_feats: Features,
    image_feats: Features,
    index: torch.Tensor,
    queries: str = "text",
    pair_chunk: int = DEFAULT_PAIR_CHUNK,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Exact scores [n, K] (float32, CPU) of each query with its K shortlisted items, rows `index` [n, K]
    of the other side: texts' images (queries="text") or images' texts ("image"). Per chunk of queries
    only the distinct shortlisted items are selected and moved to `device` (default: where the features
    are), once each."""
    if queries not in ("text", "image"):
        raise ValueError(f"queries must be 'text' or 'image', not {queries!r}")
    q_feats, g_feats = (text_feats, image_feats) if queries == "text" else (image_feats, text_feats)
    n, k = index.shape
    out = torch.empty(n, k, dtype=torch.float32)
    step = max(1, pair_chunk // max(1, k))
    for s in range(0, n, step):
        rows, inverse = torch.unique(index[s : s + step], return_inverse=True)
        q = _on(index_features(q_feats, slice(s, s + step)), device)
        g = _on(index_features(g_feats, rows.to(g_feats["global"].device)), device)
        pair = (q, g) if queries == "text" else (g, q)
        dev = q["global"].device
        out[s : s + step] = method.shortlist_similarity(*pair, inverse.to(dev), queries).float().cpu()
    return out


def _on(feats: Features, device: torch.device | str | None) -> Features:
    return feats if device is None else {k: v.to(device) for k, v in feats.items()}


@torch.inference_mode()
def two_stage_scores(
    method: Method,
    text_feats: Features,
    image_feats: Features,
    k: int,
    pair_chunk: int = DEFAULT_PAIR_CHUNK,
    queries: str = "text",
) -> torch.Tensor:
    """Scores [n_text, n_image] where only each query's top-k cosine shortlist is scored exactly.

    `queries` = "text" shortlists k images per text (rows; for text→image), "image" k texts per image
    (columns; for image→text). Unscored pairs get `lowest exact score of that query − 2 + cosine`: below
    every shortlisted pair (cosine ≤ 1) yet still in cosine order, so the tail of the ranking is the
    first stage's order rather than an arbitrary one. With k ≥ gallery size every pair is exact.
    """
    if queries not in ("text", "image"):
        raise ValueError(f"queries must be 'text' or 'image', not {queries!r}")
    if k < 1:
        raise PedError(f"the shortlist size must be at least 1, not {k}", "pass --rerank-top 100 or so")
    q_feats, g_feats = (text_feats, image_feats) if queries == "text" else (image_feats, text_feats)
    scores = cosine_matrix(q_feats["global"], g_feats["global"])  # [nq, ng], first stage
    idx = top_k_order(scores, k)  # [nq, k], the shortlist
    exact = shortlist_scores(method, text_feats, image_feats, idx, queries, pair_chunk)
    scores += exact.amin(1, keepdim=True) - 2.0
    scores.scatter_(1, idx, exact)
    return scores if queries == "text" else scores.T.contiguous()
