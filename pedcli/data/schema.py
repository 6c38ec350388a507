"""The one record schema every dataset adapter produces (IRRA-style: each json becomes this)."""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "val", "test")
SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}

# AI-Challenger keypoint order (DESIGN.md); the synthetic set stores ground truth in this order.
KEYPOINTS = (
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "head_top", "neck",
)  # fmt: skip


@dataclass(frozen=True)
class Record:
    """One image with its captions.

    path: image path relative to the dataset root, posix separators.
    pid: person identity as in the annotation file.
    split: one of SPLITS.
    captions: one or more non-empty sentences.
    keypoints: optional ground truth, 14 × (x, y, visible) in original image pixels, KEYPOINTS order.
    """

    path: str
    pid: int
    split: str
    captions: tuple[str, ...]
    keypoints: tuple[tuple[float, float, float], ...] | None = None
