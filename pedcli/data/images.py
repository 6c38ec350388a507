"""Image reading, resizing and normalisation: one definition for preprocess, datasets, embed and query."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3] (grey, palette and alpha images converted)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to `size` = (H, W) with bilinear filtering, as `ped preprocess` stores images."""
    h, w = size
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


def normalize_image(rgb: np.ndarray) -> np.ndarray:
    """uint8 HWC → ImageNet-normalised float32 CHW, the network input every backbone expects."""
    img = (rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(img.transpose(2, 0, 1))
