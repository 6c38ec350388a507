"""`ped preprocess` end to end on a tiny synthetic set: contents, resume, refusal, bad input, --check."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from pedcli.cli import app
from pedcli.data.cache import META, load_cache_info, part_digest, part_path
from pedcli.data.synth import generate
from pedcli.engine import preprocess as pp
from pedcli.errors import PedError
from pedcli.fileio import sha256_file

SIZE = (64, 32)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, identities=12, seed=3, progress=False)
    return root


def _opts(**kw: object) -> pp.PreprocessOptions:
    return pp.PreprocessOptions(image_size=SIZE, pose_source="annotations", workers=1, shard_size=8, **kw)


@pytest.fixture(scope="module")
def cache(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    pp.run_preprocess("synth", synth_root, out, _opts())
    return out


def _digests(cache: Path) -> dict[str, str]:
    """Content of every file: HDF5 parts by content (their padding bytes may differ), the rest by bytes."""
    return {
        p.name: part_digest(p) if p.suffix == ".h5" else sha256_file(p)
        for p in sorted(cache.iterdir())
        if p.is_file()
    }


def test_cache_holds_every_part(cache: Path, synth_root: Path) -> None:
    records = json.loads((synth_root / "reid_raw.json").read_text())
    info = load_cache_info(cache)
    assert info.image_size == SIZE and info.has_pose
    with h5py.File(part_path(cache, "images"), "r") as f:
        assert f["images"].shape == (len(records), *SIZE, 3) and f["images"].dtype == np.uint8
        assert [p.decode() for p in f["path"][:]] == [r["file_path"] for r in records]
        assert f["pid"][:].tolist() == [r["id"] for r in records]
    with h5py.File(part_path(cache, "text"), "r") as f:
        n_captions = sum(len(r["captions"]) for r in records)
        assert f["tokens"].shape[0] == n_captions == f["bert_ids"].shape[0]
        assert f["image_index"][:].max() == len(records) - 1
        assert (f["n_phrases"][:] > 0).all()  # every synthetic caption names clothes
        assert (f["length"][:] > 5).all()
        vocab = [w.decode() for w in f["vocab"][:]]
        assert vocab[:2] == ["<pad>", "<unk>"]
    with h5py.File(part_path(cache, "pose"), "r") as f:
        assert f["maps"].shape == (len(records), 14, SIZE[0] // 8, SIZE[1] // 8)
        assert f["maps"].dtype == np.float16 and f.attrs["source"] == "annotations"
    assert not (cache / ".work").exists()


def test_vocabulary_comes_from_train_only(cache: Path, synth_root: Path) -> None:
    from pedcli.data.formats import load_records
    from pedcli.text import TextOptions, vocab_from_records

    records = load_records("synth", synth_root)
    expected = vocab_from_records(records, TextOptions(min_count=2))
    with h5py.File(part_path(cache, "text"), "r") as f:
        assert [w.decode() for w in f["vocab"][:]] == list(expected.words)


def test_rerun_is_a_no_op_and_other_options_are_refused(cache: Path, synth_root: Path) -> None:
    before = _digests(cache)
    pp.run_preprocess("synth", synth_root, cache, _opts())
    assert _digests(cache) == before
    with pytest.raises(PedError, match="other data or options"):
        pp.run_preprocess("synth", synth_root, cache, _opts(min_count=1))


def test_resume_after_interruption_gives_identical_files(
    cache: Path, synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "c"
    real = pp._text_shard
    calls = {"n": 0}

    def dying(*args: object) -> Path:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of the text part
        return real(*args)

    monkeypatch.setattr(pp, "_text_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        pp.run_preprocess("synth", synth_root, out, _opts())
    assert not (out / META).exists()
    done = sorted(p.name for p in (out / ".work").rglob("*.npz"))
    assert done, "finished shards are kept for the resume"
    monkeypatch.setattr(pp, "_text_shard", real)
    pp.run_preprocess("synth", synth_root, out, _opts())
    assert _digests(out) == _digests(cache)


def test_bad_image_fails_with_the_record_or_is_skipped(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    root.mkdir()
    records = json.loads((synth_root / "reid_raw.json").read_text())
    (root / "imgs").symlink_to(synth_root / "imgs")
    records[1] = dict(records[1], file_path="imgs/does_not_exist.jpg")
    (root / "reid_raw.json").write_text(json.dumps(records))
    with pytest.raises(PedError, match="does_not_exist.jpg"):
        pp.run_preprocess("synth", root, tmp_path / "c1", _opts())
    info = pp.run_preprocess("synth", root, tmp_path / "c2", _opts(on_error="skip"))
    assert sum(info.meta["counts"]["images"].values()) == len(records) - 1
    report = json.loads((tmp_path / "c2" / "validation.json").read_text())
    assert report["bad"] == 1 and "does_not_exist.jpg" in json.dumps(report)


def test_annotation_pose_needs_keypoints(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "nokp"
    root.mkdir()
    (root / "imgs").symlink_to(synth_root / "imgs")
    records = [
        {k: v for k, v in r.items() if k != "keypoints"}
        for r in json.loads((synth_root / "reid_raw.json").read_text())
    ]
    (root / "reid_raw.json").write_text(json.dumps(records))
    with pytest.raises(PedError, match="keypoints"):
        pp.run_preprocess("cuhk-pedes", root, tmp_path / "c", _opts())


def test_check_command_summarises_and_detects_tampering(cache: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["preprocess", "--check", str(cache)])
    assert res.exit_code == 0, res.output
    assert "cache OK" in res.output and "vocabulary" in res.output
    summary = pp.check_cache(cache)  # the data the command shows; the library draws no table
    assert sum(summary["images"].values()) > 0 and summary["phrases_per_caption"] > 1
    counts = json.loads((cache / META).read_text())["counts"]
    assert summary["identities"] == counts["identities"] and summary["images"] == counts["images"]
    copy = tmp_path / "tampered"
    copy.mkdir()
    for p in cache.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    with h5py.File(part_path(copy, "text"), "a") as f:
        f["length"][0] = 0
    res = runner.invoke(app, ["preprocess", "--check", str(copy)])
    assert res.exit_code == 2 and "damaged" in res.output and "text.h5" in res.output


def test_missing_cache_is_a_clear_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["preprocess", "--check", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "ped preprocess" in res.output
