"""The synthetic benchmark: deterministic, identity-disjoint, CUHK-PEDES-shaped, sane captions/keypoints."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pedcli.cli import app
from pedcli.data.schema import KEYPOINTS, SPLITS
from pedcli.data.synth import ANNOTATION, contact_sheet, generate
from pedcli.data.synth.attributes import sample_identities, sample_identity
from pedcli.data.synth.captions import MAX_WORDS, MIN_WORDS, caption
from pedcli.data.synth.scene import _view, render, sample_shot
from pedcli.errors import PedError

N_IDS = 20


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict]]:
    root = tmp_path_factory.mktemp("synth")
    summary = generate(root, N_IDS, seed=7, progress=False)
    return root, summary, json.loads((root / ANNOTATION).read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_differs(dataset, tmp_path: Path) -> None:
    root, _, _ = dataset
    generate(tmp_path / "again", N_IDS, seed=7, progress=False)
    generate(tmp_path / "other", N_IDS, seed=8, progress=False)
    first, again, other = _files(root), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert first == again
    assert first[ANNOTATION] != other[ANNOTATION]
    shared = set(first) & set(other) - {ANNOTATION}
    assert shared and all(first[k] != other[k] for k in shared)


def test_records_fields_and_summary(dataset) -> None:
    root, summary, records = dataset
    assert {r["id"] for r in records} == set(range(1, N_IDS + 1))
    for r in records:
        assert set(r) == {"id", "file_path", "captions", "split", "keypoints"}
        assert r["split"] in SPLITS and len(r["captions"]) == 2
        assert r["file_path"].startswith("imgs/") and (root / r["file_path"]).is_file()
    per_id: dict[int, int] = {}
    for r in records:
        per_id[r["id"]] = per_id.get(r["id"], 0) + 1
    assert all(2 <= n <= 4 for n in per_id.values())
    for split in SPLITS:
        mine = [r for r in records if r["split"] == split]
        assert summary[split] == {
            "identities": len({r["id"] for r in mine}),
            "images": len(mine),
            "captions": 2 * len(mine),
        }
    assert summary["train"]["identities"] == 16 and summary["val"]["identities"] == 2


def test_splits_are_identity_disjoint(dataset) -> None:
    _, _, records = dataset
    ids = {s: {r["id"] for r in records if r["split"] == s} for s in SPLITS}
    assert all(ids[s] for s in SPLITS)
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])


def test_captions_length_and_sub_sentences(dataset) -> None:
    _, _, records = dataset
    captions = [c for r in records for c in r["captions"]]
    for c in captions:
        assert MIN_WORDS <= len(c.split()) <= MAX_WORDS, c
        assert "," in c and c.endswith(".")
    assert len(set(captions)) > 0.95 * len(captions)  # the grammar varies, not one template


def test_images_and_keypoints(dataset) -> None:
    root, _, records = dataset
    widths = []
    for r in records:
        with Image.open(root / r["file_path"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            w, h = im.size
        widths.append(w)
        assert 50 <= w <= 200 and 2.15 <= h / w <= 2.85
        kp = r["keypoints"]
        assert len(kp) == len(KEYPOINTS) and all(len(p) == 3 and p[2] in (0, 1) for p in kp)
        for x, y, v in kp:
            if v:
                assert 0 <= x < w and 0 <= y < h
        k = dict(zip(KEYPOINTS, kp, strict=True))
        assert k["head_top"][1] < k["neck"][1] < k["right_hip"][1] < k["right_knee"][1] < k["right_ankle"][1]
    assert max(widths) - min(widths) > 30  # crop sizes vary like real detections


def test_captions_only_mention_what_is_visible() -> None:
    rng = random.Random(0)
    ident = dataclasses.replace(
        sample_identity(rng), glasses=True, phone=True, umbrella_colour=None, shoes="boots", shoe_colour="red"
    )
    shot = render(ident, sample_shot(rng), rng)
    hidden = dataclasses.replace(shot, view="back", feet_visible=False)
    texts = [caption(rng, ident, hidden) for _ in range(100)]
    assert not any(w in t for t in texts for w in ("glasses", "phone", "boots"))
    front = dataclasses.replace(shot, view="front", feet_visible=True)
    texts = [caption(rng, ident, front) for _ in range(100)]
    assert any("glasses" in t for t in texts) and any("boots" in t for t in texts)


def test_identities_include_near_duplicates() -> None:
    people = sample_identities(300, random.Random(1))
    assert len(set(people)) == len(people)
    fields = [f.name for f in dataclasses.fields(people[0]) if f.name not in ("build", "skin")]

    def diff(a, b) -> int:
        return sum(getattr(a, f) != getattr(b, f) for f in fields)

    close = sum(any(diff(a, b) <= 2 for b in people[:k]) for k, a in enumerate(people) if k)
    assert close > 0.2 * len(people)


@pytest.mark.parametrize("kwargs", [
    {"identities": 2}, {"split_fractions": (0.5, 0.2, 0.2)}, {"images_per_identity": (3, 2)},
    {"captions_per_image": 0},
])  # fmt: skip
def test_bad_arguments_raise_ped_error(tmp_path: Path, kwargs: dict) -> None:
    args = {"identities": 10, **kwargs}
    with pytest.raises(PedError):
        generate(tmp_path, args.pop("identities"), 0, progress=False, **args)
    assert not (tmp_path / ANNOTATION).exists()


def test_contact_sheet(dataset, tmp_path: Path) -> None:
    root, _, _ = dataset
    png = contact_sheet(root, tmp_path / "sheet.png", n=30)
    with Image.open(png) as im:
        assert im.width == 12 * 64 and im.height == 3 * (160 + 14)
    with pytest.raises(PedError, match="not found"):
        contact_sheet(tmp_path / "missing", tmp_path / "x.png")


def test_cli_synth_with_preview(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "synth",
            "--out",
            str(tmp_path / "d"),
            "--identities",
            "4",
            "--seed",
            "2",
            "--preview",
            str(tmp_path / "p.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").is_file()
    assert len({r["id"] for r in json.loads((tmp_path / "d" / ANNOTATION).read_text())}) == 4


# ---- --realism hard ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hard(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("hard")
    generate(root, N_IDS, seed=7, realism="hard", progress=False)
    return root, json.loads((root / ANNOTATION).read_text())


def _sharpness(path: Path) -> float:
    """Mean absolute difference of neighbouring pixels: high for crisp renders, low for blurred upscales."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("L").resize((64, 160)), dtype=np.float32)
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


