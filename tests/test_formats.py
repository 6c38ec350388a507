"""Dataset adapters (one Record schema from every annotation format) and record validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pedcli.data.formats import CUHK_STANDARD_SPLIT, load_records, validate_records
from pedcli.data.schema import KEYPOINTS, Record
from pedcli.errors import PedError


def write_image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_dataset(root: Path, annotation: str, entries: list[dict], path_key: str = "file_path") -> Path:
    """Write `entries` as the annotation file and a tiny image for each under root/imgs/."""
    for i, e in enumerate(entries):
        write_image(root / "imgs" / e[path_key], seed=i)
    (root / annotation).write_text(json.dumps(entries), encoding="utf-8")
    return root / annotation


def cuhk_entries(n_ids: int = 3, per_id: int = 2) -> list[dict]:
    splits = ["train", "val", "test"]
    return [
        {
            "id": pid,
            "file_path": f"cam_a/{pid:04d}_{k}.jpg",
            "captions": [f"a person {pid} in view {k}", "walking"],
            "split": splits[(pid - 1) % 3],
            "processed_tokens": [["a", "person"], ["walking"]],
        }
        for pid in range(1, n_ids + 1)
        for k in range(per_id)
    ]


def test_cuhk_reid_raw_paths_under_imgs(tmp_path: Path) -> None:
    entries = cuhk_entries()
    write_dataset(tmp_path, "reid_raw.json", entries)
    records = load_records("cuhk-pedes", tmp_path)
    assert [r.path for r in records] == [f"imgs/{e['file_path']}" for e in entries]
    assert [(r.pid, r.split) for r in records] == [(e["id"], e["split"]) for e in entries]
    assert records[0].captions == tuple(entries[0]["captions"])
    assert all(r.keypoints is None for r in records)
    assert all((tmp_path / r.path).is_file() for r in records)


def test_paths_relative_to_root_are_kept(tmp_path: Path) -> None:
    entries = cuhk_entries()
    for e in entries:
        e["file_path"] = "imgs/" + e["file_path"]
        write_image(tmp_path / e["file_path"])
    (tmp_path / "reid_raw.json").write_text(json.dumps(entries))
    records = load_records("cuhk-pedes", tmp_path)
    assert [r.path for r in records] == [e["file_path"] for e in entries]


def test_caption_all_without_split_uses_standard_identity_split(tmp_path: Path) -> None:
    n_ids = sum(n for _, n in CUHK_STANDARD_SPLIT)
    order = np.random.default_rng(0).permutation(n_ids) + 1  # file order must not matter, id order does
    entries = [{"id": int(pid), "file_path": f"{pid}.jpg", "captions": ["x"]} for pid in order]
    (tmp_path / "caption_all.json").write_text(json.dumps(entries))
    records = load_records("cuhk-pedes", tmp_path)
    split_of = {r.pid: r.split for r in records}
    assert {split_of[1], split_of[11003]} == {"train"}
    assert {split_of[11004], split_of[12003]} == {"val"}
    assert {split_of[12004], split_of[13003]} == {"test"}
    assert sum(s == "val" for s in split_of.values()) == 1000


def test_caption_all_subset_without_split_is_refused(tmp_path: Path) -> None:
    entries = [{"id": i, "file_path": f"{i}.jpg", "captions": ["x"]} for i in range(1, 10)]
    (tmp_path / "caption_all.json").write_text(json.dumps(entries))
    with pytest.raises(PedError, match="13003"):
        load_records("cuhk-pedes", tmp_path)


def test_reid_raw_preferred_over_caption_all(tmp_path: Path) -> None:
    write_dataset(tmp_path, "reid_raw.json", cuhk_entries(n_ids=3))
    (tmp_path / "caption_all.json").write_text("[]")
    assert len(load_records("cuhk-pedes", tmp_path)) == 6


def test_rstpreid_img_path(tmp_path: Path) -> None:
    entries = [
        {"id": pid, "img_path": f"{pid:04d}_c1_{k}.jpg", "captions": ["a", "b"], "split": s}
        for pid, s in [(0, "train"), (1, "val"), (2, "test")]
        for k in range(2)
    ]
    write_dataset(tmp_path, "data_captions.json", entries, path_key="img_path")
    records = load_records("rstpreid", tmp_path)
    assert [r.path for r in records] == [f"imgs/{e['img_path']}" for e in entries]
    assert [r.split for r in records] == [e["split"] for e in entries]


def test_icfg_val_carved_from_train_by_identity(tmp_path: Path) -> None:
    entries = [
        {"id": pid, "file_path": f"{split}/{pid:04d}/{k}.jpg", "captions": ["c"], "split": split}
        for pid, split in [(p, "train") for p in range(1, 41)] + [(p, "test") for p in range(41, 46)]
        for k in range(2)
    ]
    (tmp_path / "ICFG-PEDES.json").write_text(json.dumps(entries))
    records = load_records("icfg-pedes", tmp_path)
    ids = {s: {r.pid for r in records if r.split == s} for s in ("train", "val", "test")}
    assert ids["val"] == {39, 40}  # the last 5% of the 40 train ids, sorted
    assert not ids["val"] & ids["train"]
    assert ids["test"] == set(range(41, 46))
    assert len(records) == len(entries)


def test_synth_reads_keypoints(tmp_path: Path) -> None:
    entries = cuhk_entries(n_ids=2, per_id=1)
    for e in entries:
        e["keypoints"] = [[float(j), 2.0 * j, 1] for j in range(len(KEYPOINTS))]
    write_dataset(tmp_path, "reid_raw.json", entries)
    records = load_records("synth", tmp_path)
    assert records[0].keypoints is not None and len(records[0].keypoints) == len(KEYPOINTS)
    assert records[0].keypoints[3] == (3.0, 6.0, 1.0)
    del entries[1]["keypoints"]
    (tmp_path / "reid_raw.json").write_text(json.dumps(entries))
    with pytest.raises(PedError, match="record 1 has no 'keypoints'"):
        load_records("synth", tmp_path)


def test_missing_annotation_file_names_path_and_flag(tmp_path: Path) -> None:
    with pytest.raises(PedError) as err:
        load_records("rstpreid", tmp_path)
    assert str(tmp_path / "data_captions.json") in str(err.value)
    assert "--annotations" in str(err.value)


def test_explicit_annotations_file(tmp_path: Path) -> None:
    write_dataset(tmp_path, "elsewhere.json", cuhk_entries())
    assert len(load_records("cuhk-pedes", tmp_path, tmp_path / "elsewhere.json")) == 6
    with pytest.raises(PedError, match="nope.json"):
        load_records("cuhk-pedes", tmp_path, tmp_path / "nope.json")


@pytest.mark.parametrize("key", ["id", "file_path", "captions"])
def test_record_missing_key_names_index_and_key(tmp_path: Path, key: str) -> None:
    entries = cuhk_entries()
    del entries[4][key]
    (tmp_path / "reid_raw.json").write_text(json.dumps(entries))
    with pytest.raises(PedError, match=f"record 4 has no '{key}'"):
        load_records("cuhk-pedes", tmp_path)


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(PedError, match="unknown dataset"):
        load_records("market", tmp_path)


# ---- validation ------------------------------------------------------------------------------------


@pytest.fixture
def broken(tmp_path: Path) -> tuple[Path, list[Record]]:
    """Six records: 0 and 5 good, one of each problem kind in between, and a partly empty caption list."""
    root = tmp_path
    for name in ("good.png", "good2.png"):
        write_image(root / name)
    write_image(root / "trunc.jpg")
    data = (root / "trunc.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (root / "junk.jpg").write_bytes(b"not an image")
    records = [
        Record("good.png", 1, "train", ("a man", "  ")),  # keeps "a man", reports the dropped one
        Record("missing.jpg", 1, "train", ("x",)),
        Record("trunc.jpg", 2, "test", ("x",)),
        Record("junk.jpg", 2, "test", ("x",)),
        Record("good.png", 3, "val", ("x",)),  # duplicate of record 0
        Record("good2.png", 3, "val", ("", " ")),  # no caption left
        Record("good2.png", 4, "dev", ("x",)),  # unknown split (and a duplicate)
    ]
    return root, records


def test_validate_fail_lists_every_problem_and_the_fix(broken: tuple[Path, list[Record]]) -> None:
    root, records = broken
    with pytest.raises(PedError) as err:
        validate_records(records, root)
    text = str(err.value)
    for needle in (
        "record 1",
        "missing_image",
        "record 2",
        "record 3",
        "unreadable_image",
        "record 4",
        "duplicate_path",
        "record 5",
        "no_captions",
        "record 6",
        "unknown_split",
        "--on-error skip",
    ):
        assert needle in text
    assert "6 of 7 records" in text


def test_validate_skip_drops_and_reports(broken: tuple[Path, list[Record]]) -> None:
    root, records = broken
    kept, report = validate_records(records, root, on_error="skip", workers=2)
    assert kept == [Record("good.png", 1, "train", ("a man",))]
    assert report.bad_indices == [1, 2, 3, 4, 5, 6]
    kinds = {(p.index, p.kind) for p in report.problems}
    assert {
        (1, "missing_image"),
        (2, "unreadable_image"),
        (3, "unreadable_image"),
        (4, "duplicate_path"),
        (5, "no_captions"),
        (6, "unknown_split"),
        (6, "duplicate_path"),
    } == kinds
    assert [(n.index, n.kind) for n in report.notes] == [(0, "empty_captions")]
    assert (report.total, report.kept) == (7, 1)
    assert json.loads(json.dumps(report.to_dict()))["bad"] == 6


def test_validate_clean_records_pass_unchanged(tmp_path: Path) -> None:
    write_dataset(tmp_path, "reid_raw.json", cuhk_entries())
    records = load_records("cuhk-pedes", tmp_path)
    kept, report = validate_records(records, tmp_path)
    assert kept == records
    assert report.problems == [] and report.notes == [] and report.kept == len(records)


def test_validate_failure_message_is_bounded(tmp_path: Path) -> None:
    records = [Record(f"m{i}.jpg", i, "train", ("x",)) for i in range(50)]
    with pytest.raises(PedError) as err:
        validate_records(records, tmp_path)
    assert "record 19 " in str(err.value) and "record 20 " not in str(err.value)
    assert "30 more" in str(err.value)
