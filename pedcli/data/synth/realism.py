"""`--realism hard`: degrade images and captions the way real detector crops and annotators do.

The standard renderer already varies crop size, framing, lighting and blur, but its colours stay clean
and its captions come from one tidy grammar, so a method can win by reading the renderer's exact
palette. Real CUHK-PEDES crops are small surveillance frames: upscaled from few pixels, blurred,
JPEG-compressed, white-balanced differently per camera, cut by neighbours and objects, and one person's
images show different sides of them. People write captions with synonyms, in any order, long or short,
with the odd typo. Everything here draws from the caller's `random.Random`, so output stays
deterministic per seed.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .attributes import sample_identity
from .scene import render, sample_shot
from .skeleton import Stance

REALISM = ("standard", "hard")

# A person's first three images show the front, the back and a side (in random order), later ones
# oblique views (yaw, radians; 0 faces the camera).
_MAIN_YAWS = (0.0, math.pi, math.pi / 2)
_OBLIQUE_YAWS = (0.7, -0.7, 2.4, -2.4)

# Phrase -> what people also write for it; applied per occurrence with probability 0.5.
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "is wearing": ("wears", "has on", "is dressed in", "is sporting", "is seen wearing"),
    "wearing": ("in", "dressed in", "with"),
    "is carrying": ("carries", "is holding", "has"),
    "carrying": ("holding", "with"),
    "pants": ("trousers", "bottoms", "long pants"),
    "trousers": ("pants", "slacks"),
    "shoes": ("footwear",),
    "sneakers": ("running shoes", "trainers", "sneekers"),
    "backpack": ("back pack", "rucksack", "book bag"),
    "handbag": ("purse", "hand bag"),
    "t-shirt": ("tshirt", "tee", "t shirt"),
    "woman": ("lady", "female", "women"),
    "man": ("guy", "male", "gentleman"),
    "walking": ("heading", "moving", "going"),
    "grey": ("gray",),
    "hair": ("hairs",),
    "glasses": ("spectacles", "eyeglasses"),
}
_SYNONYM_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _SYNONYMS), key=len, reverse=True)) + r")\b")
_FILLERS = (
    "The picture is a little blurry.",
    "Nothing else stands out.",
    "The person seems to be in a hurry.",
    "There is someone else next to them.",
    "The image is dark.",
    "Can't see the face clearly.",
)


@dataclasses.dataclass(frozen=True)
class Degraded:
    image: Image.Image
    keypoints: list[list[float]]
    jpeg_quality: int


def view_order(rng: random.Random) -> list[float]:
    """A person's yaws for successive images: front, back and a side first, each jittered."""
    main, oblique = list(_MAIN_YAWS), list(_OBLIQUE_YAWS)
    rng.shuffle(main)
    rng.shuffle(oblique)
    side = rng.choice((-1, 1))
    return [y * (side if y == math.pi / 2 else 1) + rng.gauss(0.0, 0.12) for y in main + oblique]


def turn(stance: Stance, yaw: float) -> Stance:
    return dataclasses.replace(stance, yaw=yaw)


def _hide(keypoints: list[list[float]], box: tuple[float, float, float, float]) -> list[list[float]]:
    x0, y0, x1, y1 = box
    return [[x, y, int(v and not (x0 <= x <= x1 and y0 <= y <= y1))] for x, y, v in keypoints]


