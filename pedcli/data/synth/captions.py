"""CUHK-PEDES-style captions from a small grammar: many templates, synonyms and annotator imprecision.

Each caption mentions a random subset of what is visible in that image, in varied order, as
comma-separated sub-sentences ("The woman is wearing a red short-sleeved shirt, black shorts and white
shoes. She carries a black backpack."). Colour words are sometimes the loose word a person would use
("dark red" for maroon), so text and image never match exactly, as in the real data.
"""

from __future__ import annotations

import random

from .attributes import HAIR_COLOURS, PALETTE, Identity
from .scene import Rendered

MIN_WORDS, MAX_WORDS = 15, 40

_SUBJECTS = {
    "female": (
        "The woman",
        "A woman",
        "This woman",
        "The lady",
        "A young woman",
        "The girl",
        "A female pedestrian",
        "The female",
        "This lady",
    ),
    "male": (
        "The man",
        "A man",
        "This man",
        "The guy",
        "A young man",
        "The gentleman",
        "A male pedestrian",
        "The male",
        "This guy",
    ),
}
_PRONOUNS = {"female": ("She", "her"), "male": ("He", "his")}
_WEAR = ("is wearing", "wears", "is dressed in", "has on", "is in")
_CARRY = ("is carrying", "carries", "has", "is holding")  # the last fits only what is held in a hand
_TOP_WORDS = {
    "t-shirt": ("t-shirt", "tee shirt", "t shirt", "shirt"),
    "shirt": ("shirt", "button-up shirt", "blouse"),
    "jacket": ("jacket",),
    "coat": ("coat", "long coat", "overcoat"),
    "sweater": ("sweater", "jumper", "top"),
    "dress": ("dress",),
    "tank top": ("tank top", "sleeveless top", "vest"),
}
_BOTTOM_WORDS = {
    "trousers": ("trousers", "pants", "slacks"),
    "jeans": ("jeans", "denim jeans", "pants"),
    "shorts": ("shorts",),
    "skirt": ("skirt",),
}
_SLEEVE_WORDS = {
    "short": ("short-sleeved", "short sleeve"),
    "long": ("long-sleeved", "long sleeve"),
    "none": ("sleeveless",),
}
_SHOE_WORDS = {
    "shoes": ("shoes", "flats"),
    "sneakers": ("sneakers", "trainers", "tennis shoes"),
    "boots": ("boots", "ankle boots"),
}
_HAIR_WORDS = {
    "short": ("short",),
    "bob": ("chin-length", "short", "bobbed"),
    "long": ("long",),
    "ponytail": ("long",),
}
_VIEW = {
    "front": ("walking towards the camera", "facing the camera", "looking forward"),
    "back": ("walking away from the camera", "seen from behind", "facing away from the camera"),
    "side": ("walking to the side", "seen from the side", "in profile"),
}


def _word(rng: random.Random, name: str) -> str:
    words = PALETTE[name][1]
    return words[0] if len(words) == 1 or rng.random() < 0.7 else rng.choice(words[1:])


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _top_phrase(rng: random.Random, i: Identity, view: str) -> str:
    colour = _word(rng, i.top_colour)
    noun = rng.choice(_TOP_WORDS[i.top])
    sleeve = ""
    if i.top in ("t-shirt", "shirt", "dress") and rng.random() < 0.4:
        sleeve = rng.choice(_SLEEVE_WORDS[i.sleeves]) + " "
    if i.pattern == "striped" and rng.random() < 0.8:
        core = f"{colour} and {_word(rng, i.top_colour2)} striped {sleeve}{noun}"
    elif i.pattern == "two-tone" and rng.random() < 0.7:
        core = f"{colour} and {_word(rng, i.top_colour2)} {sleeve}{noun}"
    else:
        core = f"{colour} {sleeve}{noun}"
    if i.top == "jacket" and view == "front" and rng.random() < 0.5:  # the open front shows the shirt
        core += f" over a {_word(rng, i.top_colour2)} shirt"
    return _article(core)


def _bottom_phrase(rng: random.Random, i: Identity) -> str:
    noun = rng.choice(_BOTTOM_WORDS[i.bottom or "trousers"])
    colour = _word(rng, i.bottom_colour)
    return f"{'a ' if noun == 'skirt' else ''}{colour} {noun}"


