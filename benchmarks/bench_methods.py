"""Method comparison: every method trained and tested on one fixed hard synthetic benchmark.

    make bench-methods                                  # 6 methods × seeds 0,1,2 (about 2 h on 2 cores)
    python benchmarks/bench_methods.py --quick          # one seed, a smaller set (about 20 min)
    python benchmarks/bench_methods.py --methods mgel baseline --seeds 0,1 --ablations

The data is built by the real commands, so anyone can rebuild it: `ped synth --realism hard --seed 0`
(low resolution, blur, JPEG, camera colour, clutter, occlusion, other views; rough captions), then
`ped preprocess` at 128×64 with pose maps from the annotated keypoints. Every run is `ped train` then
`ped eval --split test` (the test split is never used to pick the epoch: `ped train` keeps the best
validation epoch).

Budget rules, identical for every method: the same images and image size, the same seeds, the method's
own default batch size and learning rates (its paper's, where the paper gives them), and one schedule
shape scaled down from the papers': FROZEN epochs of the method's first stage(s) with the CNN frozen
(on cached trunk maps: cheap) and then E2E epochs of the stage(s) that train the CNN end to end,
where each paper puts its gain (SCHEDULES below names the options). The "per-method" part is only how
each method's options spell that shape.

Each finished run is kept (OUT/runs/NAME/, OUT/results/NAME.json), so a killed comparison resumes where
it stopped. Writes OUT/results.json and OUT/results.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pedcli.data.cache import part_path
from pedcli.data.schema import SPLIT_CODE
from pedcli.fileio import write_json_atomic, write_text_atomic

PED = str(Path(sys.executable).with_name("ped"))
METHODS = ("baseline", "mgel", "han", "pma", "mia", "nafs")
IMAGE_SIZE = "128x64"
SPLITS = "0.55,0.1,0.35"  # identities: train, val, test


@dataclass(frozen=True)
class Scale:
    identities: int
    frozen: int  # epochs with the CNN frozen (cached maps)
    e2e: int  # epochs that train the CNN


# FULL is sized for 6 methods × 3 seeds in about 2 h on 2 idle cores (estimated from per-epoch speeds
# measured under load, not yet timed end to end); QUICK for about 20 min.
FULL = Scale(identities=320, frozen=15, e2e=2)  # 112 test identities
QUICK = Scale(identities=160, frozen=6, e2e=1)  # 56 test identities


def schedule(method: str, s: Scale) -> list[str]:
    """The budget rule in each method's own option names (`ped methods`)."""
    f, e = s.frozen, s.e2e
    return {
        "baseline": [f"frozen_epochs={f}", f"full_epochs={e}"],
        "mgel": [f"warmup_epochs={f}", f"epochs={e}"],
        "han": [
            "stage1_freeze_trunk=true",
            f"stage1_epochs={f}",
            "stage2_freeze_trunk=false",
            f"stage2_epochs={e}",
        ],
        "pma": [f"frozen_epochs={f}", f"full_epochs={e}"],
        # step 1 (CNN frozen) and step 3 (the BFM heads) are the frozen part; step 2 trains the CNN
        "mia": [f"step1_epochs={f - f // 3}", f"step2_epochs={e}", f"step3_epochs={f // 3}"],
        "nafs": [f"frozen_epochs={f}", f"epochs={e}"],
    }[method]


# One table per paper (`ped train --set`), on the first seed; the full model is the main table's run.
ABLATIONS: dict[str, list[tuple[str, list[str]]]] = {
    "mgel": [("granularities 1", ["granularities=1"]), ("granularities 1,2", ["granularities=1,2"])],
    "pma": [("without pose", ["pose_concat=false", "fa_pose=false"])],
    "han": [
        ("without cubic attention", ["spatial_source=last"]),
        ("without cross-modal attention", ["cross_modal_attention=false"]),
    ],
    "mia": [("global only", ["relation=false", "fine=false"]), ("global + relation", ["fine=false"])],
    "nafs": [("without non-local attention", ["nonlocal_attention=false"]), ("without RVN", ["rvn=false"])],
}
FULL_NAME = {
    "mgel": "granularities 1,2,4,8",
    "pma": "with pose",
    "han": "full",
    "mia": "global + relation + fine",
    "nafs": "full",
}


