"""`ped serve` search latency under concurrent clients: p50 / p95 / p99 ms and searches per second.

Starts `ped serve` on a free port of 127.0.0.1 over a gallery with a trained run, waits for its first sync,
then sends --searches GET /api/search from --clients concurrent clients (one connection each), cycling
through sentences (the gallery's captions when it has a reid_raw.json). Every search syncs the gallery
(new files are found), encodes the sentence, shortlists and rescores, and explains the matches.
Without --run / --gallery it builds a small synthetic set and a one-epoch baseline run first (about a
minute; the model's quality does not matter for latency).
Run: `make bench-serve` (or with ARGS, e.g. `python benchmarks/bench_serve.py --run R --gallery G`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from pedcli.serve.probe import load, start_server, stop_server

FALLBACK_QUERIES = ["a man in a white coat and beige pants", "a woman with a black backpack"]


def build(root: Path) -> tuple[Path, Path]:
    """A 24-person synthetic set, its cache and a one-epoch baseline run: (run, gallery)."""
    from pedcli.data.synth import generate
    from pedcli.engine.preprocess import PreprocessOptions, run_preprocess
    from pedcli.engine.train import train

    generate(root / "synth", identities=24, seed=0, split_fractions=(0.5, 0.25, 0.25), progress=False)
    opts = PreprocessOptions(image_size=(128, 64), pose_source="annotations", workers=1)
    run_preprocess("synth", root / "synth", root / "cache", opts)
    small = {"embed_dim": 64, "hidden": 64, "word_dim": 64, "frozen_epochs": 1, "full_epochs": 0}
    train(
        "baseline",
        root / "cache",
        root / "run",
        method_options=small,
        options={"batch_size": 16},
        seed=0,
        progress=False,
    )
    return root / "run", root / "synth" / "imgs"


def sentences(gallery: Path) -> list[str]:
    """Captions from the gallery's annotation file (synthetic set), else two fixed sentences."""
    for ann in (gallery / "reid_raw.json", gallery.parent / "reid_raw.json"):
        if ann.is_file():
            return [c for rec in json.loads(ann.read_text(encoding="utf-8")) for c in rec["captions"]][:200]
    return FALLBACK_QUERIES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="trained run (default: build a small one)")
    ap.add_argument("--gallery", type=Path, help="image folder (default: the small synthetic set's)")
    ap.add_argument("--searches", type=int, default=200)
    ap.add_argument("--clients", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run, gallery = (args.run, args.gallery) if args.run and args.gallery else build(Path(tmp))
        proc, url = start_server(run, gallery)
        try:
            load(url, sentences(gallery)[:5], args.clients, args.clients)  # warm: one search per client
            start = time.perf_counter()
            answers = load(url, sentences(gallery), args.searches, args.clients)
            wall = time.perf_counter() - start
        finally:
            stop_server(proc)
    ms = np.array([s for _, s in answers]) * 1000
    failed = sum(not ok for ok, _ in answers)
    print(
        f"ped serve: {args.searches} searches from {args.clients} concurrent clients, {failed} failed; "
        f"latency p50 {np.percentile(ms, 50):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms, "
        f"p99 {np.percentile(ms, 99):.1f} ms; {args.searches / wall:.1f} searches/s"
    )
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
