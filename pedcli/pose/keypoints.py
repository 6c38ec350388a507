"""The 14 AI-Challenger keypoints, PMA's six body parts, and confidence maps built from keypoints.

Map geometry (shared by every pose source so that maps and keypoints line up): a map of size h×w covers
the whole image; map pixel (i, j) covers the image rectangle whose centre is at
((j + 0.5) · W / w, (i + 0.5) · H / h) in image pixels.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from pedcli.data.schema import KEYPOINTS

# PMA (Sec. "Fine-Grained Alignment Network"): 14 keypoints are classified into 6 overlapping body
# parts. The grouping is drawn in the paper's Fig. 2, which is not in its text; this one follows the
# figure's idea that each part is spanned by the joints at its ends (a limb segment by its two joints),
# so neighbouring parts share a joint:
#   head        = head top, neck
#   upper torso = both shoulders, neck, both hips
#   arm         = both shoulders, both elbows      (upper arm)
#   hand        = both elbows, both wrists         (forearm and hand)
#   leg         = both hips, both knees            (thigh)
#   foot        = both knees, both ankles          (shank and foot)
_BOTH = ("left", "right")
PART_KEYPOINTS: dict[str, tuple[str, ...]] = {
    "head": ("head_top", "neck"),
    "upper_torso": (*(f"{s}_shoulder" for s in _BOTH), "neck", *(f"{s}_hip" for s in _BOTH)),
    "arm": tuple(f"{s}_{j}" for j in ("shoulder", "elbow") for s in _BOTH),
    "hand": tuple(f"{s}_{j}" for j in ("elbow", "wrist") for s in _BOTH),
    "leg": tuple(f"{s}_{j}" for j in ("hip", "knee") for s in _BOTH),
    "foot": tuple(f"{s}_{j}" for j in ("knee", "ankle") for s in _BOTH),
}
PARTS: tuple[str, ...] = tuple(PART_KEYPOINTS)

# PART_MATRIX[p, k] = 1 when keypoint k belongs to part p.
PART_MATRIX = np.zeros((len(PARTS), len(KEYPOINTS)), np.float32)
for _p, _names in enumerate(PART_KEYPOINTS.values()):
    PART_MATRIX[_p, [KEYPOINTS.index(n) for n in _names]] = 1.0

Maps = TypeVar("Maps")  # np.ndarray or torch.Tensor


def group_parts(maps: Maps) -> Maps:
    """[..., 14, h, w] keypoint maps → [..., 6, h, w] part maps, each the sum of its members' maps.

    PMA: "for each body part, we first add the corresponding confidence maps of keypoints". Works on
    numpy arrays and torch tensors (any leading dims, dtype and device kept) without importing torch.
    """
    *lead, k, h, w = maps.shape
    if k != len(KEYPOINTS):
        raise ValueError(f"expected {len(KEYPOINTS)} keypoint maps on axis -3, got shape {tuple(maps.shape)}")
    matrix = PART_MATRIX.astype(maps.dtype) if isinstance(maps, np.ndarray) else maps.new_tensor(PART_MATRIX)
    return (matrix @ maps.reshape(*lead, k, h * w)).reshape(*lead, len(PARTS), h, w)


def maps_from_keypoints(
    keypoints: np.ndarray,
    image_hw: tuple[int, int],
    map_hw: tuple[int, int],
    sigma: float = 1.0,
) -> np.ndarray:
    """Gaussian confidence maps [14, h, w] float32 from ground-truth keypoints [14, 3] (x, y, visible).

    Each visible keypoint (visible > 0 and finite x, y, in image pixels) gets a Gaussian of value 1 at
    the keypoint and std `sigma` map pixels; other keypoints get an all-zero map, so the maps say
    "unknown" rather than guessing where a hidden joint is.
    """
    kp = np.asarray(keypoints, np.float64)
    if kp.shape != (len(KEYPOINTS), 3):
        raise ValueError(f"expected keypoints of shape ({len(KEYPOINTS)}, 3), got {kp.shape}")
    (ih, iw), (mh, mw) = image_hw, map_hw
    # Keypoint positions in the map's continuous coordinates (pixel centres at index + 0.5).
    u = kp[:, 0] * mw / iw - 0.5
    v = kp[:, 1] * mh / ih - 0.5
    visible = (kp[:, 2] > 0) & np.isfinite(u) & np.isfinite(v)
    u, v = np.where(visible, u, 0.0), np.where(visible, v, 0.0)
    dx2 = (np.arange(mw)[None, :] - u[:, None]) ** 2  # [14, w]
    dy2 = (np.arange(mh)[None, :] - v[:, None]) ** 2  # [14, h]
    maps = np.exp(-(dy2[:, :, None] + dx2[:, None, :]) / (2.0 * sigma**2))
    return (maps * visible[:, None, None]).astype(np.float32)


def keypoints_from_maps(maps: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Peak of each map → [14, 3] (x, y in image pixels, peak value as confidence).

    The peak is refined below a map pixel by the value-weighted centre of its 3×3 neighbourhood, so
    coarse maps (48×16) still place keypoints to a fraction of a map pixel.
    """
    k, mh, mw = maps.shape
    flat = maps.reshape(k, -1)
    peak = flat.argmax(axis=1)
    rows, cols = np.divmod(peak, mw)
    padded = np.pad(np.clip(maps, 0.0, None).astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    offsets = np.arange(-1, 2)
    # 3×3 windows around each peak (padded coordinates are shifted by one).
    win = padded[np.arange(k)[:, None, None], rows[:, None, None] + 1 + offsets[None, :, None],
                 cols[:, None, None] + 1 + offsets[None, None, :]]  # fmt: skip
    total = win.sum(axis=(1, 2))
    safe = np.where(total > 0, total, 1.0)
    dy = (win.sum(axis=2) * offsets).sum(axis=1) / safe
    dx = (win.sum(axis=1) * offsets).sum(axis=1) / safe
    ih, iw = image_hw
    x = (cols + dx + 0.5) * iw / mw
    y = (rows + dy + 0.5) * ih / mh
    return np.stack([x, y, flat[np.arange(k), peak]], axis=1).astype(np.float32)
