"""A walking 3-D stick figure, turned to a view and projected: the joints every garment hangs on.

Units are the person's height (head top 0, soles 1); x is the person's left, y points down, z forward.
A yaw of 0 faces the camera, pi shows the back, ±pi/2 a side view; projection is orthographic, so a
point's world z is its depth (larger = nearer the camera) for the painter's algorithm.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

Vec = tuple[float, float, float]

UPPER_ARM, FOREARM, THIGH, SHIN = 0.165, 0.15, 0.235, 0.225
SHOULDER_Y, HIP_Y = 0.19, 0.52


def _add(p: Vec, q: Vec, k: float = 1.0) -> Vec:
    return p[0] + k * q[0], p[1] + k * q[1], p[2] + k * q[2]


def _direction(pitch: float, abduction: float, side: float) -> Vec:
    """Unit vector of a limb hanging down, swung forward by `pitch` and out sideways by `abduction`."""
    ca = math.cos(abduction)
    return side * math.sin(abduction), ca * math.cos(pitch), ca * math.sin(pitch)


@dataclass(frozen=True)
class Stance:
    """Per-image body configuration: where the person faces and how the limbs are posed."""

    yaw: float
    phase: float  # walking cycle, radians
    stride: float  # thigh swing amplitude, radians
    arm_bend: float
    arm_spread: float
    held_hand: str  # "left" | "right": the hand holding a phone / umbrella / handbag


def sample_stance(rng: random.Random) -> Stance:
    """A view (front, back, side or in between) and a walking or standing pose."""
    view = rng.choices(("front", "back", "side", "oblique"), weights=(32, 28, 20, 20))[0]
    if view == "front":
        yaw = rng.gauss(0.0, 0.18)
    elif view == "back":
        yaw = math.pi + rng.gauss(0.0, 0.18)
    elif view == "side":
        yaw = rng.choice((-1, 1)) * (math.pi / 2 + rng.gauss(0.0, 0.15))
    else:
        yaw = rng.choice((-1, 1)) * rng.choice((0.7, 2.4)) + rng.gauss(0.0, 0.15)
    return Stance(
        yaw=yaw,
        phase=rng.uniform(0, 2 * math.pi),
        stride=rng.uniform(0.04, 0.45),
        arm_bend=rng.uniform(0.1, 0.5),
        arm_spread=rng.uniform(0.06, 0.2),
        held_hand=rng.choice(("left", "right")),
    )


def pose_joints(stance: Stance, build: float, hold: str | None) -> dict[str, Vec]:
    """Joint positions in body coordinates; `hold` is "phone", "umbrella", "handbag" or None."""
    sw, hw = 0.105 * build, 0.072 * build
    s, ph = stance.stride, stance.phase
    j: dict[str, Vec] = {"head_top": (0.0, 0.0, 0.0), "head": (0.0, 0.066, 0.004), "neck": (0.0, 0.15, 0.0)}
    for name, side, sign in (("right", -1.0, 1.0), ("left", 1.0, -1.0)):
        shoulder = (side * sw, SHOULDER_Y, 0.0)
        pitch, bend, spread = -0.8 * sign * s * math.sin(ph), stance.arm_bend, stance.arm_spread
        if hold and name == stance.held_hand:
            if hold == "phone":
                pitch, bend, spread = 0.15, 1.9, 0.12
            elif hold == "umbrella":
                pitch, bend, spread = 0.35, 2.1, 0.2
            else:  # a handbag hangs straight down
                pitch, bend, spread = 0.0, 0.15, 0.14
        elbow = _add(shoulder, _direction(pitch, spread, side), UPPER_ARM)
        wrist = _add(elbow, _direction(pitch + bend, spread * 0.5, side), FOREARM)
        hand = _add(wrist, _direction(pitch + bend, spread * 0.5, side), 0.035)
        hip = (side * hw, HIP_Y, 0.0)
        thigh = sign * s * math.sin(ph)
        knee_bend = 0.05 + 1.4 * s * max(0.0, math.sin(ph * sign + 1.2))
        knee = _add(hip, _direction(thigh, 0.03, side), THIGH)
        ankle = _add(knee, _direction(thigh - knee_bend, 0.0, side), SHIN)
        toe = _add(ankle, (0.0, 0.012, 0.075))
        j.update(
            {
                f"{name}_shoulder": shoulder,
                f"{name}_elbow": elbow,
                f"{name}_wrist": wrist,
                f"{name}_hand": hand,
                f"{name}_hip": hip,
                f"{name}_knee": knee,
                f"{name}_ankle": ankle,
                f"{name}_toe": toe,
            }
        )
    lift = 0.985 - max(j["right_ankle"][1], j["left_ankle"][1])  # the lower foot stands on the ground
    return {k: (v[0], v[1] + lift, v[2]) for k, v in j.items()}


class Camera:
    """Turns body coordinates into supersampled canvas pixels for one image."""

    def __init__(self, yaw: float, height_px: float, origin: tuple[float, float]) -> None:
        self.c, self.s = math.cos(yaw), math.sin(yaw)
        self.h = height_px
        self.ox, self.oy = origin

    def world(self, p: Vec) -> Vec:
        x, y, z = p
        return x * self.c + z * self.s, y, -x * self.s + z * self.c

    def px(self, p: Vec) -> tuple[float, float]:
        x, y, _ = self.world(p)
        return self.ox + x * self.h, self.oy + y * self.h

    def depth(self, p: Vec) -> float:
        return self.world(p)[2]
