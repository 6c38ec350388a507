"""Training augmentation of a batch of ImageNet-normalised images, IRRA's set (Jiang & Ye, "Cross-Modal
Implicit Relation Reasoning and Aligning for Text-to-Image Person Retrieval", CVPR 2023): horizontal flip
(done by the dataset, so a frozen trunk's cache can hold both flips), pad-and-random-crop and random
erasing. Crop and erasing change the pixels a CNN sees, so they apply only to stages whose trunk runs on
the pixels; a frozen, cached trunk keeps flip only.

Pose maps travel with their image: the crop shifts them by the same offset in their own resolution.
The random draws come from `seed` alone (the engine passes a function of run seed, epoch and global
batch index), so N ranks draw what one process accumulating N batches draws, and resuming repeats them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2

from pedcli.models.methods.base import Batch

AUGMENTATIONS = ("flip", "crop", "erase")


def random_shift(images: Tensor, pad: int, pose: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Pad each image by `pad` pixels and crop it back at a random offset (torchvision's
    RandomCrop(size, padding=pad) per image): a shift by up to `pad` pixels each way. The padding is 0,
    the ImageNet mean colour after normalisation (IRRA pads black before normalising).
    Pose maps [B, K, h, w] shift by the same amount, rounded to their cells."""
    shifts = torch.randint(-pad, pad + 1, (images.shape[0], 2)).tolist()
    out = _shift(images, shifts, pad)
    if pose is None:
        return out, None
    scale = pose.shape[-2] / images.shape[-2], pose.shape[-1] / images.shape[-1]
    cells = [(round(dy * scale[0]), round(dx * scale[1])) for dy, dx in shifts]
    return out, _shift(pose, cells, max(1, math.ceil(pad * max(scale))))


def _shift(x: Tensor, shifts: list[tuple[int, int]], pad: int) -> Tensor:
    """Each map of x [B, C, H, W] moved down by dy and right by dx (|d| ≤ pad), zeros filling in."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    return torch.stack(
        [padded[i, :, pad - dy : pad - dy + h, pad - dx : pad - dx + w] for i, (dy, dx) in enumerate(shifts)]
    )


def random_erase(images: Tensor, prob: float) -> Tensor:
    """torchvision's RandomErasing drawn per image, with IRRA's area of 2–40 % of the image (aspect
    0.3–3.3) filled with 0, the ImageNet mean colour after normalisation."""
    erase = v2.RandomErasing(p=prob, scale=(0.02, 0.4), value=0)
    return torch.stack([erase(img) for img in images])


def augment_batch(
    batch: Batch, augment: tuple[str, ...], crop_pad: int, erase_prob: float, seed: int
) -> Batch:
    """The batch with its images (and pose maps) cropped and erased as `augment` asks; new tensors.
    Draws from its own RNG seeded by `seed`; torch's global RNG is left as it was."""
    out = dict(batch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if "crop" in augment and crop_pad > 0:
            out["image"], pose = random_shift(batch["image"], crop_pad, batch.get("pose"))
            if pose is not None:
                out["pose"] = pose
        if "erase" in augment and erase_prob > 0:
            out["image"] = random_erase(out["image"], erase_prob)
    return out