def _neighbour(image: Image.Image, rng: random.Random) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Clutter: a strip of another rendered pedestrian cuts into one side, as in crowded detections."""
    w, h = image.size
    other = render(sample_identity(rng), sample_shot(rng), rng).image.resize((w, h), Image.BILINEAR)
    sw = int(w * rng.uniform(0.18, 0.35))
    left = rng.random() < 0.5
    src = (w // 2 - sw // 2, 0, w // 2 - sw // 2 + sw, h)
    box = (0, 0, sw, h) if left else (w - sw, 0, w, h)
    image.paste(other.crop(src), box[:2])
    return image, box


def _blob(image: Image.Image, rng: random.Random) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Partial occlusion by an object anywhere in the frame (sign, pole, bag of a passer-by)."""
    w, h = image.size
    bw, bh = int(w * rng.uniform(0.25, 0.6)), int(h * rng.uniform(0.12, 0.3))
    x0, y0 = rng.randint(-bw // 3, w - 2 * bw // 3), rng.randint(int(h * 0.2), h - bh // 2)
    draw = ImageDraw.Draw(image)
    col = tuple(rng.randint(15, 235) for _ in range(3))
    if rng.random() < 0.5:
        draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=col)
    else:
        draw.ellipse([x0, y0, x0 + bw, y0 + bh], fill=col)
    return image, (x0, y0, x0 + bw, y0 + bh)


def _camera(image: Image.Image, rng: random.Random) -> Image.Image:
    """White balance, gamma and contrast of another camera."""
    a = np.asarray(image, dtype=np.float32) / 255.0
    balance = np.array([rng.uniform(0.7, 1.3), rng.uniform(0.8, 1.2), rng.uniform(0.7, 1.3)], np.float32)
    a = np.clip(a * balance, 0, 1) ** np.float32(rng.uniform(0.6, 1.7))
    contrast = np.float32(rng.uniform(0.55, 1.0))
    a = (a - a.mean()) * contrast + a.mean() + np.float32(rng.uniform(-0.08, 0.08))
    return Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8))


def degrade(image: Image.Image, keypoints: list[list[float]], rng: random.Random) -> Degraded:
    """Clutter, occlusion, camera colour, low resolution, blur; the JPEG quality to save it at."""
    image = image.copy()
    if rng.random() < 0.35:
        image, box = _neighbour(image, rng)
        keypoints = _hide(keypoints, box)
    if rng.random() < 0.3:
        image, box = _blob(image, rng)
        keypoints = _hide(keypoints, box)
    image = _camera(image, rng)
    w, h = image.size
    f = rng.uniform(0.25, 0.7)  # linear scale of the original capture, before it was upscaled
    small = image.resize((max(8, round(w * f)), max(16, round(h * f))), Image.BILINEAR)
    image = small.resize((w, h), rng.choice((Image.NEAREST, Image.BILINEAR, Image.BICUBIC)))
    if rng.random() < 0.6:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.6)))
    return Degraded(image, keypoints, jpeg_quality=rng.randint(12, 45))


def _typo(word: str, rng: random.Random) -> str:
    k = rng.randrange(len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:  # swapped letters
        return word[:k] + word[k + 1] + word[k] + word[k + 2 :]
    if kind == 1:  # a dropped letter
        return word[:k] + word[k + 1 :]
    return word[:k] + word[k] + word[k:]  # a doubled letter


def roughen(text: str, rng: random.Random, typo_rate: float = 0.04) -> str:
    """Synonyms, sentence order, shorter or longer, typos, sloppy casing and punctuation."""
    text = _SYNONYM_RE.sub(lambda m: rng.choice(_SYNONYMS[m[1]]) if rng.random() < 0.5 else m[1], text)
    sentences = [s.strip() for s in text.rstrip(".").split(". ") if s.strip()]
    if len(sentences) > 1 and rng.random() < 0.4:
        rng.shuffle(sentences)
    if rng.random() < 0.3:  # a terse annotator: the first sentence's first clauses only
        parts = sentences[0].split(", ")
        sentences = [", ".join(parts[: rng.randint(1, len(parts))])]
    elif rng.random() < 0.2:
        sentences.append(rng.choice(_FILLERS).rstrip("."))
    words = [
        _typo(w, rng) if len(w) >= 4 and w.isalpha() and rng.random() < typo_rate else w
        for w in ". ".join(s[0].upper() + s[1:] for s in sentences).split(" ")
    ]
    out = " ".join(words) + ("" if rng.random() < 0.15 else ".")
    return out.lower() if rng.random() < 0.2 else out
