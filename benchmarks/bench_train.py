"""Training speed (samples/s) of every registered method on CPU, with and without the frozen-trunk cache.

    make bench-train
    python benchmarks/bench_train.py --methods baseline pma --identities 40 --threads 2

A synthetic benchmark (`ped synth`) is preprocessed at the paper size 384×128 with pose maps from the
annotations, then each method trains one epoch per stage of its own schedule through the real engine
(`pedcli.engine.train.train`, default widths, MobileNetV2) — once with the trunk cache on and, for
methods with a frozen-trunk stage, once with it off. samples/s counts training steps only (no
validation); "cache build" is the one-off cost of computing the trunk outputs of every train image and
flip. Data and runs go to a temporary folder, or under --work (kept, and its cache reused next time).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pedcli.data.synth import generate
from pedcli.engine.preprocess import PreprocessOptions, run_preprocess
from pedcli.engine.train import train
from pedcli.errors import PedError
from pedcli.models.methods import list_methods


def build_cache(work: Path, identities: int) -> Path:
    cache = work / "cache"
    if not (cache / "meta.json").is_file():
        generate(work / "synth", identities=identities, seed=0, progress=False)
        run_preprocess("synth", work / "synth", cache, PreprocessOptions(pose_source="annotations"))
    return cache


def bench_method(name: str, cache: Path, runs: Path, batch_size: int, trunk_cache: bool) -> list[dict]:
    """One epoch per stage; the epoch records of the run (samples/s, trunk cache seconds)."""
    run = runs / f"{name}-{'cached' if trunk_cache else 'live'}"
    shutil.rmtree(run, ignore_errors=True)
    options = {"epochs": 1, "batch_size": batch_size, "trunk_cache": trunk_cache}
    return train(name, cache, run, options=options, seed=0, device="cpu", progress=False).history


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    parser.add_argument("--identities", type=int, default=40, help="synthetic identities (80%% train)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep data and runs here (default: temporary)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_all(
            args.methods or list_methods(), args.work or Path(tmp), args.identities, args.batch_size
        )
    header = ("method", "stage", "samples/s", "live trunk", "speed-up", "cache build s", "")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch_size}, 384x128")
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)))


def run_all(methods: list[str], work: Path, identities: int, batch_size: int) -> list[tuple]:
    """Table rows: per method and stage, samples/s with the cache, with the live trunk, build seconds."""
    cache = build_cache(work, identities)
    rows: list[tuple] = []
    for name in methods:
        start = time.perf_counter()
        try:
            cached = bench_method(name, cache, work / "runs", batch_size, trunk_cache=True)
            frozen = any("trunk_cache_s" in r for r in cached)
            live = bench_method(name, cache, work / "runs", batch_size, False) if frozen else cached
        except (PedError, RuntimeError, ValueError) as e:
            rows.append((name, "-", "-", "-", "-", "-", f"failed: {str(e).splitlines()[0][:60]}"))
            continue
        for c, lv in zip(cached, live, strict=True):
            has_cache = "trunk_cache_s" in c
            rows.append(
                (
                    name,
                    c["stage"],
                    f"{c['samples_per_s']:.1f}",
                    f"{lv['samples_per_s']:.1f}" if has_cache else "-",
                    f"{c['samples_per_s'] / lv['samples_per_s']:.2f}x" if has_cache else "-",
                    f"{c['trunk_cache_s']:.1f}" if has_cache else "-",
                    f"{time.perf_counter() - start:.0f}s total",
                )
            )
    return rows


if __name__ == "__main__":
    main()