def test_hard_is_deterministic_and_differs_from_standard(dataset, hard, tmp_path: Path) -> None:
    root, records = hard
    generate(tmp_path / "again", N_IDS, seed=7, realism="hard", progress=False)
    assert _files(root) == _files(tmp_path / "again")
    std_root, _, std_records = dataset
    # same people, same splits and crop sizes: only the degradation differs
    assert [(r["id"], r["split"], r["file_path"]) for r in records] == [
        (r["id"], r["split"], r["file_path"]) for r in std_records
    ]
    for r in records[:10]:
        with Image.open(root / r["file_path"]) as a, Image.open(std_root / r["file_path"]) as b:
            assert a.size == b.size
    blur = [_sharpness(root / r["file_path"]) / _sharpness(std_root / r["file_path"]) for r in records]
    assert np.median(blur) < 0.8, np.median(blur)  # low resolution, blur and JPEG remove detail


def test_hard_shows_each_person_from_different_sides(hard) -> None:
    from pedcli.data.synth.realism import view_order

    for seed in range(20):
        yaws = view_order(random.Random(seed))
        assert {_view(y) for y in yaws[:3]} == {"front", "back", "side"}
    _, records = hard
    views = {}
    for r in records:  # visible-keypoint patterns differ between one person's images
        views.setdefault(r["id"], set()).add(tuple(v for _, _, v in r["keypoints"]))
    assert sum(len(v) > 1 for v in views.values()) > 0.7 * len(views)


def test_hard_captions_vary_like_people_write(dataset, hard) -> None:
    _, _, std_records = dataset
    _, records = hard
    std = [c for r in std_records for c in r["captions"]]
    rough = [c for r in records for c in r["captions"]]
    std_words = {w.strip(".,").lower() for c in std for w in c.split()}
    new_words = {w.strip(".,").lower() for c in rough for w in c.split()} - std_words
    assert len(new_words) >= 20, new_words  # synonyms and typos the tidy grammar never writes
    lengths, std_lengths = [len(c.split()) for c in rough], [len(c.split()) for c in std]
    assert min(lengths) < MIN_WORDS and np.std(lengths) > np.std(std_lengths)
    assert any(c == c.lower() for c in rough) and any(not c.endswith(".") for c in rough)
    assert len(set(rough)) == len(rough)


def test_roughen_and_degrade_keep_their_contract() -> None:
    from pedcli.data.synth.realism import degrade, roughen

    rng = random.Random(0)
    text = "The man is wearing a grey t-shirt and black pants, he is walking towards the camera."
    outs = [roughen(text, rng, typo_rate=0.0) for _ in range(200)]
    assert all("man" in o.lower() or "guy" in o.lower() or "male" in o.lower() or "gentleman" in o.lower()
               for o in outs)  # fmt: skip
    assert len(set(outs)) > 20
    ident = sample_identity(rng)
    shot = render(ident, sample_shot(rng), rng)
    for seed in range(20):
        d = degrade(shot.image, shot.keypoints, random.Random(seed))
        assert d.image.size == shot.image.size and d.image.mode == "RGB" and 12 <= d.jpeg_quality <= 45
        # occlusion only hides keypoints, never reveals or moves one
        assert all(v <= v0 and (x, y) == (x0, y0)
                   for (x, y, v), (x0, y0, v0) in zip(d.keypoints, shot.keypoints, strict=True))  # fmt: skip


def test_cli_realism_and_splits(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["synth", "--out", str(tmp_path / "d"), "--identities", "10", "--realism", "hard",
                             "--splits", "0.5,0.2,0.3"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    records = json.loads((tmp_path / "d" / ANNOTATION).read_text())
    assert len({r["id"] for r in records if r["split"] == "test"}) == 3
    for bad in (["--realism", "nightmare"], ["--splits", "a,b,c"], ["--splits", "0.5,0.5,0.5"]):
        result = runner.invoke(app, ["synth", "--out", str(tmp_path / "e"), "--identities", "10", *bad])
        assert result.exit_code == 2 and "fix:" in result.output, result.output
