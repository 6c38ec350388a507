"""`ped serve` as a person uses it: headless Chromium (Debian's `chromium` package, driven through
playwright's Python client; no browser download) types a description of a person, waits for the results,
and checks that the person's images come first, that the thumbnails loaded, that the screenshot is not
blank, that a click shows the attention view, that "more like this" answers, and that a file name with
HTML shows as text."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pedcli.serve.probe import start_server, stop_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HTML_NAME = "<img src=x onerror=window.pwned=1>.png"
TOP = 5
VIEWPORT = {"width": 1200, "height": 900}  # page functions below are `() => …`: the page's CSP forbids eval
BATCH = {"batch_size": 16}
# 30 epochs on cached CNN maps: ~97 % of training captions find their person in the top 5 (of 75 images)
MGEL = {"embed_dim": 64, "word_dim": 64, "warmup_epochs": 30, "epochs": 0, "warmup_lr": 2e-3}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no chromium on PATH: install Debian's package (apt-get install chromium; .ci/run does it)",
    ),
]


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, int], dict]:
    """A 24-person synthetic set and a small MGEL (a method that explains its matches: stripe cosines)
    trained on it, its CNN frozen, until it knows its training people: (run, gallery folder, file name →
    person id, a training image's record)."""
    from pedcli.data.synth import generate
    from pedcli.engine.preprocess import PreprocessOptions, run_preprocess
    from pedcli.engine.train import train

    root = tmp_path_factory.mktemp("browser")
    generate(root / "raw", identities=24, seed=1, split_fractions=(0.5, 0.25, 0.25), progress=False)
    opts = PreprocessOptions(image_size=(128, 64), pose_source="annotations", workers=1)
    run_preprocess("synth", root / "raw", root / "cache", opts)
    train("mgel", root / "cache", root / "run", method_options=MGEL, options=BATCH, seed=0, progress=False)
    records = json.loads((root / "raw" / "reid_raw.json").read_text())
    gallery = root / "raw" / "imgs"
    shutil.copy(gallery / Path(records[0]["file_path"]).name, gallery / HTML_NAME)
    pid_of = {Path(r["file_path"]).name: r["id"] for r in records} | {HTML_NAME: records[0]["id"]}
    described = next(r for r in records if r["split"] == "train")
    return root / "run", gallery, pid_of, described


def test_search_in_the_browser(people, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    run, gallery, pid_of, described = people
    query = described["captions"][0]
    proc, url = start_server(run, gallery)
    try:
        with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
            browser = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=FLAGS, viewport=VIEWPORT
            )
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_function("() => document.getElementById('meta').textContent.includes('images in')")
            assert f"{len(pid_of)} images" in page.text_content("#meta")
            assert "method mgel" in page.text_content("#meta")

            page.fill("#q", query)
            page.fill("#top", str(TOP))
            page.click("button[type=submit]")
            page.wait_for_selector(".card")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.card img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
            names = page.eval_on_selector_all(".card .name", "els => els.map(e => e.textContent)")
            assert len(names) == TOP
            assert described["id"] in [pid_of[n] for n in names], (query, names)  # the described person
            widths = page.eval_on_selector_all(".card img", "els => els.map(i => i.naturalWidth)")
            assert all(w > 0 for w in widths)
            assert page.text_content("#phrases").startswith("noun phrases:")
            shot = np.asarray(Image.open(io.BytesIO(page.screenshot(path=str(tmp_path / "results.png")))))
            assert shot.std() > 10 and len(np.unique(shot.reshape(-1, shot.shape[-1]), axis=0)) > 100

            page.click(".card >> nth=0")  # the attention view of the best match
            page.wait_for_selector(".detail .overlay .cell")
            assert page.is_visible("#detail") and page.locator(".detail .overlay .cell").count() > 0
            assert page.text_content(".detail .label")
            page.screenshot(path=str(tmp_path / "detail.png"))

            page.click(".detail .more")  # more like this
            page.wait_for_function(
                "() => document.getElementById('status').textContent.startsWith('more like')"
            )
            page.wait_for_selector(".card")
            assert page.locator(".card").count() == TOP

            page.fill("#q", "the person <b>in</b> a dress")  # HTML typed by a person stays text
            page.fill("#top", "200")
            page.click("button[type=submit]")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.card .name')]"
                ".some(e => e.textContent.startsWith('<img'))"
            )
            shown = page.eval_on_selector_all(".card .name", "els => els.map(e => e.textContent)")
            assert HTML_NAME in shown and page.evaluate("() => window.pwned === undefined")
            assert page.locator(".card img[src='x']").count() == 0 and page.locator("#results b").count() == 0

            page.fill("#q", query)
            page.fill("#min-score", "1000")
            page.click("button[type=submit]")
            page.wait_for_selector(".empty")
            assert "Lower or clear min score" in page.text_content(".empty")
            assert errors == []
            browser.close()
    finally:
        log = stop_server(proc)
    assert "Traceback" not in log, log
