"""2-D drawing primitives with cheap shading: a darker rim and a lighter core offset toward the light.

The shading is what lets a real pose detector read limbs as round body parts rather than flat stickers.
"""

from __future__ import annotations

import math

from PIL import ImageDraw

RGB = tuple[int, int, int]
Pt = tuple[float, float]


def shade(c: RGB, k: float) -> RGB:
    return min(255, int(c[0] * k)), min(255, int(c[1] * k)), min(255, int(c[2] * k))


def convex_hull(points: list[Pt]) -> list[Pt]:
    """Monotone-chain hull, counter-clockwise in image coordinates (y down)."""
    pts = sorted(set(points))
    if len(pts) < 3:
        return pts

    def cross(o: Pt, a: Pt, b: Pt) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[Pt] = []
    upper: list[Pt] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def inside_convex(poly: list[Pt], p: Pt) -> bool:
    """Whether `p` lies inside a convex polygon given in `convex_hull` order."""
    if len(poly) < 3:
        return False
    for a, b in zip(poly, poly[1:] + poly[:1], strict=True):
        if (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) < 0:
            return False
    return True


def clip_band(poly: list[Pt], y0: float, y1: float) -> list[Pt]:
    """The part of a convex polygon between two horizontal lines (Sutherland–Hodgman, two planes)."""
    for y, keep_below in ((y0, True), (y1, False)):
        out: list[Pt] = []
        for a, b in zip(poly, poly[1:] + poly[:1], strict=True):
            ina = (a[1] >= y) if keep_below else (a[1] <= y)
            inb = (b[1] >= y) if keep_below else (b[1] <= y)
            if ina:
                out.append(a)
            if ina != inb:
                t = (y - a[1]) / (b[1] - a[1])
                out.append((a[0] + t * (b[0] - a[0]), y))
        poly = out
        if not poly:
            break
    return poly


class Painter:
    """Shaded capsules, polygons and ellipses on one supersampled canvas lit from one side."""

    def __init__(self, draw: ImageDraw.ImageDraw, light: float) -> None:
        self.d = draw
        self.light = light  # -1: light from the left, +1: from the right

    def _cap(self, p: Pt, q: Pt, w: float, col: RGB) -> None:
        r = w / 2
        self.d.line([p, q], fill=col, width=max(1, round(w)))
        self.d.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=col)
        self.d.ellipse([q[0] - r, q[1] - r, q[0] + r, q[1] + r], fill=col)

    def capsule(self, p: Pt, q: Pt, w: float, col: RGB) -> None:
        """A limb segment: dark rim, then a narrower lit core shifted toward the light."""
        self._cap(p, q, w, shade(col, 0.62))
        dx, dy = q[0] - p[0], q[1] - p[1]
        n = math.hypot(dx, dy) or 1.0
        nx, ny = -dy / n, dx / n
        if nx * self.light < 0:
            nx, ny = -nx, -ny
        o = 0.14 * w
        self._cap((p[0] + nx * o, p[1] + ny * o), (q[0] + nx * o, q[1] + ny * o), w * 0.62, col)

    def polygon(self, pts: list[Pt], col: RGB, rim: float = 0.64) -> None:
        """A garment panel: dark outline, lit inset shrunk toward its centroid."""
        if len(pts) < 3:
            return
        self.d.polygon(pts, fill=shade(col, rim))
        cx = sum(p[0] for p in pts) / len(pts)
        cy = sum(p[1] for p in pts) / len(pts)
        xs = [p[0] for p in pts]
        shift = 0.08 * (max(xs) - min(xs)) * self.light
        self.d.polygon([(cx + 0.8 * (x - cx) + shift, cy + 0.9 * (y - cy)) for x, y in pts], fill=col)

    def flat(self, pts: list[Pt], col: RGB) -> None:
        if len(pts) >= 3:
            self.d.polygon(pts, fill=col)

    def ellipse(self, c: Pt, rx: float, ry: float, col: RGB, shaded: bool = True) -> None:
        if not shaded:
            self.d.ellipse([c[0] - rx, c[1] - ry, c[0] + rx, c[1] + ry], fill=col)
            return
        self.d.ellipse([c[0] - rx, c[1] - ry, c[0] + rx, c[1] + ry], fill=shade(col, 0.7))
        sx = 0.15 * rx * self.light
        self.d.ellipse(
            [c[0] + sx - 0.8 * rx, c[1] - 0.88 * ry, c[0] + sx + 0.8 * rx, c[1] + 0.85 * ry], fill=col
        )

    def line(self, pts: list[Pt], col: RGB, w: float) -> None:
        self.d.line(pts, fill=col, width=max(1, round(w)), joint="curve")
