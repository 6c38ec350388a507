"""The one record schema every dataset adapter produces (IRRA-style: each json becomes this), and the
constants of the data every layer shares: keypoint order, its left/right flip, the pose-map stride, the
default image size, the ignore label, and `DataInfo` (what a method needs to know about the data)."""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "val", "test")
SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}

# AI-Challenger keypoint order (ARCHITECTURE.md: Pose maps); synthetic ground truth is stored in this order.
KEYPOINTS = (
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "head_top", "neck",
)  # fmt: skip

# Horizontal flip swaps a person's left and right: after `maps[..., ::-1]` channel k must hold the map
# of keypoint FLIP_PERMUTATION[k] (so `maps[..., FLIP_PERMUTATION, :, ::-1]`; keypoints alike).
_MIRROR = {"left": "right", "right": "left"}
FLIP_PERMUTATION: tuple[int, ...] = tuple(
    KEYPOINTS.index("_".join([_MIRROR.get(side, side), *rest]))
    for side, *rest in (name.split("_") for name in KEYPOINTS)
)

DEFAULT_IMAGE_SIZE = (384, 128)  # H, W: the size the five papers train at
POSE_STRIDE = 8  # pose maps at 1/8 of the image size: BlazePose's own heatmap resolution for a person crop
IGNORE_LABEL = -100  # torch's cross-entropy ignore_index: no identity label outside the train split


@dataclass(frozen=True)
class DataInfo:
    """What a method needs to know about the data to build its layers."""

    num_classes: int  # training identities (identity-classification heads)
    vocab_size: int  # word vocabulary incl. pad (0) and unknown (1)
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE  # H, W
    pose_channels: int = len(KEYPOINTS)
    bert_model: str | None = None  # local folder of the BERT-family encoder the cache was tokenised with


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