def _shoe_phrase(rng: random.Random, i: Identity) -> str:
    return f"{_word(rng, i.shoe_colour)} {rng.choice(_SHOE_WORDS[i.shoes])}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _hair(rng: random.Random, i: Identity) -> str | None:
    if i.hair_style == "bald":
        return "a bald head"
    words = HAIR_COLOURS[i.hair_colour][1]
    col = words[0] if rng.random() < 0.7 else rng.choice(words)
    return f"{rng.choice(_HAIR_WORDS[i.hair_style])} {col} hair" + (
        " tied in a ponytail" if i.hair_style == "ponytail" and rng.random() < 0.7 else ""
    )


def _clauses(rng: random.Random, i: Identity, shot: Rendered) -> list[str]:
    """Optional extra sub-sentences about what this image shows; the caller picks a random subset."""
    he, his = _PRONOUNS[i.gender]
    out: list[str] = []
    bag = i.bag
    if bag and not (bag == "backpack" and shot.view == "front" and rng.random() < 0.5):
        col = _word(rng, i.bag_colour)
        if bag == "backpack":
            out.append(
                rng.choice(
                    (
                        f"{he} {rng.choice(_CARRY[:3])} a {col} backpack",
                        f"{he} has a {col} backpack on {his} back",
                        f"a {col} backpack on {his} back",
                    )
                )
            )
        elif bag == "handbag":
            out.append(
                rng.choice(
                    (
                        f"{he} {rng.choice(_CARRY)} a {col} handbag",
                        f"holding a {col} purse",
                        f"{he} has a {col} bag in {his} hand",
                    )
                )
            )
        else:
            out.append(
                rng.choice(
                    (
                        f"{he} has a {col} bag over {his} shoulder",
                        f"{he} {rng.choice(_CARRY)} a {col} shoulder bag",
                        f"a {col} bag hangs across {his} body",
                    )
                )
            )
    if i.hat_colour:
        out.append(
            rng.choice(
                (
                    f"{he} is wearing a {_word(rng, i.hat_colour)} hat",
                    f"a {_word(rng, i.hat_colour)} cap on {his} head",
                )
            )
        )
    if i.glasses and shot.view != "back":
        out.append(rng.choice((f"{he} wears glasses", "wearing glasses", f"{he} has glasses on")))
    if i.umbrella_colour:
        out.append(
            rng.choice(
                (
                    f"{he} is holding a {_word(rng, i.umbrella_colour)} umbrella",
                    f"carrying a {_word(rng, i.umbrella_colour)} umbrella",
                )
            )
        )
    if i.phone and shot.view != "back":
        out.append(
            rng.choice(
                (
                    f"{he} is looking at a phone in {his} hand",
                    "holding a cell phone",
                    f"{he} is using {his} phone",
                )
            )
        )
    out.append(f"{he} is {rng.choice(_VIEW[shot.view])}")
    return out


def caption(rng: random.Random, i: Identity, shot: Rendered) -> str:
    """One caption of MIN_WORDS..MAX_WORDS words with at least one comma-separated sub-sentence."""
    for _ in range(50):
        text = _compose(rng, i, shot)
        n = len(text.split())
        if MIN_WORDS <= n <= MAX_WORDS and "," in text:
            return text
    raise RuntimeError("caption grammar could not meet the length bounds")  # p < 1e-20 per caption


def _compose(rng: random.Random, i: Identity, shot: Rendered) -> str:
    he, his = _PRONOUNS[i.gender]
    subject = rng.choice(_SUBJECTS[i.gender])
    worn = [_top_phrase(rng, i, shot.view)]
    if i.bottom and shot.legs_visible:
        worn.append(_bottom_phrase(rng, i))
    if shot.feet_visible and rng.random() < 0.8:
        worn.append(_shoe_phrase(rng, i))
    if len(worn) > 1 and rng.random() < 0.3:
        rng.shuffle(worn)
    hair = _hair(rng, i)
    first = f"{subject} {rng.choice(_WEAR)} {_join(worn)}"
    if hair and rng.random() < 0.4:
        first = f"{subject} with {hair} {rng.choice(_WEAR)} {_join(worn)}"
        hair = None
    extra = _clauses(rng, i, shot)
    if hair:
        extra.append(f"{he} has {hair}")
    rng.shuffle(extra)
    extra = extra[: rng.randint(1, max(1, len(extra)))]
    sentences = [first]
    for k, clause in enumerate(extra):  # commas join sub-sentences in a sentence; some start a new one
        if rng.random() < (0.8 if k == 0 else 0.5):
            sentences[-1] += ", " + clause[0].lower() + clause[1:]
        else:
            sentences.append(clause[0].upper() + clause[1:])
    return ". ".join(sentences) + "."
