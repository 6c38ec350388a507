"""Draws one dressed person from a posed skeleton, back to front (painter's algorithm by depth).

Garments are convex hulls of projected 3-D rings around the body, so the same code gives the front,
back and side silhouettes; what each view hides (the face from behind, a backpack from the front)
follows from depth, not from per-view special cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .attributes import HAIR_COLOURS, PALETTE, SKIN_TONES, Identity
from .shapes import Painter, Pt, clip_band, convex_hull, shade
from .skeleton import Camera, Vec

Item = tuple[float, Callable[[], None]]


def _lerp(p: Vec, q: Vec, t: float) -> Vec:
    return p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1]), p[2] + t * (q[2] - p[2])


def colour(name: str) -> tuple[int, int, int]:
    return PALETTE[name][0]


def held_items(ident: Identity, held_hand: str) -> dict[str, str]:
    """Which hand holds what: umbrella or phone in the chosen hand, a handbag in the free one."""
    items: dict[str, str] = {}
    other = "left" if held_hand == "right" else "right"
    if ident.umbrella_colour:
        items[held_hand] = "umbrella"
    elif ident.phone:
        items[held_hand] = "phone"
    if ident.bag == "handbag":
        items[other if held_hand in items else held_hand] = "handbag"
    return items


class PersonDrawing:
    """Collects depth-tagged drawing steps for one person; `torso_hulls` serve self-occlusion tests."""

    def __init__(self, ident: Identity, joints: dict[str, Vec], cam: Camera, paint: Painter) -> None:
        self.i, self.j, self.cam, self.p = ident, joints, cam, paint
        self.top = joints["head_top"][1]  # body-frame y of the head top (the skeleton stands on y = 1)
        self.h = cam.h
        self.skin = SKIN_TONES[ident.skin]
        self.torso_hulls: list[list[Pt]] = []
        self.items: list[Item] = []

    # -- geometry helpers -------------------------------------------------------------------------
    def ring(self, y: float, hw: float, hd: float, z0: float = 0.0, n: int = 10) -> list[Vec]:
        return [
            (hw * math.cos(2 * math.pi * k / n), self.top + y, z0 + hd * math.sin(2 * math.pi * k / n))
            for k in range(n)
        ]

    def hull(self, *rings: list[Vec]) -> list[Pt]:
        return convex_hull([self.cam.px(v) for r in rings for v in r])

    def add(self, depth: float, fn: Callable[[], None]) -> None:
        self.items.append((depth, fn))

    def body_depth(self, p: Vec) -> float:
        return self.cam.depth(p)

    # -- parts --------------------------------------------------------------------------------------
    def legs(self) -> None:
        i, b = self.i, self.i.bottom
        covered = b in ("trousers", "jeans")
        leg_col = colour(i.bottom_colour) if covered else self.skin
        shoe = colour(i.shoe_colour)
        for side in ("right", "left"):
            hip, knee, ankle, toe = (self.j[f"{side}_{k}"] for k in ("hip", "knee", "ankle", "toe"))
            depth = -10 + self.body_depth(knee)

            def draw(hip=hip, knee=knee, ankle=ankle, toe=toe) -> None:
                px, h = self.cam.px, self.h
                self.p.capsule(px(hip), px(knee), (0.092 if covered else 0.084) * h, leg_col)
                self.p.capsule(px(knee), px(ankle), (0.07 if covered else 0.06) * h, leg_col)
                if b == "shorts":
                    mid = _lerp(hip, knee, 0.55)
                    self.p.capsule(px(hip), px(mid), 0.1 * h, colour(i.bottom_colour))
                if i.shoes == "boots":
                    up = _lerp(ankle, knee, 0.35)
                    self.p.capsule(px(ankle), px(up), 0.072 * h, shoe)
                self.p.capsule(px(ankle), px(toe), 0.052 * h, shoe)
                if i.shoes == "sneakers" and i.shoe_colour != "white":
                    a, t = px(ankle), px(toe)
                    self.p.line(
                        [(a[0], a[1] + 0.022 * h), (t[0], t[1] + 0.02 * h)], (225, 225, 220), 0.012 * h
                    )

            self.add(depth, draw)

    def torso(self) -> None:
        i = self.i
        sw = 0.105 * i.build
        woman = i.gender == "female"
        top_col, bot_col = colour(i.top_colour), colour(i.bottom_colour)
        long_top = i.top in ("coat", "dress")
        hem = {"jacket": 0.53, "coat": 0.53, "dress": 0.45, "tank top": 0.48}.get(i.top, 0.49)
        waist_w = sw * (0.78 if woman else 0.86)
        pelvis = self.hull(
            self.ring(0.43, waist_w, 0.056),
            self.ring(0.53, 0.1 * i.build, 0.062),
            self.ring(0.575, 0.085 * i.build, 0.05),
        )
        chest = self.hull(
            self.ring(0.17, sw * 0.62, 0.045),
            self.ring(0.2, sw * 1.04, 0.052),
            self.ring(0.3, sw * 0.98, 0.066),
            self.ring(hem, waist_w * 1.04, 0.06),
        )
        self.torso_hulls = [chest, pelvis]
        skirt: list[Pt] = []
        if i.top == "dress" or i.bottom == "skirt":
            end = 0.7 if i.top == "dress" else 0.68
            skirt = self.hull(self.ring(0.44, waist_w * 1.02, 0.058), self.ring(end, 0.15 * i.build, 0.11))
        elif i.top == "coat":
            skirt = self.hull(self.ring(0.44, waist_w * 1.08, 0.064), self.ring(0.72, 0.13 * i.build, 0.085))

        def draw() -> None:
            self.p.polygon(pelvis, top_col if long_top else bot_col)
            if skirt:
                self.p.polygon(skirt, top_col if long_top else bot_col)
            self.p.polygon(chest, top_col)
            self.pattern(chest, skirt if long_top else [])
            if i.top == "jacket" and math.cos(self.cam_yaw()) > 0.3:
                self.jacket_opening(hem)
            if i.top == "shirt" and math.cos(self.cam_yaw()) > 0.3:
                self.collar()

        self.add(0.0, draw)
        self.add(0.001, self.neck)

    def cam_yaw(self) -> float:
        return math.atan2(self.cam.s, self.cam.c)

    def pattern(self, chest: list[Pt], lower: list[Pt]) -> None:
        i = self.i
        if i.pattern == "plain":
            return
        col2 = colour(i.top_colour2)
        ys = [p[1] for p in chest]
        y0, y1 = min(ys), max(ys)
        if i.pattern == "two-tone":
            self.p.flat(clip_band(chest, y0, y0 + 0.45 * (y1 - y0)), shade(col2, 0.92))
            return
        period = 0.035 * self.h
        for panel in (chest, lower):
            if not panel:
                continue
            pys = [p[1] for p in panel]
            y = min(pys) + period * 0.5
            while y < max(pys):
                self.p.flat(clip_band(panel, y, y + period * 0.45), shade(col2, 0.92))
                y += period

    def jacket_opening(self, hem: float) -> None:
        inner = colour(self.i.top_colour2)
        px, t = self.cam.px, self.top
        pts = [
            px((-0.028, t + 0.2, 0.07)),
            px((0.028, t + 0.2, 0.07)),
            px((0.02, t + hem - 0.01, 0.066)),
            px((-0.02, t + hem - 0.01, 0.066)),
        ]
        self.p.flat(pts, inner)

    def collar(self) -> None:
        px, t = self.cam.px, self.top
        col = shade(colour(self.i.top_colour), 0.8)
        self.p.flat(
            [px((-0.04, t + 0.175, 0.05)), px((0.04, t + 0.175, 0.05)), px((0.0, t + 0.22, 0.06))], col
        )
        self.p.flat(
            [px((-0.018, t + 0.178, 0.055)), px((0.018, t + 0.178, 0.055)), px((0.0, t + 0.205, 0.06))],
            self.skin,
        )

    def neck(self) -> None:
        px = self.cam.px
        self.p.capsule(px(self.j["neck"]), px((0.0, self.top + 0.11, 0.0)), 0.048 * self.h, self.skin)

    def arms(self, held: dict[str, str]) -> None:
        i = self.i
        top_col = colour(i.top_colour)
        for side in ("right", "left"):
            sh, el, wr, ha = (self.j[f"{side}_{k}"] for k in ("shoulder", "elbow", "wrist", "hand"))
            depth = (self.body_depth(sh) + self.body_depth(el) + self.body_depth(wr)) / 3
            if side == "left" and abs(depth) < 1e-3:
                depth = 1e-3  # keep a stable order when both arms sit exactly beside the torso

            def draw(sh=sh, el=el, wr=wr, ha=ha, item=held.get(side)) -> None:
                px, h = self.cam.px, self.h
                top = _lerp(sh, el, 0.15)  # the capsule's round end then sits inside the shoulder, no bump
                if i.sleeves == "long":
                    self.p.capsule(px(top), px(el), 0.062 * h, top_col)
                    self.p.capsule(px(el), px(wr), 0.054 * h, top_col)
                else:
                    self.p.capsule(px(top), px(el), 0.05 * h, self.skin)
                    self.p.capsule(px(el), px(wr), 0.044 * h, self.skin)
                    if i.sleeves == "short":
                        self.p.capsule(px(top), px(_lerp(sh, el, 0.5)), 0.066 * h, top_col)
                self.p.ellipse(px(ha), 0.024 * h, 0.026 * h, self.skin)
                if item == "phone":
                    c = px(ha)
                    self.p.flat(
                        [
                            (c[0] - 0.014 * h, c[1] - 0.03 * h),
                            (c[0] + 0.014 * h, c[1] - 0.03 * h),
                            (c[0] + 0.014 * h, c[1] + 0.004 * h),
                            (c[0] - 0.014 * h, c[1] + 0.004 * h),
                        ],
                        (20, 20, 24),
                    )
                elif item == "handbag":
                    self.handbag(ha)

            self.add(depth, draw)

    def handbag(self, hand: Vec) -> None:
        x, y, z = hand
        box = [
            (x + dx, y + dy, z + dz) for dx in (-0.05, 0.05) for dy in (0.035, 0.13) for dz in (-0.025, 0.025)
        ]
        pts = convex_hull([self.cam.px(v) for v in box])
        col = colour(self.i.bag_colour)
        hp = self.cam.px(hand)
        self.p.line(
            [self.cam.px((x - 0.03, y + 0.04, z)), hp, self.cam.px((x + 0.03, y + 0.04, z))],
            shade(col, 0.6),
            0.01 * self.h,
        )
        self.p.polygon(pts, col, rim=0.55)

    def head(self) -> None:
        i, px, h, t = self.i, self.cam.px, self.h, self.top
        c = px(self.j["head"])
        facing = math.cos(self.cam_yaw())
        rx = (0.051 + 0.008 * abs(math.sin(self.cam_yaw()))) * h
        self.p.ellipse(c, rx, 0.067 * h, self.skin)
        if i.hair_style != "bald":
            hc = shade(HAIR_COLOURS[i.hair_colour][0], 1.0)
            self.p.ellipse((c[0], c[1] - 0.008 * h), rx * 1.1, 0.065 * h, hc)
            if facing > -0.25:  # the face shows through the hair from the front and the side
                fc = px((0.0, t + 0.082, 0.032))
                self.p.ellipse(fc, 0.038 * h * max(0.6, abs(facing)), 0.05 * h, self.skin)
        self.face(facing)
        if i.hat_colour:
            hat = colour(i.hat_colour)
            brim = px((0.0, t + 0.03, 0.085))
            cap = self.hull(self.ring(-0.004, 0.04, 0.04, 0.004), self.ring(0.035, 0.056, 0.058, 0.004))
            self.p.polygon(convex_hull(cap + [brim]), hat)

    def face(self, facing: float) -> None:
        px, h, t = self.cam.px, self.h, self.top
        if facing < -0.1:
            return
        dark = (30, 22, 20)
        eyes = [(s * 0.02, t + 0.064, 0.046) for s in (-1, 1)]
        for e in eyes:
            if self.cam.depth(e) > 0.012:
                self.p.ellipse(px(e), 0.0075 * h, 0.0055 * h, dark, shaded=False)
                if self.i.glasses:
                    x, y = px(e)
                    r = 0.014 * h
                    self.p.d.ellipse(
                        [x - r, y - r * 0.8, x + r, y + r * 0.8], outline=dark, width=max(1, round(0.006 * h))
                    )
        if self.i.glasses and facing > 0.3:
            self.p.line([px(eyes[0]), px(eyes[1])], dark, 0.005 * h)
        nose, mouth = (0.0, t + 0.085, 0.056), (0.0, t + 0.104, 0.046)
        self.p.ellipse(px(nose), 0.007 * h, 0.007 * h, shade(self.skin, 0.8), shaded=False)
        m = px(mouth)
        w = 0.014 * h * max(0.3, facing)
        self.p.line([(m[0] - w, m[1]), (m[0] + w, m[1])], (150, 70, 70), 0.007 * h)

    def hair_back(self) -> None:
        i = self.i
        if i.hair_style not in ("long", "bob", "ponytail"):
            return
        hc = HAIR_COLOURS[i.hair_colour][0]
        t = self.top
        if i.hair_style == "ponytail":
            a, b = (0.0, t + 0.05, -0.06), (0.0, t + 0.17, -0.075)
            self.add(
                self.cam.depth((0, 0, -0.07)),
                lambda: self.p.capsule(self.cam.px(a), self.cam.px(b), 0.036 * self.h, hc),
            )
            return
        end = 0.3 if i.hair_style == "long" else 0.15
        curtain = self.hull(
            self.ring(0.035, 0.058, 0.05, -0.012),
            [(s * 0.07, t + end, -0.045) for s in (-1, 1)] + [(0.0, t + end, -0.06)],
        )
        self.add(self.cam.depth((0, 0, -0.06)), lambda: self.p.polygon(curtain, hc, rim=0.7))

    def backpack(self) -> None:
        i = self.i
        col = colour(i.bag_colour)
        t, w = self.top, 0.085 * i.build
        box = [(dx, t + dy, dz) for dx in (-w, w) for dy in (0.21, 0.45) for dz in (-0.055, -0.15)]
        pts = convex_hull([self.cam.px(v) for v in box])
        self.add(self.cam.depth((0, 0, -0.1)), lambda: self.p.polygon(pts, col, rim=0.55))

        def straps() -> None:
            for s in (-1, 1):
                a = self.cam.px((s * 0.06, t + 0.185, 0.045))
                b = self.cam.px((s * 0.068, t + 0.4, 0.062))
                self.p.line([a, b], shade(col, 0.8), 0.02 * self.h)

        if math.cos(self.cam_yaw()) > 0.2:
            self.add(0.05, straps)

    def shoulder_bag(self) -> None:
        i = self.i
        col = colour(i.bag_colour)
        t, s = self.top, 1.0  # bag on the person's left hip, strap over the right shoulder
        cx = s * 0.115 * i.build
        box = [
            (cx + dx, t + dy, 0.03 + dz)
            for dx in (-0.03, 0.03)
            for dy in (0.45, 0.57)
            for dz in (-0.06, 0.06)
        ]
        pts = convex_hull([self.cam.px(v) for v in box])
        front = 1.0 if math.cos(self.cam_yaw()) >= 0 else -1.0
        strap = [
            self.cam.px(v)
            for v in ((-s * 0.08, t + 0.18, 0.0), (0.0, t + 0.33, front * 0.068), (cx, t + 0.45, 0.03))
        ]
        self.add(0.02, lambda: self.p.line(strap, shade(col, 0.75), 0.014 * self.h))
        self.add(self.cam.depth((cx, 0, 0.05)) + 0.02, lambda: self.p.polygon(pts, col, rim=0.55))

    def umbrella(self, hand: Vec) -> None:
        col = colour(self.i.umbrella_colour or "black")
        x, _, z = hand
        top = (x, self.top - 0.01, z)

        def draw() -> None:
            px, h = self.cam.px, self.h
            self.p.line([px(hand), px(top)], (40, 40, 40), 0.012 * h)
            cx, cy = px(top)
            rx, ry = 0.27 * h, 0.1 * h
            self.p.d.pieslice([cx - rx, cy - ry, cx + rx, cy + ry], 180, 360, fill=shade(col, 0.6))
            self.p.d.pieslice(
                [cx - rx * 0.9, cy - ry * 0.85, cx + rx * 0.9, cy + ry * 0.85], 185, 355, fill=col
            )

        self.add(100.0, draw)

    def build(self, held_hand: str) -> list[Item]:
        """All drawing steps, sorted back to front."""
        held = held_items(self.i, held_hand)
        self.legs()
        self.torso()
        self.arms(held)
        self.hair_back()
        self.add(0.01 + 0.05 * max(0.0, math.cos(self.cam_yaw())), self.head)
        if self.i.bag == "backpack":
            self.backpack()
        elif self.i.bag == "shoulder bag":
            self.shoulder_bag()
        for side, item in held.items():
            if item == "umbrella":
                self.umbrella(self.j[f"{side}_hand"])
        return sorted(self.items, key=lambda it: it[0])
