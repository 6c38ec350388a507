"""Text→image re-ranking as post-processing of a score matrix: RVN (NAFS §3.4) and k-reciprocal.

Both re-rankers find neighbours with the "global" features only (NAFS: "to accelerate the computation,
only the global feature is used for finding nearest neighbours") and combine the result with the
method's own scores, so they apply to any method and to exact or two-stage scores alike. Every
neighbour set here is a set of *gallery image indices*: a text's neighbours are images (by text→image
cosine) and an image's neighbours are images (by image→image cosine), so sets of the two kinds can be
intersected. (NAFS's released code intersects a list of text indices with a list of image indices,
which compares unrelated numbers; we do not.) Image→text retrieval is not re-ranked.

Neighbour lists use the stable tie rule of `metrics.rank_order` (ties: lower gallery index first).
"""

from __future__ import annotations

import torch

from pedcli.engine.retrieval.scoring import cosine_matrix, shortlist

# Elements of the per-chunk gathers ([rows, neighbours, list length] or [rows, n_gallery]): ~16 M, tens of MB.
GATHER_ELEMENTS = 1 << 24

# Sets of gallery images are kept in two forms: dense bool masks [rows, n] and, for the sums over
# set members, padded lists (indices [rows, m], values [rows, m], value 0 = padding), so a sum over
# members costs rows × members instead of rows × gallery size.