def sh(cmd: list[str], env: dict[str, str], quiet: bool) -> None:
    print("$ " + " ".join(cmd), flush=True)
    out = subprocess.DEVNULL if quiet else None
    subprocess.run(cmd, check=True, env=env, stdout=out, stderr=out)


def build_data(out: Path, s: Scale, env: dict[str, str], quiet: bool) -> Path:
    """`ped synth --realism hard` and `ped preprocess`, skipped when already there."""
    raw, cache = out / "data" / "synth", out / "data" / "cache"
    if not (raw / "reid_raw.json").is_file():
        cmd = [PED, "synth", "--out", str(raw), "--identities", str(s.identities), "--seed", "0",
               "--realism", "hard", "--splits", SPLITS]  # fmt: skip
        sh(cmd, env, quiet)
    if not (cache / "meta.json").is_file():
        cmd = [PED, "preprocess", "--dataset", "synth", "--root", str(raw), "--out", str(cache),
               "--pose-source", "annotations", "--image-size", IMAGE_SIZE, "--workers", "1"]  # fmt: skip
        sh(cmd, env, quiet)
    return cache


def chance_r1(cache: Path, split: str = "test") -> float:
    """R@1 (%) of a random ranking: per caption, the share of the split's images showing its person."""
    with h5py.File(part_path(cache, "images"), "r") as f:
        pid, code = f["pid"][:], f["split"][:]
    with h5py.File(part_path(cache, "text"), "r") as f:
        image_of = f["image_index"][:]
    gallery = pid[code == SPLIT_CODE[split]]
    queries = pid[image_of[code[image_of] == SPLIT_CODE[split]]]
    return 100 * float((queries[:, None] == gallery[None, :]).mean())


def run_one(job: Job, cache: Path, out: Path, env: dict[str, str], quiet: bool) -> dict:
    """Train (resuming a killed run) and evaluate on the test split; the result is kept on disk."""
    result_path = out / "results" / f"{job.name}.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run = out / "runs" / job.name
    clock = out / "runs" / f"{job.name}.seconds"  # train seconds of all attempts, so resumes add up
    cmd = [PED, "train", "--method", job.method, "--cache", str(cache), "--run", str(run),
           "--seed", str(job.seed)]  # fmt: skip
    cmd += [a for kv in job.sets for a in ("--set", kv)] + (["--resume"] if run.exists() else [])
    t0 = time.perf_counter()
    try:
        sh(cmd + (["--quiet"] if quiet else []), env, quiet)
    finally:  # a killed attempt's time counts too
        spent = float(clock.read_text()) if clock.is_file() else 0.0
        clock.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(clock, f"{spent + time.perf_counter() - t0:.1f}")
    metrics = run / "test-metrics.json"
    sh([PED, "eval", "--run", str(run), "--split", "test", "--out", str(metrics)], env, quiet=True)
    m = json.loads(metrics.read_text())
    result = {
        "name": job.name,
        "method": job.method,
        "seed": job.seed,
        "set": job.sets,
        "t2i": {k: m["t2i"][k] for k in ("R@1", "R@5", "R@10", "mAP")},
        "i2t_R@1": m["i2t"]["R@1"],
        "train_s": float(clock.read_text()),
    }
    write_json_atomic(result_path, result)
    return result


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(rows: list[dict]) -> dict:
    t2i = {k: _mean_std([r["t2i"][k] for r in rows]) for k in ("R@1", "R@5", "R@10", "mAP")}
    return {
        "t2i": t2i,
        "i2t_R@1": _mean_std([r["i2t_R@1"] for r in rows]),
        "train_s": statistics.fmean(r["train_s"] for r in rows),
        "seeds": [r["seed"] for r in rows],
    }


def _cell(v: tuple[float, float], n: int) -> str:
    return f"{v[0]:.1f} ± {v[1]:.1f}" if n > 1 else f"{v[0]:.1f}"


