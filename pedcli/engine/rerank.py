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

from pedcli.engine.scoring import cosine_matrix, shortlist

# Elements of the [chunk, neighbours, n_gallery] gathers per chunk (~16 M: tens of MB).
GATHER_ELEMENTS = 1 << 24


def _rows_per_chunk(per_row: int) -> int:
    return max(1, GATHER_ELEMENTS // max(1, per_row))


def index_mask(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Bool [rows, n] with True at each row's indices `idx` [rows, k]: a set per row."""
    mask = torch.zeros(idx.shape[0], n, dtype=torch.bool)
    return mask.scatter_(1, idx, True)


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
    text_nn = shortlist(text_global, image_global, l)  # [nt, l]
    out = torch.empty_like(sim, dtype=torch.float32)
    step = _rows_per_chunk(ni * l)
    for s in range(0, sim.shape[0], step):
        text_set = index_mask(text_nn[s : s + step], ni)  # [c, ni]
        # |N_t2i(T) ∩ N_i2i(I)| for every image I: count I's neighbours that are in T's set.
        inter = text_set[:, image_nn].sum(2).float()  # [c, ni, l] → [c, ni]
        jaccard = inter / (2 * l - inter)
        out[s : s + step] = (1 - weight) * sim[s : s + step].float() + weight * jaccard
    return out


def _reciprocal_expand(
    candidates: torch.Tensor, reciprocal: torch.Tensor, half_sets: torch.Tensor
) -> torch.Tensor:
    """Zhong et al. §3.3 expansion: R* = R ∪ R(c, k/2) for each c ∈ R sharing > 2/3 of R(c, k/2) with R.

    candidates [rows, k] gallery indices (the k-nearest list R was cut from), reciprocal bool [rows, n]
    (the sets R), half_sets bool [n, n] (row c = R(c, k/2) among gallery images).
    """
    cand_half = half_sets[candidates]  # [rows, k, n]
    in_r = reciprocal.gather(1, candidates)  # candidate is itself in R
    overlap = (cand_half & reciprocal[:, None, :]).sum(2)
    keep = in_r & (overlap * 3 > 2 * cand_half.sum(2))
    return reciprocal | (cand_half & keep[:, :, None]).any(1)


def _kernel_weights(sets: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Zhong's V: exp(−distance) on the set (distance = 1 − cos), 0 elsewhere, rows normalised to sum 1."""
    v = torch.where(sets, torch.exp(cos - 1), torch.zeros((), dtype=cos.dtype))
    return v / v.sum(1, keepdim=True).clamp_min(1e-12)


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
      query expansion over T's k2 − 1 nearest images;
    - Jaccard distance d_J (eq. 10) between V_T and V_I, and the final order by
      λ·S − (1 − λ)·d_J (eq. 12 with the original distance replaced by the score S = `sim`).
    """
    ni = image_global.shape[0]
    k1 = min(k1, ni - 1) if ni > 1 else 1
    half = max(1, round(k1 / 2))
    img_cos = cosine_matrix(image_global, image_global)
    text_cos = cosine_matrix(text_global, image_global)  # [nt, ni]

    image_nn = shortlist(image_global, image_global, k1 + 1)  # incl. itself, as Zhong
    near = index_mask(image_nn, ni)
    reciprocal = near & near.T
    near_half = index_mask(image_nn[:, : half + 1], ni)
    half_sets = near_half & near_half.T
    image_sets = torch.empty_like(reciprocal)
    step = _rows_per_chunk((k1 + 1) * ni)
    for s in range(0, ni, step):
        rows = slice(s, s + step)
        image_sets[rows] = _reciprocal_expand(image_nn[rows], reciprocal[rows], half_sets)
    v_image = _kernel_weights(image_sets, img_cos)
    v_image = v_image[image_nn[:, :k2]].mean(1)  # local query expansion (eq. 11)

    text_nn = shortlist(text_global, image_global, k1)  # [nt, k1]
    kth_text = text_cos.topk(min(k1, text_cos.shape[0]), dim=0).values[-1]  # [ni]: I's k1-th best text
    out = torch.empty_like(sim, dtype=torch.float32)
    step = _rows_per_chunk(k1 * ni)
    for s in range(0, sim.shape[0], step):
        cos = text_cos[s : s + step]
        near_t = index_mask(text_nn[s : s + step], ni)
        text_sets = _reciprocal_expand(text_nn[s : s + step], near_t & (cos >= kth_text), half_sets)
        v_text = _kernel_weights(text_sets, cos)
        v_text = (v_text + v_image[text_nn[s : s + step, : k2 - 1]].sum(1)) / k2
        out[s : s + step] = lam * sim[s : s + step].float() - (1 - lam) * _jaccard_distance(v_text, v_image)
    return out


def _jaccard_distance(v_query: torch.Tensor, v_gallery: torch.Tensor) -> torch.Tensor:
    """Zhong eq. 10: 1 − Σ min(V_q, V_g) / Σ max(V_q, V_g), gathering only the query's non-zero entries."""
    nnz = int((v_query > 0).sum(1).max())
    print("nnz", nnz)
    out = torch.empty(v_query.shape[0], v_gallery.shape[0])
    step = _rows_per_chunk(nnz * v_gallery.shape[0])
    g_t = v_gallery.T.contiguous()  # [n, ni]: row j = every image's weight on image j (rows gathered)
    for s in range(0, v_query.shape[0], step):
        vals, idx = v_query[s : s + step].topk(nnz, dim=1)  # zero entries contribute min(0, ·) = 0
        mins = torch.minimum(vals[:, :, None], g_t[idx]).sum(1)  # [c, ni]
        maxs = v_query[s : s + step].sum(1, keepdim=True) + v_gallery.sum(1) - mins
        out[s : s + step] = 1 - mins / maxs.clamp_min(1e-12)
    return out
