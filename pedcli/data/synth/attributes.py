"""What a synthetic person wears: a small palette and correlated choices, so identities are fine-grained.

Real pedestrians mostly wear black, white, grey and blue; many strangers share all but one or two
attributes. The sampler mimics that with skewed colour weights, gender-correlated garments and explicit
near-duplicates (a copy of an earlier identity with one or two attributes redrawn), which is what makes
the benchmark hard enough for method differences to show.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

RGB = tuple[int, int, int]

# name -> (RGB, caption words; the first is the precise word, the rest are what annotators also write)
PALETTE: dict[str, tuple[RGB, tuple[str, ...]]] = {
    "black": ((28, 28, 31), ("black", "dark")),
    "white": ((232, 232, 226), ("white",)),
    "grey": ((128, 128, 131), ("grey", "gray")),
    "dark grey": ((72, 72, 77), ("dark grey", "dark gray", "grey", "charcoal")),
    "red": ((196, 30, 36), ("red", "bright red")),
    "maroon": ((112, 22, 38), ("maroon", "dark red", "burgundy", "red")),
    "pink": ((232, 140, 170), ("pink", "light pink")),
    "orange": ((232, 118, 30), ("orange",)),
    "yellow": ((232, 204, 44), ("yellow",)),
    "beige": ((208, 188, 148), ("beige", "tan", "khaki", "light brown")),
    "brown": ((110, 70, 40), ("brown", "dark brown")),
    "green": ((42, 128, 62), ("green",)),
    "olive": ((104, 106, 50), ("olive", "dark green", "green", "army green")),
    "light blue": ((128, 168, 218), ("light blue", "sky blue", "blue")),
    "blue": ((36, 76, 176), ("blue",)),
    "navy": ((26, 36, 82), ("navy", "dark blue", "navy blue", "blue")),
    "purple": ((108, 50, 138), ("purple", "violet")),
}

HAIR_COLOURS: dict[str, tuple[RGB, tuple[str, ...]]] = {
    "black": ((22, 20, 20), ("black", "dark")),
    "dark brown": ((52, 34, 24), ("dark brown", "brown", "dark")),
    "brown": ((96, 62, 36), ("brown", "light brown")),
    "blonde": ((206, 172, 104), ("blonde", "blond", "light")),
    "grey": ((160, 158, 154), ("grey", "gray", "white")),
    "auburn": ((128, 50, 30), ("auburn", "red", "reddish brown")),
}

SKIN_TONES: tuple[RGB, ...] = (
    (240, 205, 180),
    (226, 184, 152),
    (198, 150, 112),
    (160, 112, 78),
    (104, 70, 48),
)

TOP_TYPES = ("t-shirt", "shirt", "jacket", "coat", "sweater", "dress", "tank top")
BOTTOM_TYPES = ("trousers", "jeans", "shorts", "skirt")
BAG_TYPES = ("backpack", "handbag", "shoulder bag")
HAIR_STYLES = ("short", "bob", "long", "ponytail", "bald")
PATTERNS = ("plain", "striped", "two-tone")

_TOP_COLOURS = {
    "black": 18, "white": 16, "grey": 8, "dark grey": 5, "red": 6, "maroon": 3, "pink": 5, "orange": 2,
    "yellow": 4, "beige": 3, "brown": 2, "green": 4, "olive": 2, "light blue": 5, "blue": 7, "navy": 5,
    "purple": 3,
}  # fmt: skip
_BOTTOM_COLOURS = {
    "black": 34, "navy": 8, "blue": 8, "grey": 8, "dark grey": 8, "beige": 8, "white": 5, "brown": 4,
    "olive": 3, "light blue": 4, "red": 2, "pink": 2,
}  # fmt: skip
_JEANS_COLOURS = {"blue": 40, "light blue": 25, "navy": 15, "black": 15, "dark grey": 5}
_SHOE_COLOURS = {"black": 36, "white": 34, "grey": 8, "brown": 8, "red": 3, "blue": 4, "beige": 4, "pink": 3}
_BAG_COLOURS = {"black": 46, "brown": 12, "grey": 8, "dark grey": 6, "navy": 6, "red": 6, "pink": 5,
                "white": 5, "beige": 6}  # fmt: skip
_HAT_COLOURS = {"black": 40, "white": 15, "red": 10, "navy": 10, "grey": 10, "beige": 10, "blue": 5}
_UMBRELLA_COLOURS = {"black": 40, "blue": 15, "red": 15, "pink": 10, "purple": 10, "yellow": 10}
_HAIR = {"black": 52, "dark brown": 20, "brown": 12, "blonde": 8, "grey": 4, "auburn": 4}

# (style weights for women, for men)
_HAIR_STYLES = ({"long": 42, "ponytail": 26, "bob": 20, "short": 12},
                {"short": 82, "bald": 6, "long": 6, "ponytail": 6})  # fmt: skip
_TOPS = ({"t-shirt": 20, "shirt": 14, "jacket": 12, "coat": 10, "sweater": 12, "dress": 20, "tank top": 12},
         {"t-shirt": 30, "shirt": 22, "jacket": 18, "coat": 10, "sweater": 14, "tank top": 6})  # fmt: skip
_BOTTOMS = ({"trousers": 30, "jeans": 30, "shorts": 16, "skirt": 24},
            {"trousers": 44, "jeans": 36, "shorts": 20})  # fmt: skip
_SLEEVES = {"t-shirt": {"short": 1}, "tank top": {"none": 1}, "shirt": {"short": 4, "long": 6},
            "jacket": {"long": 1}, "coat": {"long": 1}, "sweater": {"long": 1},
            "dress": {"none": 3, "short": 5, "long": 2}}  # fmt: skip


def choose(rng: random.Random, weights: dict[str, float]) -> str:
    """One key of `weights`, drawn in proportion to its weight (order of the dict fixes determinism)."""
    return rng.choices(list(weights), weights=list(weights.values()))[0]


@dataclass(frozen=True)
class Identity:
    """Everything that stays the same across one person's images."""

    gender: str  # "female" | "male"
    skin: int  # index into SKIN_TONES
    build: float  # shoulder/hip width factor
    hair_style: str
    hair_colour: str
    top: str
    sleeves: str  # "none" | "short" | "long"
    top_colour: str
    pattern: str
    top_colour2: str  # stripes / second tone / jacket's inner layer
    bottom: str | None  # None when wearing a dress
    bottom_colour: str
    shoes: str  # "shoes" | "sneakers" | "boots"
    shoe_colour: str
    bag: str | None
    bag_colour: str
    hat_colour: str | None
    glasses: bool
    umbrella_colour: str | None
    phone: bool


