"""Score every text against every image with a method, exactly or in two stages, in bounded memory.

Exact: `method.similarity` over text × image feature chunks. Two-stage: a cheap cosine shortlist of the
"global" features, then `method.pair_similarity` on the shortlisted pairs only (flattened, in chunks,
so cross-attention methods score thousands of pairs per call instead of one call per pair).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pedcli.engine.metrics import top_k_order
from pedcli.errors import PedError
from pedcli.models.methods.base import Features, Method, index_features

DEFAULT_TEXT_CHUNK = 512
DEFAULT_IMAGE_CHUNK = 1024
DEFAULT_PAIR_CHUNK = 4096


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
    nq = num_items(q_feats)
    scores = cosine_matrix(q_feats["global"], g_feats["global"])  # [nq, ng], first stage
    idx = top_k_order(scores, k)  # [nq, k], the shortlist
    k = idx.shape[1]
    q_rows = torch.arange(nq).repeat_interleave(k)
    g_rows = idx.reshape(-1)
    exact = torch.empty(nq * k, dtype=torch.float32)
    for s in range(0, q_rows.numel(), pair_chunk):
        q_pick, g_pick = q_rows[s : s + pair_chunk], g_rows[s : s + pair_chunk]
        qf = index_features(q_feats, q_pick.to(q_feats["global"].device))
        gf = index_features(g_feats, g_pick.to(g_feats["global"].device))
        tf, imf = (qf, gf) if queries == "text" else (gf, qf)
        exact[s : s + pair_chunk] = method.pair_similarity(tf, imf).float().cpu()
    exact = exact.view(nq, k)
    scores += exact.amin(1, keepdim=True) - 2.0
    scores.scatter_(1, idx, exact)
    return scores if queries == "text" else scores.T.contiguous()