def _rows_per_chunk(per_row: int) -> int:
    return max(1, GATHER_ELEMENTS // max(1, per_row))


def index_mask(idx: torch.Tensor, n: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [rows, n], True at each row's indices `idx` [rows, k] (only where `valid`): a set per row."""
    mask = torch.zeros(idx.shape[0], n, dtype=torch.bool)
    if valid is None:
        return mask.scatter_(1, idx, True)
    rows = torch.arange(idx.shape[0])[:, None].expand_as(idx)
    mask[rows[valid], idx[valid]] = True
    return mask


def _lists(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise non-zeros of `weights` [n, n'] as padded lists (indices [n, m], values [n, m])."""
    m = max(1, int((weights > 0).sum(1).max()))
    values, idx = weights.topk(m, dim=1)
    return idx, values


def _min_overlap(
    q_idx: torch.Tensor, q_val: torch.Tensor, columns: tuple[torch.Tensor, torch.Tensor], n: int
) -> torch.Tensor:
    """[rows, n]: Σ_j min(q[j], W[g, j]) for every gallery image g, with the query's weights as lists
    (q_idx, q_val [rows, a]) and `columns` = the lists of W's columns (column j: the g with W[g, j] > 0).
    With 0/1 weights this is the size of the intersection of the query's set with each image's set."""
    col_idx, col_val = columns
    rows, a = q_idx.shape
    m = col_idx.shape[1]
    out = torch.zeros(rows, n)
    step = _rows_per_chunk(a * m)
    for s in range(0, rows, step):
        flat = q_idx[s : s + step].reshape(-1)
        c = flat.numel() // a
        g = col_idx.index_select(0, flat).view(c, a * m)
        w = col_val.index_select(0, flat).view(c, a, m)
        out[s : s + c].scatter_add_(1, g, torch.minimum(q_val[s : s + step, :, None], w).view(c, a * m))
    return out


@torch.inference_mode()
def rvn(
    sim: torch.Tensor,
    text_global: torch.Tensor,
    image_global: torch.Tensor,
    neighbours: int = 10,
    weight: float = 0.5,
) -> torch.Tensor:
    """Re-ranking by visual neighbours (NAFS eq. 8); returns new text→image scores [n_text, n_image].

    N_t2i(T, l): the l gallery images nearest to text T (text→image cosine); N_i2i(I, l): the l gallery
    images nearest to image I (image→image cosine, I itself included as its own nearest). With
    |A| = |B| = l, the Jaccard similarity is |A∩B| / (2l − |A∩B|) = 1 − D_J (eq. 8). The paper re-sorts by
    "the averaged scores of the original similarity and the Jaccard distance"; a distance must enter a
    descending-score order with a minus sign, so the new score is (1 − w)·S + w·(1 − D_J), w = 0.5 the
    plain average (`weight` is the knob).
    """
    ni = image_global.shape[0]
    l = min(neighbours, ni)  # noqa: E741  (the paper's name)
    image_nn = shortlist(image_global, image_global, l)  # [ni, l]
    # column j of the membership matrix: the images whose neighbour set contains image j
    columns = _lists(index_mask(image_nn, ni).T.float())
    text_nn = shortlist(text_global, image_global, l)  # [nt, l], image indices like image_nn
    inter = _min_overlap(text_nn, torch.ones(text_nn.shape), columns, ni)  # |N_t2i(T) ∩ N_i2i(I)|
    return (1 - weight) * sim.float() + weight * inter / (2 * l - inter)


def _reciprocal(nn: torch.Tensor, k: int) -> torch.Tensor:
    """valid [n, k]: nn[g, m] is a k-reciprocal neighbour of g, i.e. g is among nn[nn[g, m], :k]."""
    own = torch.arange(nn.shape[0])[:, None, None]
    return (nn[nn[:, :k], :k] == own).any(-1)


def _expand(
    cand: torch.Tensor, in_r: torch.Tensor, half: tuple[torch.Tensor, torch.Tensor], n: int
) -> torch.Tensor:
    """Zhong et al. eq. 7: R* = R ∪ R(c, k/2) for every c ∈ R that shares more than 2/3 of R(c, k/2) with R.

    cand [rows, k] the k-nearest list, in_r [rows, k] which of them form R; half = (indices, valid) of
    every gallery image's R(·, k/2). Returns R* as a bool mask [rows, n].
    """
    r = index_mask(cand, n, in_r)
    h_idx, h_valid = half[0][cand], half[1][cand]  # [rows, k, h]
    overlap = (r.gather(1, h_idx.flatten(1)).view_as(h_idx) & h_valid).sum(2)
    keep = in_r & (3 * overlap > 2 * h_valid.sum(2))
    add = h_valid & keep[:, :, None]
    rows = torch.arange(cand.shape[0])[:, None, None].expand_as(h_idx)
    r[rows[add], h_idx[add]] = True
    return r


def _kernel_weights(sets: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Zhong's V (eq. 8): exp(−distance) on the set (distance = 1 − cos), 0 elsewhere, rows sum to 1."""
    v = torch.where(sets, torch.exp(cos - 1), torch.zeros((), dtype=cos.dtype))
    return v / v.sum(1, keepdim=True).clamp_min(1e-12)


def _mean_rows(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[rows, n]: the mean of v's rows idx[r, :] for every r (local query expansion, eq. 11)."""
    rows, k = idx.shape
    return v.index_select(0, idx.reshape(-1)).view(rows, k, -1).mean(1)


@torch.inference_mode()
def kreciprocal(
    sim: torch.Tensor,
    text_global: torch.Tensor,
    image_global: torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lam: float = 0.3,
) -> torch.Tensor:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) adapted to text→image; new scores [nt, ni].

    Zhong's probe and gallery share one feature space; here the probe is a text, so:
    - the gallery side is Zhong unchanged on images: R(I, k1) = k1-reciprocal image neighbours, expanded
      with R(·, k1/2) (eq. 7), Gaussian weights V_I (eq. 8), local query expansion over k2 images (eq. 11);
    - a text T's k-reciprocal set is R(T, k1) = {I ∈ N_t2i(T, k1) : T ∈ N_i2t(I, k1)}, the reciprocity
      checked in the cross-modal ranking (I's k1 nearest *texts*), never by mixing text→image and
      image→image cosines, which live on different scales; then the same expansion and weights, and
      query expansion with T's k2 − 1 nearest images;
    - Jaccard distance d_J (eq. 10) between V_T and V_I, and the final order by
      λ·S − (1 − λ)·d_J (eq. 12 with the original distance replaced by the score S = `sim`).
    """
    ni = image_global.shape[0]
    k1 = max(1, min(k1, ni - 1))
    h = min(k1, round(k1 / 2)) + 1  # R(·, k1/2) over the k1/2 nearest plus the image itself, as Zhong
    img_cos = cosine_matrix(image_global, image_global)
    image_nn = shortlist(image_global, image_global, k1 + 1)  # incl. itself
    half = (image_nn[:, :h], _reciprocal(image_nn, h))
    image_sets = _expand(image_nn, _reciprocal(image_nn, k1 + 1), half, ni)
    v_image = _kernel_weights(image_sets, img_cos)
    del img_cos, image_sets
    step = _rows_per_chunk(k2 * ni)
    v_image_qe = torch.cat([_mean_rows(v_image, image_nn[s : s + step, :k2]) for s in range(0, ni, step)])
    columns = _lists(v_image_qe.T.contiguous())
    image_mass = v_image_qe.sum(1)

    text_cos = cosine_matrix(text_global, image_global)  # [nt, ni]
    text_nn = shortlist(text_global, image_global, k1)  # [nt, k1]
    kth_text = text_cos.topk(min(k1, text_cos.shape[0]), dim=0).values[-1]  # [ni]: I's k1-th best text
    out = torch.empty(sim.shape, dtype=torch.float32)
    step = _rows_per_chunk(max(k1, k2) * ni)
    for s in range(0, sim.shape[0], step):
        rows = slice(s, s + step)
        cand, cos = text_nn[rows], text_cos[rows]
        sets = _expand(cand, cos.gather(1, cand) >= kth_text[cand], half, ni)
        v_text = _kernel_weights(sets, cos)
        q = min(k2 - 1, k1)
        if q > 0:
            v_text = (v_text + q * _mean_rows(v_image, cand[:, :q])) / (q + 1)
        vals, idx = v_text.topk(max(1, int((v_text > 0).sum(1).max())), dim=1)
        mins = _min_overlap(idx, vals, columns, ni)
        d_j = 1 - mins / (v_text.sum(1, keepdim=True) + image_mass - mins).clamp_min(1e-12)
        out[rows] = lam * sim[rows].float() - (1 - lam) * d_j
    return out
