"""Image reading, resizing and normalisation: one definition for preprocess, datasets, embed and query."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey (PNG, TIFF), read as 0..65535


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3] (grey, palette, alpha and high-bit-depth images converted).

    16-bit grey is scaled to 8 bits (Pillow's own `convert("RGB")` clips it, turning it all white);
    16-bit colour PNGs Pillow already reduces to their high byte; float images are clipped to 0..255."""
    with Image.open(path) as im:
        if im.mode not in _WIDE_GREY and im.mode != "F":
            return np.asarray(im.convert("RGB"))
        scale = 257.0 if im.mode in _WIDE_GREY else 1.0  # 65535 / 257 = 255
        grey = np.clip(np.rint(np.asarray(im, dtype=np.float64) / scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to `size` = (H, W) with bilinear filtering, as `ped preprocess` stores images."""
    h, w = size
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


def normalize_image(rgb: np.ndarray) -> np.ndarray:
    """uint8 HWC → ImageNet-normalised float32 CHW, the network input every backbone expects."""
    img = (rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(img.transpose(2, 0, 1))