def _second_colour(rng: random.Random, first: str) -> str:
    options = {k: v for k, v in _TOP_COLOURS.items() if k != first}
    return choose(rng, options)


def _bottom_colour(rng: random.Random, bottom: str | None) -> str:
    return choose(rng, _JEANS_COLOURS if bottom == "jeans" else _BOTTOM_COLOURS)


def _resample(rng: random.Random, ident: Identity, field: str) -> Identity:
    """Redraw one attribute group of `ident`, keeping the rest (a near-duplicate identity)."""
    woman = ident.gender == "female"
    if field == "top":
        top = choose(rng, _TOPS[0 if woman else 1])
        bottom = ident.bottom
        if top == "dress":
            bottom = None
        elif bottom is None:
            bottom = choose(rng, _BOTTOMS[0])
        return dataclasses.replace(
            ident,
            top=top,
            sleeves=choose(rng, _SLEEVES[top]),
            bottom=bottom,
            bottom_colour=_bottom_colour(rng, bottom),
        )
    if field == "top_colour":
        colour = choose(rng, _TOP_COLOURS)
        return dataclasses.replace(ident, top_colour=colour, top_colour2=_second_colour(rng, colour))
    if field == "pattern":
        return dataclasses.replace(ident, pattern=choose(rng, {"plain": 5, "striped": 3, "two-tone": 3}))
    if field == "bottom" and ident.bottom is not None:
        bottom = choose(rng, _BOTTOMS[0 if woman else 1])
        return dataclasses.replace(ident, bottom=bottom, bottom_colour=_bottom_colour(rng, bottom))
    if field == "bottom_colour":
        return dataclasses.replace(ident, bottom_colour=_bottom_colour(rng, ident.bottom))
    if field == "shoes":
        return dataclasses.replace(ident, shoe_colour=choose(rng, _SHOE_COLOURS))
    if field == "bag":
        bag = rng.choice((None,) + BAG_TYPES)
        return dataclasses.replace(ident, bag=bag, bag_colour=choose(rng, _BAG_COLOURS))
    if field == "bag_colour":
        return dataclasses.replace(ident, bag_colour=choose(rng, _BAG_COLOURS))
    if field == "hair":
        return dataclasses.replace(
            ident, hair_colour=choose(rng, _HAIR), hair_style=choose(rng, _HAIR_STYLES[0 if woman else 1])
        )
    if field == "hat":
        return dataclasses.replace(ident, hat_colour=None if ident.hat_colour else choose(rng, _HAT_COLOURS))
    return dataclasses.replace(ident, glasses=not ident.glasses)


