"""The built-in synthetic pedestrian benchmark, written in the CUHK-PEDES layout.

`generate` draws identities (attributes.py), renders several shots of each (scene.py, person.py) and
writes two captions per image (captions.py) plus ground-truth keypoints, so the demo, every test and
method comparisons run without downloading a dataset. Output is byte-identical for a given seed: every
image gets its own `random.Random` seeded from (seed, pid, image index). `realism="hard"` (realism.py)
adds what real crops and annotators add: low resolution, blur, JPEG artefacts, camera colour, clutter,
occlusion, a different side of the person in each image, and rougher, more varied captions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from pedcli.data.schema import SPLITS
from pedcli.errors import PedError
from pedcli.fileio import atomic_path, write_json_atomic

from .attributes import sample_identities
from .captions import caption
from .realism import REALISM, degrade, roughen, turn, view_order
from .scene import render, sample_shot

ANNOTATION = "reid_raw.json"
JPEG_QUALITY = 90

__all__ = ["ANNOTATION", "REALISM", "contact_sheet", "generate"]


def _check_args(
    identities: int,
    images_per_identity: tuple[int, int],
    captions_per_image: int,
    split_fractions: tuple[float, float, float],
    realism: str,
) -> None:
    if realism not in REALISM:
        raise PedError(f"unknown realism {realism!r}", f"use one of: {', '.join(REALISM)}")
    fr = tuple(split_fractions)
    if len(fr) != 3 or min(fr) < 0 or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise PedError(
            f"split fractions {split_fractions} must be three non-negative numbers summing to 1",
            "e.g. (0.8, 0.1, 0.1) for train/val/test",
        )
    needed = sum(f > 0 for f in fr)
    if identities < needed:
        raise PedError(
            f"--identities {identities} is too few for {needed} non-empty splits",
            f"use at least {needed} identities",
        )
    lo, hi = images_per_identity
    if not 1 <= lo <= hi:
        raise PedError(
            f"images_per_identity {images_per_identity} must satisfy 1 <= min <= max", "e.g. (2, 4)"
        )
    if captions_per_image < 1:
        raise PedError(f"captions_per_image {captions_per_image} must be at least 1", "use 2 (as CUHK-PEDES)")


def _assign_splits(n: int, fractions: tuple[float, float, float], rng: random.Random) -> dict[int, str]:
    """Identity-disjoint split: pids 1..n shuffled, cut by the fractions, every non-empty split ≥ 1 id."""
    pids = list(range(1, n + 1))
    rng.shuffle(pids)
    counts = [round(f * n) if f > 0 else 0 for f in fractions]
    for k, f in enumerate(fractions):
        if f > 0 and counts[k] == 0:
            counts[k] = 1
    while sum(counts) > n:
        counts[counts.index(max(counts))] -= 1
    counts[0] += n - sum(counts)
    out: dict[int, str] = {}
    start = 0
    for split, c in zip(SPLITS, counts, strict=True):
        out.update({pid: split for pid in pids[start : start + c]})
        start += c
    return out


def generate(
    out: Path,
    identities: int,
    seed: int,
    *,
    images_per_identity: tuple[int, int] = (2, 4),
    captions_per_image: int = 2,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    realism: str = "standard",
    progress: bool = True,
) -> dict:
    """Write `out/reid_raw.json` and `out/imgs/*.jpg`; return counts per split.

    Records: {"id", "file_path" (relative to out), "captions", "split", "keypoints" (14 × [x, y, v] in
    image pixels, `pedcli.data.schema.KEYPOINTS` order)}. The json is written last and atomically, so a
    half-finished run never looks like a dataset.
    """
    _check_args(identities, images_per_identity, captions_per_image, split_fractions, realism)
    hard = realism == "hard"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PedError(f"{out} exists and is not a directory", "pass a new or existing directory as --out")
    rng = random.Random(seed)
    people = sample_identities(identities, rng)
    split_of = _assign_splits(identities, split_fractions, rng)
    records: list[dict] = []
    summary = {s: {"identities": 0, "images": 0, "captions": 0} for s in SPLITS}
    for pid, ident in enumerate(tqdm(people, desc="synth", unit="id", disable=not progress), start=1):
        r = random.Random(f"{seed}:{pid}")
        split = split_of[pid]
        n_images = r.randint(*images_per_identity)
        summary[split]["identities"] += 1
        yaws = view_order(random.Random(f"{seed}:{pid}:views")) if hard else []
        for k in range(n_images):
            shot_rng = random.Random(f"{seed}:{pid}:{k}")
            params = sample_shot(shot_rng)
            if hard:  # its own generator, so the standard set's draws (and bytes) stay as they were
                params = dataclasses.replace(params, stance=turn(params.stance, yaws[k % len(yaws)]))
            shot = render(ident, params, shot_rng)
            captions = [caption(shot_rng, ident, shot) for _ in range(captions_per_image)]
            image, keypoints, quality = shot.image, shot.keypoints, JPEG_QUALITY
            if hard:
                hard_rng = random.Random(f"{seed}:{pid}:{k}:hard")
                d = degrade(image, keypoints, hard_rng)
                image, keypoints, quality = d.image, d.keypoints, d.jpeg_quality
                captions = [roughen(c, hard_rng) for c in captions]
            rel = f"imgs/{pid:05d}_{k:02d}.jpg"
            with atomic_path(out / rel, suffix=".jpg") as tmp:
                image.save(tmp, format="JPEG", quality=quality)
            records.append(
                {"id": pid, "file_path": rel, "split": split, "keypoints": keypoints, "captions": captions}
            )
            summary[split]["images"] += 1
            summary[split]["captions"] += captions_per_image
    write_json_atomic(out / ANNOTATION, records)
    return summary


def contact_sheet(root: Path, out_png: Path, n: int = 48, seed: int = 0) -> Path:
    """A grid of `n` random images of the dataset at `root`, each labelled with its pid, for eyeballing."""
    root, out_png = Path(root), Path(out_png)
    ann = root / ANNOTATION
    if not ann.is_file():
        raise PedError(f"{ann} not found", f"run `ped synth --out {root}` first")
    records = json.loads(ann.read_text(encoding="utf-8"))
    picks = sorted(random.Random(seed).sample(range(len(records)), min(n, len(records))))
    cw, ch, label, cols = 64, 160, 14, 12
    rows = max(1, math.ceil(len(picks) / cols))
    sheet = Image.new("RGB", (cols * cw, rows * (ch + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for slot, idx in enumerate(picks):
        rec = records[idx]
        with Image.open(root / rec["file_path"]) as im:
            im = im.convert("RGB")
            scale = min(cw / im.width, ch / im.height)
            im = im.resize(
                (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR
            )
        x, y = (slot % cols) * cw, (slot // cols) * (ch + label)
        sheet.paste(im, (x + (cw - im.width) // 2, y + ch - im.height))
        draw.text((x + 2, y + ch + 1), f"pid {rec['id']}", fill="black")
    with atomic_path(out_png, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")
    return out_png
