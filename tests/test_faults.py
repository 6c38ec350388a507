"""Fault injection: wrong inputs, damaged files, interruptions and full or read-only disks give a clear
`error:` / `fix:` (exit 2) or the right result; never a traceback, never a silently wrong answer.
Numbers in the test names follow the cases of the reliability issue (10)."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import conftest
import h5py
import numpy as np
import pytest
import torch
from conftest import tiny_train
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from pedcli.cli import app
from pedcli.data.cache import META, load_cache_info, part_digest, part_path
from pedcli.data.formats import load_records, validate_records
from pedcli.data.images import load_rgb
from pedcli.engine import preprocess as pp
from pedcli.engine.runs import checkpoint_path, load_run, read_config, save_checkpoint
from pedcli.engine.search.query import QueryReport, QueryResult, text_pipeline
from pedcli.engine.search.report import print_tables, to_json
from pedcli.errors import PedError
from pedcli.fileio import write_text_atomic

runner = CliRunner()


def ped(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny baseline run on the tiny cache (one epoch per stage); copy it before damaging it."""
    out = tmp_path_factory.mktemp("faults") / "run"
    tiny_train(tiny_cache, out, epochs=1)
    return out


def write_dataset(root: Path, records: list[dict], n_images: int = 12) -> Path:
    """A CUHK-PEDES-style folder: `n_images` small JPEGs imgs/0.jpg … and reid_raw.json = `records`."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (32, 16, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.jpg")
    (root / "reid_raw.json").write_text(json.dumps(records), encoding="utf-8")
    return root


def good_records(n: int = 12) -> list[dict]:
    """Two images per identity; identities 0-3 train, 4 val, 5 test."""
    split = {0: "train", 1: "train", 2: "train", 3: "train", 4: "val", 5: "test"}
    return [
        {
            "id": i // 2,
            "file_path": f"{i}.jpg",
            "split": split[i // 2],
            "captions": [f"a man in a red coat {i % 3}"],
        }
        for i in range(n)
    ]


TINY_OPTS = pp.PreprocessOptions(image_size=(16, 8), pose_source="none", min_count=1, workers=1, shard_size=4)


# ---- 1: a cache that does not fit the run ---------------------------------------------------------------
def _other_vocabulary(src: Path, dst: Path) -> Path:
    """A copy of `src` whose vocabulary lists the same words in another order (ids mean other words)."""
    shutil.copytree(src, dst)
    with h5py.File(part_path(dst, "text"), "a") as f:
        words = f["vocab"].asstr()[:].tolist()
        del f["vocab"]
        f.create_dataset("vocab", data=words[:2] + words[2:][::-1], dtype=h5py.string_dtype())
    meta = json.loads((dst / META).read_text())
    meta["parts"]["text"] = part_digest(part_path(dst, "text"))
    (dst / META).write_text(json.dumps(meta))
    return dst


def test_1_eval_and_embed_refuse_a_cache_with_another_vocabulary(
    run: Path, tiny_cache: Path, tmp_path: Path
) -> None:
    other = _other_vocabulary(tiny_cache, tmp_path / "other")
    res = ped("eval", "--run", run, "--cache", other)
    assert res.exit_code == 2 and "vocabulary" in res.output, res.output
    res = ped("embed", "--run", run, "--cache", other, "--out", tmp_path / "e.h5")
    assert res.exit_code == 2 and "vocabulary" in res.output, res.output
    assert not (tmp_path / "e.h5").exists()


def test_1_eval_refuses_a_cache_of_another_image_size(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conftest, "TINY_IMAGE_SIZE", (48, 24))
    other = conftest.write_tiny_cache(tmp_path / "big")
    res = ped("eval", "--run", run, "--cache", other)
    assert res.exit_code == 2 and "48x24" in res.output and "32x16" in res.output, res.output


# ---- 2: identity leakage --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_id", [5.5, 1.99, True, "x7"])
def test_2_non_integer_ids_are_refused(tmp_path: Path, bad_id: object) -> None:
    records = good_records()
    records[3]["id"] = bad_id
    root = write_dataset(tmp_path, records)
    with pytest.raises(PedError, match=r"record 3 has a non-integer 'id'"):
        load_records("cuhk-pedes", root)


def test_2_integral_ids_are_read_as_integers(tmp_path: Path) -> None:
    records = good_records()
    records[0]["id"], records[1]["id"] = 0.0, "0"
    assert [r.pid for r in load_records("cuhk-pedes", write_dataset(tmp_path, records))][:2] == [0, 0]


def test_2_an_identity_in_two_splits_is_refused(tmp_path: Path) -> None:
    records = good_records()
    records[9]["split"] = "train"  # identity 4: one image in train, one in val
    root = write_dataset(tmp_path, records)
    with pytest.raises(PedError, match="id 4 in train and val"):
        validate_records(load_records("cuhk-pedes", root), root, on_error="skip")


# ---- 3: high bit depth ----------------------------------------------------------------------------------
def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grey [H, W] or RGB [H, W, 3]); Pillow cannot write 16-bit colour itself."""
    h, w = arr.shape[:2]
    colour = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_3_sixteen_bit_pngs_keep_their_brightness(tmp_path: Path) -> None:
    grey = np.tile(np.array([0, 30000, 65535], np.uint16), (4, 1))
    (tmp_path / "grey.png").write_bytes(_png16(grey))
    assert load_rgb(tmp_path / "grey.png")[0, :, 0].tolist() == [0, 117, 255]  # not all white
    rgb = np.zeros((4, 3, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 60000, 30000, 1000
    (tmp_path / "rgb.png").write_bytes(_png16(rgb))
    assert np.abs(load_rgb(tmp_path / "rgb.png")[0, 0].astype(int) - [233, 117, 4]).max() <= 1


# ---- 4: queries of unknown words ------------------------------------------------------------------------
def test_4_unknown_words_are_named_and_a_query_of_only_unknown_words_is_refused(run: Path) -> None:
    pipeline = text_pipeline(run, read_config(run))
    assert pipeline.unknown_words(["w3 zxqv w5 blorf zxqv"]) == [["zxqv", "blorf"]]
    with pytest.raises(PedError, match="no word of 'zxqv blorf'"):
        pipeline.unknown_words(["w3 w4", "zxqv blorf"])


def test_4_query_refuses_unknown_words_only(run: Path, tmp_path: Path) -> None:
    res = ped("query", "zxqv blorf", "--gallery", tmp_path, "--run", run)
    assert res.exit_code == 2 and "zxqv, blorf" in res.output, res.output


def _report(query: str, path: Path, unknown: list[str]) -> QueryReport:
    from pedcli.engine.search.query import Match

    result = QueryResult(query, [Match(1, 0.5, path)], [], unknown)
    return QueryReport(path.parent, path.parent, "baseline", path.parent, "flat", 1, 0, [result])


def test_4_and_6_table_and_json_show_unknown_words_and_user_text_verbatim(tmp_path: Path) -> None:
    path = tmp_path / "[red]secret.jpg"
    report = _report("a [/] man [link=http://x]", path, ["blorf"])
    out = io.StringIO()
    print_tables(report, Console(file=out, width=200))
    shown = out.getvalue()
    assert "[red]secret.jpg" in shown and "a [/] man [link=http://x]" in shown
    assert "blorf" in shown
    assert to_json(report)["queries"][0]["unknown_words"] == ["blorf"]


# ---- 5 and 11: damaged checkpoints ----------------------------------------------------------------------
def test_5_changed_weights_are_detected(run: Path, tmp_path: Path) -> None:
    from pedcli.engine.runs import WEIGHTS_DIGEST

    copy = shutil.copytree(run, tmp_path / "run")
    ckpt = checkpoint_path(copy, "best")
    state = torch.load(ckpt, weights_only=True)
    assert WEIGHTS_DIGEST in state
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 1)
    weights = state["model"][name]
    weights[(0,) * weights.dim()] += 0.25  # finite, plausible: nothing but the digest can tell
    torch.save(state, ckpt)
    with pytest.raises(PedError, match="weights differ from the digest"):
        load_run(copy)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_11_a_damaged_checkpoint_is_a_clear_error(run: Path, tmp_path: Path, damage: str) -> None:
    copy = shutil.copytree(run, tmp_path / "run")
    ckpt = checkpoint_path(copy, "best")
    data = ckpt.read_bytes()
    ckpt.write_bytes(b"not a checkpoint " * 8 if damage == "garbage" else data[: len(data) // 2])
    res = ped("eval", "--run", copy)
    assert res.exit_code == 2 and "damaged" in res.output, res.output
    assert "weights_only" not in res.output


# ---- 6: Rich markup in user text ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["[/]", "[red]x", "[link=http://e.org]y"])
def test_6_paths_with_markup_are_printed_verbatim(tmp_path: Path, name: str) -> None:
    res = ped("eval", "--run", tmp_path / name)
    assert res.exit_code == 2, res.output
    expected = f"no run folder or checkpoint at {tmp_path / name}"
    assert "".join(expected.split()) in "".join(res.output.split())  # Rich wraps long lines


# ---- 8: damaged caches ----------------------------------------------------------------------------------
def test_8_a_truncated_part_is_an_error_not_a_traceback(run: Path, tiny_cache: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_cache, tmp_path / "cache")
    text = part_path(copy, "text")
    text.write_bytes(text.read_bytes()[:2000])
    res = ped("preprocess", "--check", copy)
    assert res.exit_code == 2 and "text.h5" in res.output and "ped preprocess" in res.output, res.output
    res = ped("eval", "--run", run, "--cache", copy)
    assert res.exit_code == 2 and "damaged" in res.output, res.output


def test_8_preprocess_rebuilds_a_missing_or_damaged_part_and_a_corrupt_meta(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data", good_records())
    out = tmp_path / "cache"
    pp.run_preprocess("cuhk-pedes", root, out, TINY_OPTS)
    digests = json.loads((out / META).read_text())["parts"]
    part_path(out, "text").unlink()
    with pytest.raises(PedError, match="run the same `ped preprocess` command again"):
        load_cache_info(out)
    pp.run_preprocess("cuhk-pedes", root, out, TINY_OPTS)  # not "up to date": the part is rebuilt
    assert json.loads((out / META).read_text())["parts"] == digests
    assert load_cache_info(out).damaged_parts() == []
    with h5py.File(part_path(out, "images"), "a") as f:  # same size, other pixels
        f["images"][0] = 255 - f["images"][0]
    (out / META).write_text((out / META).read_text()[:-40])
    with pytest.raises(PedError, match="meta.json is damaged"):
        load_cache_info(out)
    pp.run_preprocess("cuhk-pedes", root, out, TINY_OPTS)
    assert json.loads((out / META).read_text())["parts"] == digests


# ---- 9: captions that used to fail late -----------------------------------------------------------------
def test_9_nul_and_wordless_captions_are_caught_before_any_work(tmp_path: Path) -> None:
    records = good_records()
    records[2]["captions"] = ["a man\u0000 in red"]
    records[5]["captions"] = ["😀😀"]
    records[6]["captions"] = ["🙂", "a woman with a bag"]
    records[7]["file_path"] = "[/]gone.jpg"  # missing, and Rich markup when printed (case 6)
    root = write_dataset(tmp_path / "data", records)
    with pytest.raises(PedError, match=r"record 2 .*bad_caption.*\\x00") as err:
        pp.run_preprocess("cuhk-pedes", root, tmp_path / "c1", TINY_OPTS)
    assert "record 5 (imgs/5.jpg): no_captions" in err.value.message
    shown = io.StringIO()
    skip = dataclasses.replace(TINY_OPTS, on_error="skip")
    cache = pp.run_preprocess(
        "cuhk-pedes", root, tmp_path / "c2", skip, console=Console(file=shown, width=300)
    )
    with h5py.File(cache.part("text"), "r") as f:
        captions = f["caption"].asstr()[:].tolist()
    assert len(captions) == 12 - 3 and "a woman with a bag" in captions and "🙂" not in captions
    assert "imgs/[/]gone.jpg" in shown.getvalue()


# ---- 10: outputs that cannot be written -----------------------------------------------------------------
def test_10_unwritable_out_fails_before_the_work(run: Path, tiny_cache: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = ped("eval", "--run", run, "--out", blocker / "m.json")
    assert res.exit_code == 2 and "cannot write" in res.output and "retrieval" not in res.output, res.output
    res = ped("embed", "--run", run, "--out", blocker / "e.h5")
    assert res.exit_code == 2 and "cannot write" in res.output, res.output
    res = ped("query", "w3 w5", "--gallery", tmp_path, "--run", run, "--html", blocker / "q.html")
    assert res.exit_code == 2 and "cannot write" in res.output, res.output
    with pytest.raises(PedError, match="cannot write"):
        tiny_train(tiny_cache, blocker / "run")


def test_10_a_full_disk_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(PedError, match="no space left on /"):
        save_checkpoint(tmp_path / "last.pt", {"model": {"w": torch.ones(3)}})
    assert list(tmp_path.iterdir()) == []  # no partial file left


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_10_read_only_out_folder(run: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    res = ped("eval", "--run", run, "--out", ro / "m.json")
    assert res.exit_code == 2 and "permission denied" in res.output, res.output


# ---- 12: paths outside the dataset root -----------------------------------------------------------------
def test_12_paths_outside_the_root_are_refused_and_duplicates_compared_resolved(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    write_dataset(outside, [], n_images=1)
    records = good_records()
    records[1]["file_path"] = "../../elsewhere/imgs/0.jpg"  # relative to ROOT/imgs
    records[2]["file_path"] = str(outside / "imgs" / "0.jpg")
    records[3]["file_path"] = "link.jpg"
    records[4]["file_path"] = "../imgs/0.jpg"  # = imgs/0.jpg of record 0
    root = write_dataset(tmp_path / "data", records)
    (root / "imgs" / "link.jpg").symlink_to(outside / "imgs" / "0.jpg")
    loaded = load_records("cuhk-pedes", root)
    kept, report = validate_records(loaded, root, on_error="skip")
    kinds = {p.index: p.kind for p in report.problems}
    assert kinds == {1: "outside_root", 2: "outside_root", 3: "outside_root", 4: "duplicate_path"}
    with pytest.raises(PedError, match="--allow-outside-root"):
        validate_records(loaded, root)
    _, report = validate_records(loaded, root, on_error="skip", allow_outside_root=True)
    assert {p.index: p.kind for p in report.problems} == {
        2: "duplicate_path",
        3: "duplicate_path",
        4: "duplicate_path",
    }


# ---- 13: leftovers --------------------------------------------------------------------------------------
WORKER_TASK = """
import os, time
from pathlib import Path

def sleeper(folder, out):
    Path(folder, f"pid-{os.getpid()}").write_text("")
    time.sleep(120)
    return out
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper that a container lacks)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_13_pool_workers_exit_when_preprocess_is_killed(tmp_path: Path) -> None:
    (tmp_path / "fault_task.py").write_text(WORKER_TASK)
    driver = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(tmp_path)!r})
import fault_task
from pedcli.engine import preprocess as pp
part = pp._Part("x", "k", [(fault_task.sleeper, ({str(tmp_path)!r},)) for _ in range(2)])
pp._run_parts([part], Path({str(tmp_path / "cache")!r}), 2, None)
"""
    proc = subprocess.Popen([sys.executable, "-c", driver])
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = [int(p.name[4:]) for p in tmp_path.glob("pid-*")]
        assert len(pids) == 2, "the workers did not start"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_running(p) for p in pids), "pool workers outlived their killed parent"
    finally:
        for p in pids:
            if _running(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_13_stale_partial_files_are_removed_at_the_next_start(tmp_path: Path) -> None:
    from pedcli.fileio import _HOST, remove_stale_partials_in

    dead, live = _dead_pid(), os.getpid()
    stale = tmp_path / f".last.pt.{_HOST}-{dead}.abc123.partial"
    stale_best = tmp_path / f".best.pt.{_HOST}-{dead}.def456.partial"
    busy = tmp_path / f".last.pt.{_HOST}-{live}.ghi789.partial"  # a writer that still runs
    foreign = tmp_path / f".last.pt.otherhost-{dead}.jkl012.partial"  # another machine's writer
    for p in (stale, stale_best, busy, foreign):
        p.write_bytes(b"half a checkpoint")
    write_text_atomic(tmp_path / "last.pt", "new")
    assert not stale.exists() and stale_best.exists() and busy.exists() and foreign.exists()
    assert remove_stale_partials_in(tmp_path) == [stale_best]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, foreign.name, "last.pt"])


def test_13_out_never_replaces_a_file_of_another_kind_without_force(run: Path, tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    before = photo.read_bytes()
    for args in (("eval", "--run", run, "--out", photo), ("embed", "--run", run, "--out", photo)):
        res = ped(*args)
        assert res.exit_code == 2 and "--force" in res.output, res.output
        assert photo.read_bytes() == before
    metrics = tmp_path / "m.json"
    assert ped("eval", "--run", run, "--out", metrics).exit_code == 0
    assert ped("eval", "--run", run, "--out", metrics).exit_code == 0  # an earlier metrics file: replaced
    res = ped("eval", "--run", run, "--out", photo, "--force")
    assert res.exit_code == 0, res.output
    assert json.loads(photo.read_text())["t2i"]["R@1"] >= 0
