"""One camera shot: crop size, framing, street background, occluder, lighting, blur and the keypoints.

Real CUHK-PEDES crops come from detectors on surveillance video: sizes and framing vary, the
background is cluttered, lighting and focus change between cameras, and things cross in front of
people. Each of those is drawn per image here, so one identity's images differ the way real ones do.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pedcli.data.schema import KEYPOINTS

from .attributes import Identity
from .person import PersonDrawing, held_items
from .shapes import Painter, inside_convex, shade
from .skeleton import Camera, Stance, pose_joints, sample_stance

SUPERSAMPLE = 2
_WALLS = ((150, 146, 138), (120, 112, 104), (168, 160, 150), (96, 100, 104), (140, 92, 76), (188, 182, 170),
          (84, 90, 82), (110, 120, 130))  # fmt: skip
# Sensor noise: windows of one fixed field, much cheaper than drawing fresh normals for every image.
_NOISE = np.random.default_rng(0).standard_normal((600, 224, 3), dtype=np.float32)
_GROUNDS = ((96, 96, 98), (130, 126, 120), (70, 72, 74), (150, 140, 126), (108, 112, 100))


@dataclass(frozen=True)
class Shot:
    """Per-image capture parameters (final pixel units)."""

    width: int
    height: int
    stance: Stance
    person_frac: float  # person height / crop height
    centre_x: float  # person centre, fraction of width
    top_y: float  # head top, fraction of height
    light: float
    gain: float
    cast: tuple[float, float, float]
    blur: float
    occluder: tuple[str, tuple[int, int, int, int]] | None  # kind, (x0, y0, x1, y1)


@dataclass(frozen=True)
class Rendered:
    image: Image.Image
    keypoints: list[list[float]]  # 14 × [x, y, v], KEYPOINTS order, final pixels
    view: str  # "front" | "back" | "side"
    feet_visible: bool
    legs_visible: bool


def sample_shot(rng: random.Random) -> Shot:
    width = int(round(rng.triangular(50, 200, 78)))
    height = int(round(width * rng.uniform(2.2, 2.8)))
    frac = rng.uniform(0.8, 0.95) if rng.random() > 0.08 else rng.uniform(0.95, 1.08)
    top = (1 - frac) * rng.uniform(0.25, 0.75) if frac < 1 else rng.uniform(-0.03, 0.0)
    occluder = None
    if rng.random() < 0.18:
        if rng.random() < 0.6:
            y0 = int(height * rng.uniform(0.68, 0.88))
            occluder = (
                "bottom",
                (int(width * rng.uniform(-0.2, 0.3)), y0, int(width * rng.uniform(0.7, 1.2)), height),
            )
        else:
            w = int(width * rng.uniform(0.15, 0.3))
            occluder = ("side", (0, 0, w, height) if rng.random() < 0.5 else (width - w, 0, width, height))
    return Shot(
        width=width,
        height=height,
        stance=sample_stance(rng),
        person_frac=frac,
        centre_x=0.5 + rng.gauss(0, 0.05),
        top_y=top,
        light=rng.choice((-1.0, 1.0)),
        gain=rng.uniform(0.6, 1.25),
        cast=(rng.uniform(0.9, 1.1), rng.uniform(0.93, 1.07), rng.uniform(0.88, 1.12)),
        blur=rng.choice((0.0, 0.0, rng.uniform(0.3, 1.1))),
        occluder=occluder,
    )


def _background(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> None:
    """Street clutter: a wall with windows and signs, poles, and a ground plane."""
    wall = rng.choice(_WALLS)
    draw.rectangle([0, 0, w, h], fill=wall)
    horizon = int(h * rng.uniform(0.55, 0.85))
    for _ in range(rng.randint(3, 9)):
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.1, 0.7) * horizon
        bw, bh = rng.uniform(0.1, 0.6) * w, rng.uniform(0.05, 0.35) * h
        col = (
            shade(wall, rng.uniform(0.5, 1.3))
            if rng.random() < 0.7
            else tuple(rng.randint(30, 230) for _ in range(3))
        )
        draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=col)
    for _ in range(rng.randint(0, 2)):
        x = rng.uniform(0, w)
        draw.line(
            [(x, 0), (x, horizon)],
            fill=shade(wall, rng.uniform(0.3, 0.7)),
            width=max(1, int(w * rng.uniform(0.02, 0.06))),
        )
    ground = rng.choice(_GROUNDS)
    draw.rectangle([0, horizon, w, h], fill=ground)
    for k in range(rng.randint(0, 4)):
        y = horizon + (k + 1) * (h - horizon) / 5
        draw.line(
            [(0, y), (w, y + rng.uniform(-0.1, 0.1) * h)], fill=shade(ground, 0.85), width=max(1, h // 150)
        )


def _occluder(
    draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], rng: random.Random
) -> None:
    s = SUPERSAMPLE
    x0, y0, x1, y1 = (v * s for v in box)
    col = tuple(rng.randint(20, 220) for _ in range(3))
    draw.rectangle([x0, y0, x1, y1], fill=shade(col, 0.7))
    if kind == "bottom":  # a car bonnet, a bench, a planter
        draw.rectangle([x0 + 2 * s, y0 + 2 * s, x1 - 2 * s, y0 + (y1 - y0) * 0.4], fill=col)
    else:  # a pole or someone passing by
        draw.rectangle([x0 + (x1 - x0) * 0.2, y0, x1 - (x1 - x0) * 0.3, y1], fill=col)


def _light(img: Image.Image, shot: Shot, rng: random.Random) -> Image.Image:
    """Camera response: gain, colour cast, a side-to-side light gradient and sensor noise."""
    a = np.asarray(img, dtype=np.float32)
    grad = 1.0 + 0.18 * shot.light * np.linspace(-1, 1, a.shape[1], dtype=np.float32)[None, :, None]
    a *= grad * (shot.gain * np.asarray(shot.cast, dtype=np.float32))  # one [1, W, 3] gain map
    h, w = a.shape[:2]
    y, x = rng.randrange(_NOISE.shape[0] - h + 1), rng.randrange(_NOISE.shape[1] - w + 1)
    a += _NOISE[y : y + h, x : x + w] * np.float32(rng.uniform(1.5, 5.0))
    out = Image.fromarray(np.clip(a, 0, 255, out=a).astype(np.uint8))
    return out.filter(ImageFilter.GaussianBlur(shot.blur)) if shot.blur > 0 else out


def _view(yaw: float) -> str:
    c = math.cos(yaw)
    return "front" if c > 0.5 else "back" if c < -0.5 else "side"


def render(ident: Identity, shot: Shot, rng: random.Random) -> Rendered:
    """Draw `ident` in `shot`; keypoints are ground truth in the returned image's pixels."""
    s = SUPERSAMPLE
    W, H = shot.width * s, shot.height * s
    canvas = Image.new("RGB", (W, H))
    draw = ImageDraw.Draw(canvas)
    _background(draw, W, H, rng)
    held = held_items(ident, shot.stance.held_hand)
    hold = held.get(shot.stance.held_hand)
    joints = pose_joints(shot.stance, ident.build, hold)
    person_h = shot.person_frac * H
    cam = Camera(shot.stance.yaw, person_h, (0.0, 0.0))
    cam.ox = shot.centre_x * W - cam.px(joints["neck"])[0]
    cam.oy = shot.top_y * H - joints["head_top"][1] * person_h
    body = PersonDrawing(ident, joints, cam, Painter(draw, shot.light))
    for _, step in body.build(shot.stance.held_hand):
        step()
    if shot.occluder:
        _occluder(draw, *shot.occluder, rng)
    image = _light(canvas.reduce(s), shot, rng)

    keypoints: list[list[float]] = []
    for name in KEYPOINTS:
        p = joints[name]
        x, y = cam.px(p)
        hidden = cam.depth(p) < -0.03 and any(inside_convex(hull, (x, y)) for hull in body.torso_hulls)
        x, y = x / s, y / s
        inside = 0 <= x < shot.width and 0 <= y < shot.height
        if shot.occluder:
            ox0, oy0, ox1, oy1 = shot.occluder[1]
            hidden = hidden or (ox0 <= x <= ox1 and oy0 <= y <= oy1)
        keypoints.append([round(x, 2), round(y, 2), int(inside and not hidden)])
    vis = {name: kp[2] for name, kp in zip(KEYPOINTS, keypoints, strict=True)}
    return Rendered(
        image=image,
        keypoints=keypoints,
        view=_view(shot.stance.yaw),
        feet_visible=bool(vis["right_ankle"] or vis["left_ankle"]),
        legs_visible=bool(vis["right_knee"] or vis["left_knee"]),
    )