_MUTABLE = ("top", "top_colour", "pattern", "bottom", "bottom_colour", "shoes", "bag", "bag_colour", "hair",
            "hat", "glasses")  # fmt: skip


def sample_identity(rng: random.Random) -> Identity:
    """A fresh identity with correlated attributes (gender → garments and hair, jeans → blue shades)."""
    woman = rng.random() < 0.5
    top = choose(rng, _TOPS[0 if woman else 1])
    bottom = None if top == "dress" else choose(rng, _BOTTOMS[0 if woman else 1])
    top_colour = choose(rng, _TOP_COLOURS)
    pattern = (
        "plain"
        if top in ("coat", "dress") and rng.random() < 0.7
        else choose(rng, {"plain": 70, "striped": 15, "two-tone": 15})
    )
    bag = choose(rng, {"none": 45, "backpack": 25, "handbag": 12 if woman else 4, "shoulder bag": 18})
    umbrella = rng.random() < 0.06
    return Identity(
        gender="female" if woman else "male",
        skin=rng.choices(range(len(SKIN_TONES)), weights=(30, 30, 18, 12, 10))[0],
        build=rng.uniform(0.9, 1.12) * (0.94 if woman else 1.04),
        hair_style=choose(rng, _HAIR_STYLES[0 if woman else 1]),
        hair_colour=choose(rng, _HAIR),
        top=top,
        sleeves=choose(rng, _SLEEVES[top]),
        top_colour=top_colour,
        pattern=pattern,
        top_colour2=_second_colour(rng, top_colour),
        bottom=bottom,
        bottom_colour=_bottom_colour(rng, bottom),
        shoes=choose(rng, {"shoes": 45, "sneakers": 40, "boots": 15}),
        shoe_colour=choose(rng, _SHOE_COLOURS),
        bag=None if bag == "none" else bag,
        bag_colour=choose(rng, _BAG_COLOURS),
        hat_colour=choose(rng, _HAT_COLOURS) if rng.random() < 0.12 else None,
        glasses=rng.random() < 0.15,
        umbrella_colour=choose(rng, _UMBRELLA_COLOURS) if umbrella else None,
        phone=not umbrella and rng.random() < 0.1,
    )


def sample_identities(n: int, rng: random.Random, near_duplicate: float = 0.35) -> list[Identity]:
    """`n` identities; a fraction are an earlier identity with one or two attributes changed."""
    people: list[Identity] = []
    while len(people) < n:
        if people and rng.random() < near_duplicate:
            ident = rng.choice(people)
            for field in rng.sample(_MUTABLE, rng.choice((1, 1, 2))):
                ident = _resample(rng, ident, field)
            if ident in people:
                continue
        else:
            ident = sample_identity(rng)
        people.append(ident)
    return people