def markdown(title: str, label: str, table: dict[str, dict]) -> str:
    lines = [
        f"**{title}**\n",
        f"| {label} | R@1 | R@5 | R@10 | mAP | image→text R@1 | train time | seeds |",
        "| --- " * 8 + "|",
    ]
    for row, s in table.items():
        n = len(s["seeds"])
        cells = [_cell(s["t2i"][m], n) for m in ("R@1", "R@5", "R@10", "mAP")] + [_cell(s["i2t_R@1"], n)]
        seeds = ",".join(map(str, s["seeds"]))
        lines.append(f"| {row} | {' | '.join(cells)} | {s['train_s']:.0f} s | {seeds} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Job:
    name: str  # run folder and result file
    method: str
    sets: list[str]
    seed: int
    table: str  # "methods" or the ablated method
    row: str


def plan(methods: list[str], seeds: list[int], scale: Scale, ablations: bool) -> list[Job]:
    """Main runs (every method × seed), then the ablation rows on the first seed."""
    jobs = [Job(f"{m}-s{s}", m, schedule(m, scale), s, "methods", m) for m in methods for s in seeds]
    for m in [m for m in methods if m in ABLATIONS] if ablations else []:
        full = jobs[[j.name for j in jobs].index(f"{m}-s{seeds[0]}")]
        jobs.append(Job(full.name, m, full.sets, seeds[0], m, FULL_NAME[m]))  # reuses the main run
        for row, extra in ABLATIONS[m]:
            slug = row.replace(" ", "_").replace(",", "")
            jobs.append(Job(f"{m}-{slug}-s{seeds[0]}", m, schedule(m, scale) + extra, seeds[0], m, row))
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds (--quick: the first only).")
    ap.add_argument("--quick", action="store_true", help="One seed, 160 identities, shorter schedule.")
    ap.add_argument("--ablations", action="store_true", help="Also one table per paper, on the first seed.")
    ap.add_argument("--out", type=Path, default=None, help="Work folder (default bench-out/methods[-quick]).")
    ap.add_argument("--threads", type=int, default=2, help="Torch threads of each run (OMP_NUM_THREADS).")
    ap.add_argument("--quiet", action="store_true", help="No progress bars of the ped commands.")
    args = ap.parse_args()
    scale = QUICK if args.quick else FULL
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    out = args.out or Path("bench-out") / ("methods-quick" if args.quick else "methods")
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    env |= {"TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cache = build_data(out, scale, env, args.quiet)
    chance, n_test = chance_r1(cache), int(np.unique(_test_pids(cache)).size)
    jobs = plan(args.methods, seeds, scale, args.ablations)
    done: dict[str, dict] = {}
    start = time.perf_counter()
    for k, job in enumerate(jobs, 1):
        if job.name in done:
            continue
        print(f"[{k}/{len(jobs)}] {job.name} ({time.perf_counter() - start:.0f} s so far)", flush=True)
        try:
            r = done[job.name] = run_one(job, cache, out, env, args.quiet)
        except subprocess.CalledProcessError as e:  # one broken method must not lose the others
            print(f"  FAILED ({e}); rerun to retry it", flush=True)
            continue
        print(f"  test R@1 {r['t2i']['R@1']:.1f} (chance {chance:.1f}), trained in {r['train_s']:.0f} s")
    tables: dict[str, dict[str, list[dict]]] = {}
    for job in jobs:
        if job.name in done:
            tables.setdefault(job.table, {}).setdefault(job.row, []).append(done[job.name])
    summary = {t: {row: summarise(rs) for row, rs in rows.items()} for t, rows in tables.items()}
    title = f"Text→image on the test split ({n_test} identities, chance R@1 {chance:.1f} %)"
    md = [markdown(title, "method", summary.pop("methods", {}))]
    md += [markdown(f"{m} ablation (seed {seeds[0]})", m, t) for m, t in summary.items()]
    bench = {"identities": scale.identities, "test_identities": n_test, "splits": SPLITS, "realism": "hard",
             "synth_seed": 0, "image_size": IMAGE_SIZE, "chance_R@1": chance, "frozen_epochs": scale.frozen,
             "e2e_epochs": scale.e2e, "threads": args.threads}  # fmt: skip
    write_json_atomic(out / "results.json", {
        "benchmark": bench, "schedules": {m: schedule(m, scale) for m in args.methods},
        "tables": {t: {row: summarise(rs) for row, rs in rows.items()} for t, rows in tables.items()},
        "runs": list(done.values()),
    })  # fmt: skip
    write_text_atomic(out / "results.md", "\n".join(md))
    print("\n" + "\n".join(md) + f"\nwrote {out / 'results.json'} and {out / 'results.md'}")


def _test_pids(cache: Path) -> np.ndarray:
    with h5py.File(part_path(cache, "images"), "r") as f:
        return f["pid"][:][f["split"][:] == SPLIT_CODE["test"]]


if __name__ == "__main__":
    main()
