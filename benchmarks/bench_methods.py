"""Method comparison: every method trained and tested on one fixed hard synthetic benchmark.

    make bench-methods                                  # 6 methods × seeds 0,1,2 (about 2 h on 2 cores)
    python benchmarks/bench_methods.py --quick          # one seed, 160 identities, 6 epochs (17 min)
    python benchmarks/bench_methods.py --methods mgel baseline --seeds 0,1 --ablations
    python benchmarks/bench_methods.py --ablations mia nafs  # the main table and two papers' tables
    python benchmarks/bench_methods.py --ablations --ablation-seeds 0,1,2   # every table on 3 seeds

The data is built by the real commands, so anyone can rebuild it: `ped synth --realism hard --seed 0`
(low resolution, blur, JPEG, camera colour, clutter, occlusion, other views; rough captions), then
`ped preprocess` at 128×64 with pose maps from the annotated keypoints. Every run is `ped train` then
`ped eval --split test` (the test split is never used to pick the epoch: `ped train` keeps the best
validation epoch). On each method's first-seed run, `ped eval --rerank-top 100` is compared with exact
scoring as well.

Budget rules, identical for every method: the same images and image size, the same seeds, the method's
own learning rates (its paper's, where the paper gives them), its paper's batch size capped at 32
(`BATCH_CAP`: the same epochs then mean a similar number of optimiser steps), and one schedule
shape scaled down from the papers': FROZEN epochs with the ImageNet CNN frozen (on cached trunk maps),
shared among the method's stages in its paper's proportions, so that each paper's matching objective
gets epochs (MIA's step 2 and HAN's joint stage run on the frozen CNN: `frozen_lead`), then E2E
epochs of the stage(s) that train the CNN end to end (0 at FULL and QUICK: see there). `schedule()`
names the options; the "per-method" part is only how each method's options spell that shape.

Runs go `--jobs` at a time (default 2, one thread each: on a 2-core machine two one-thread runs get
more done than one two-thread run), seed by seed and the costliest method first, so a comparison cut
short still has whole seeds; extra rows (VARIANTS) after the methods' own. Each finished run is kept
(OUT/runs/NAME/, OUT/results/NAME.json), so a killed comparison resumes where it stopped. Writes
OUT/results.json and OUT/results.md and prints them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pedcli.data.cache import part_path
from pedcli.data.schema import SPLIT_CODE
from pedcli.engine.retrieval.metrics import chance_r1
from pedcli.fileio import write_json_atomic, write_text_atomic
from pedcli.models.methods.base import DataInfo, create_method

PED = str(Path(sys.executable).with_name("ped"))
METHODS = ("baseline", "mgel", "han", "pma", "mia", "nafs")
IMAGE_SIZE = "128x64"
SPLITS = "0.55,0.1,0.35"  # identities: train, val, test


@dataclass(frozen=True)
class Scale:
    identities: int
    frozen: int  # epochs with the CNN frozen (cached maps)
    e2e: int  # epochs that train the CNN


# FULL is sized for 6 methods (and HAN with its paper's SGD) × 3 seeds in about 2 h on 2 cores with
# --jobs 2 (MGEL at the paper's widths, ~8 samples/s on one thread, is the largest share); QUICK for
# about 20 min.
# No end-to-end epoch: one is all this budget affords, and on the last comparison (8 frozen + 1) it cost
# test R@1 on every run checked, its own last checkpoint against the best frozen epoch: PMA 13.6 → 6.7,
# NAFS 7.9 → 5.4 and 7.0 → 4.8, baseline 6.0 → 3.7 (the CNN's batch statistics and the crop/erase
# augmentation arrive at once and one epoch does not recover). Seeds whose noisy validation picked it
# scored lowest (PMA 8.6 and 5.0 against 13.6).
FULL = Scale(identities=320, frozen=8, e2e=0)  # 112 test identities
# QUICK keeps FULL's splits and 160 identities: at 128 the 12-identity validation split picked NAFS's
# first epoch (test R@1 3.4, against 15.3 at 160); 8 epochs at 160 took 24.5 min, so it trains 6.
QUICK = Scale(identities=160, frozen=6, e2e=0)  # 56 test identities


# Batch size rule: the paper's, capped at MGEL's 32. The papers' 64–128 are sized for CUHK-PEDES's 68k
# training captions; on this benchmark's ~1,100 they would leave PMA (128) 8 optimiser steps an epoch
# against MGEL's 34, so the same epochs would not be the same training.
BATCH_CAP = 32


@functools.cache
def paper_batch(method: str) -> int:
    """The largest batch of the method's default stages."""
    info = DataInfo(num_classes=2, vocab_size=4, image_size=(128, 64))
    return max(s.batch_size for s in create_method(method, info, {"pretrained": "none"}).default_stages())


def schedule(method: str, s: Scale) -> list[str]:
    """The budget rule in each method's own option names (`ped methods`), and the batch size rule."""
    f, e = s.frozen, s.e2e
    batch = [f"train.batch_size={BATCH_CAP}"] if paper_batch(method) > BATCH_CAP else []
    return (
        batch
        + {
            "baseline": [f"frozen_epochs={f}", f"full_epochs={e}"],
            "mgel": [f"warmup_epochs={f}", f"epochs={e}"],
            # the frozen part split half and half between the classification stage and the joint stage,
            # where the paper puts its ranking loss (its 80 : 60 would give 5 + 3, but the last joint
            # epoch was the best in 11 of 18 runs; 2 + 6, and the paper's ÷10 decay after 3 of each 4
            # epochs, scored lower on validation: bench_methods.md); the joint stage then fine-tunes the CNN
            "han": [
                "stage1_freeze_trunk=true",
                f"stage1_epochs={f // 2}",
                f"stage2_frozen_epochs={f - f // 2}",
                "stage2_freeze_trunk=false",
                f"stage2_epochs={e}",
            ],
            "pma": [f"frozen_epochs={f}", f"full_epochs={e}"],
            # the frozen part as 1/4 step 1 (identity), 1/2 step 2's objectives on the frozen CNN, 1/4
            # step 3 (the BFM MLPs); step 2 then fine-tunes the CNN. The paper's 10 : 20 : 5 would give
            # 2 + 5 + 1 (seeds 0-2: 7.7 ± 1.0 against 7.8 ± 0.4). Step 3 trains its fresh MLPs at the
            # paper's rate for heads on a fixed CNN (step 1's 1e-3): its 2e-4 is sized for 5 epochs of
            # 68k captions (~3,500 steps), where 2 epochs here give 66 (seed 0: 7.3 → 7.7)
            "mia": [
                f"step1_epochs={f // 4}",
                f"step2_frozen_epochs={f - 2 * (f // 4)}",
                f"step2_epochs={e}",
                f"step3_epochs={f // 4}",
                "step3_lr=1e-3",
            ],
            "nafs": [f"frozen_epochs={f}", f"epochs={e}"],
        }[method]
    )


# Extra rows of the main table: a method with its paper's recipe where the method's default departs from
# it in this budget. HAN trains its frozen-CNN stages with Adam at 5e-4 (`frozen_optimizer`, `frozen_lr`);
# its paper's SGD is sized for 80 + 60 epochs, and in 4 + 4 (seed 0) its losses moved 10.36 → 10.27 and
# 12.44 → 12.10 (Adam: 10.46 → 7.79, 7.86 → 2.08). Adam's rate was chosen by validation: best val R@1 over
# seeds 0-2 was 19.4 at 1e-3, 24.2 at 5e-4, 21.7 at 2.5e-4; over seeds 0-4, 24.7 at 5e-4 against 19.9 at
# 2.5e-4 (bench_methods.md).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "han, paper SGD": ("han", ["frozen_optimizer=sgd", "frozen_lr=1e-3"])
}

# One table per paper (`ped train --set`), on the first seed or `--ablation-seeds`; the full model is the
# main table's run of that seed.
# A row is (label, `--set` options to train with, `ped eval` options); a row without `--set` options only
# evaluates the full run again (RVN is test-time re-ranking: no model to retrain).
ABLATIONS: dict[str, list[tuple[str, list[str], list[str]]]] = {
    "mgel": [("granularities 1", ["granularities=1"], []), ("granularities 1,2", ["granularities=1,2"], [])],
    "pma": [("without pose", ["pose_concat=false", "fa_pose=false"], [])],
    "han": [
        ("without cubic attention", ["spatial_source=last"], []),
        ("without cross-modal attention", ["cross_modal_attention=false"], []),
    ],
    "mia": [
        ("global only", ["relation=false", "fine=false"], []),
        ("global + relation", ["fine=false"], []),
    ],
    "nafs": [
        ("without non-local attention", ["nonlocal_attention=false"], []),
        ("without RVN", [], ["--rerank", "none"]),
    ],
}
FULL_NAME = {
    "mgel": "granularities 1,2,4,8",
    "pma": "with pose",
    "han": "full",
    "mia": "global + relation + fine",
    "nafs": "full",
}
# Relative cost of a run (the FULL comparison's mean train seconds / 150: NAFS 1668, MGEL 1207, HAN 986
# and 1140 with Adam, PMA 889, MIA 737, baseline 145): the slowest start first, so that parallel jobs
# finish close together (NAFS last left one core idle for ~8 minutes of a --quick run).
COST = {"nafs": 11, "mgel": 8, "han": 7, "pma": 6, "mia": 5, "baseline": 1}
TWO_STAGE_K = 100  # `ped eval --rerank-top K` against exact scoring, on each method's first-seed run


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


def test_pids(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(person id of each test caption, of each test image), read from the cache."""
    with h5py.File(part_path(cache, "images"), "r") as f:
        pid, code = f["pid"][:], f["split"][:]
    with h5py.File(part_path(cache, "text"), "r") as f:
        image_of = f["image_index"][:]
    test = SPLIT_CODE["test"]
    return pid[image_of[code[image_of] == test]], pid[code == test]


def run_one(job: Job, cache: Path, out: Path, env: dict[str, str], quiet: bool) -> dict:
    """Train (resuming a killed run) and evaluate on the test split; the result is kept on disk."""
    result_path = out / "results" / f"{job.name}.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run = out / "runs" / job.run
    clock = out / "runs" / f"{job.run}.seconds"  # train seconds of all attempts, so resumes add up
    if not job.eval_args or not (run / "config.json").is_file():
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
    m = evaluate(run, out / "results" / f"{job.name}.test.json", job.eval_args, env)
    result = {
        "name": job.name,
        "method": job.method,
        "seed": job.seed,
        "set": job.sets,
        "eval": job.eval_args,
        "t2i": {k: m["t2i"][k] for k in ("R@1", "R@5", "R@10", "mAP")},
        "i2t_R@1": m["i2t"]["R@1"],
        "train_s": float(clock.read_text()),
    }
    if job.two_stage:  # issue: the shortlist must not cost accuracy on a trained model
        two = evaluate(run, out / "results" / f"{job.name}.two-stage.json",
                       ["--rerank-top", str(TWO_STAGE_K)], env)  # fmt: skip
        result["two_stage"] = {"k": TWO_STAGE_K} | {
            f"{d} {k}": two["difference"][d][k] for d in ("t2i", "i2t") for k in ("R@1", "R@10")
        }
    write_json_atomic(result_path, result)
    return result


def kept_result(path: Path, job: Job) -> dict:
    """A finished run's result, refused where it was trained or evaluated with other options than the job
    now asks for (a row whose options changed keeps its name: its old result must not pass for it)."""
    result = json.loads(path.read_text())
    if result.get("set") != job.sets or result.get("eval") != job.eval_args:
        raise SystemExit(
            f"{path} was run with --set {result.get('set')} and eval {result.get('eval')}, but row "
            f"'{job.row}' now asks for --set {job.sets} and eval {job.eval_args}: use another --out, or "
            f"delete that result and its run folder ({path.parents[1] / 'runs' / job.run}) to rerun it"
        )
    return result


def evaluate(run: Path, metrics: Path, args: list[str], env: dict[str, str]) -> dict:
    """`ped eval --split test` of a run (kept as `metrics`, reused when there)."""
    if not metrics.is_file():
        cmd = [PED, "eval", "--run", str(run), "--split", "test", "--out", str(metrics), "--force", *args]
        sh(cmd, env, quiet=True)
    return json.loads(metrics.read_text())


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


def separation(methods: dict[str, dict]) -> str:
    """The goal's test: a method beats the baseline when its mean test R@1 exceeds the baseline's by more
    than twice the larger of the two standard deviations (seed noise)."""
    if "baseline" not in methods:
        return ""
    base = methods["baseline"]["t2i"]["R@1"]
    lines = ["**Against the baseline** (mean test R@1 difference vs 2 × the larger std over seeds)\n"]
    for name, s in methods.items():
        if name == "baseline":
            continue
        mean, gap = s["t2i"]["R@1"][0], 2 * max(s["t2i"]["R@1"][1], base[1])
        if min(len(s["seeds"]), len(methods["baseline"]["seeds"])) < 2:
            lines.append(f"- {name}: {mean - base[0]:+.1f} points (one seed: no spread to compare with)")
            continue
        verdict = "beats it" if mean - base[0] > gap else "does not separate from it"
        verdict = "below it" if base[0] - mean > gap else verdict
        digits = 1 if f"{abs(mean - base[0]):.1f}" != f"{gap:.1f}" else 2  # never "+1.4, 2σ = 1.4: beats"
        lines.append(f"- {name}: {mean - base[0]:+.{digits}f} points, 2σ = {gap:.{digits}f}: {verdict}")
    return "\n".join(lines) + "\n"


def two_stage_table(runs: list[dict]) -> str:
    """Two-stage (cosine shortlist of K, then the method's score) minus exact scoring, in points."""
    rows = [r for r in runs if "two_stage" in r]
    if not rows:
        return ""
    k = rows[0]["two_stage"]["k"]
    keys = ("t2i R@1", "t2i R@10", "i2t R@1", "i2t R@10")
    lines = [f"**Two-stage (K = {k}) minus exact, test split (seed {rows[0]['seed']})**\n",
             "| method | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 1) + "|"]  # fmt: skip
    lines += [
        f"| {r['method']} | " + " | ".join(f"{r['two_stage'][c]:+.2f}" for c in keys) + " |" for r in rows
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Job:
    name: str  # result file
    run: str  # run folder (an evaluation-only row shares its full model's)
    method: str
    sets: list[str]
    seed: int
    table: str  # "methods" or the ablated method
    row: str
    eval_args: list[str] = field(default_factory=list)
    two_stage: bool = False  # also compare two-stage with exact scoring


def slug(row: str) -> str:
    """A row label as a file name: "han, paper SGD" → "han-paper-sgd", "a + b" → "a-b"."""
    return "-".join(re.findall(r"[a-z0-9]+", row.lower()))


def plan(
    methods: list[str],
    seeds: list[int],
    scale: Scale,
    ablations: list[str],
    ablation_seeds: list[int] | None = None,
) -> list[Job]:
    """Main runs seed by seed (a cut-short comparison still has whole seeds), the costliest method first;
    then the variant rows, likewise (extras: they must not hold back the methods' own rows); then the
    ablation rows, seed by seed, on `ablation_seeds` (each one of `seeds`; default the first)."""
    main = [(m, m, []) for m in sorted(methods, key=lambda m: -COST[m])]
    variants = [(row, m, extra) for row, (m, extra) in VARIANTS.items() if m in methods]
    jobs = [
        Job(
            f"{slug(row)}-s{s}",
            f"{slug(row)}-s{s}",
            m,
            schedule(m, scale) + extra,
            s,
            "methods",
            row,
            two_stage=s == seeds[0] and not extra,
        )
        for rows in (main, variants)
        for s in seeds
        for row, m, extra in rows
    ]
    names = [j.name for j in jobs]
    for s in seeds[:1] if ablation_seeds is None else ablation_seeds:
        for m in [m for m in methods if m in ablations]:
            full = jobs[names.index(f"{m}-s{s}")]
            jobs.append(Job(full.name, full.run, m, full.sets, s, m, FULL_NAME[m]))  # the main run
            for row, extra, eval_args in ABLATIONS[m]:
                name = f"{m}-{slug(row)}-s{s}"
                run, sets = (full.run, full.sets) if not extra else (name, full.sets + extra)
                jobs.append(Job(name, run, m, sets, s, m, row, eval_args))
    return jobs


def run_all(jobs: list[Job], n_parallel: int, run: Callable[[Job], dict]) -> dict[str, dict]:
    """Every distinct job once, `n_parallel` at a time; an evaluation-only row waits for the training of
    its run. A failed job is reported and skipped (rerun the script to retry it). Of jobs with one name the
    first is run: the main table's, which also measures two-stage scoring (an ablation table's "full" row
    repeats it)."""
    first: dict[str, Job] = {}
    for j in jobs:
        first.setdefault(j.name, j)
    unique = list(first.values())
    trains, evals = [j for j in unique if not j.eval_args], [j for j in unique if j.eval_args]
    done: dict[str, dict] = {}
    start, total = time.perf_counter(), len(unique)

    def one(job: Job) -> None:
        print(f"[{len(done) + 1}/{total}] {job.name} started ({time.perf_counter() - start:.0f} s so far)")
        try:
            r = done[job.name] = run(job)
        except subprocess.CalledProcessError as e:  # one broken method must not lose the others
            print(f"  {job.name} FAILED ({e}); rerun to retry it", flush=True)
            return
        print(f"  {job.name}: test R@1 {r['t2i']['R@1']:.1f}, trained in {r['train_s']:.0f} s", flush=True)

    for batch in (trains, evals):
        with ThreadPoolExecutor(n_parallel) as pool:
            list(pool.map(one, batch))
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds (--quick: the first only).")
    ap.add_argument("--quick", action="store_true", help="One seed, 160 identities (56 in test), 6 epochs.")
    ap.add_argument(
        "--ablations",
        nargs="*",
        choices=list(ABLATIONS),
        metavar="METHOD",
        help="Also one table per paper (only the named methods' papers, if any named).",
    )
    ap.add_argument(
        "--ablation-seeds",
        default=None,
        help="Comma-separated seeds of the ablation rows, each one of --seeds (default: the first).",
    )
    ap.add_argument("--out", type=Path, default=None, help="Work folder (default bench-out/methods[-quick]).")
    ap.add_argument("--threads", type=int, default=1, help="Torch threads of each run (OMP_NUM_THREADS).")
    ap.add_argument("--jobs", type=int, default=2, help="Runs at a time (each with --threads threads).")
    ap.add_argument("--quiet", action="store_true", help="No progress bars of the ped commands.")
    args = ap.parse_args()
    scale = QUICK if args.quick else FULL
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    out = args.out or Path("bench-out") / ("methods-quick" if args.quick else "methods")
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    env |= {"TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cache = build_data(out, scale, env, args.quiet)
    text_pids, image_pids = test_pids(cache)
    chance = chance_r1(text_pids, image_pids)
    n_test = len(set(image_pids))
    ablations = [] if args.ablations is None else args.ablations or list(ABLATIONS)
    ablation_seeds = [int(s) for s in args.ablation_seeds.split(",")] if args.ablation_seeds else None
    if ablation_seeds and not set(ablation_seeds) <= set(seeds):
        ap.error(f"--ablation-seeds {args.ablation_seeds} must be among --seeds {args.seeds}")
    jobs = plan(args.methods, seeds, scale, ablations, ablation_seeds)
    for job in jobs:  # a stale result stops the comparison before anything runs (`run_one` reuses results)
        if (kept := out / "results" / f"{job.name}.json").is_file():
            kept_result(kept, job)
    print(f"chance R@1 on the test split: {chance:.1f} % ({n_test} identities)", flush=True)
    done = run_all(jobs, args.jobs, lambda job: run_one(job, cache, out, env, args.quiet or args.jobs > 1))
    tables: dict[str, dict[str, list[dict]]] = {}
    for job in jobs:
        if job.name in done:
            tables.setdefault(job.table, {}).setdefault(job.row, []).append(done[job.name])
    summary = {t: {row: summarise(rs) for row, rs in rows.items()} for t, rows in tables.items()}
    title = f"Text→image on the test split ({n_test} identities, chance R@1 {chance:.1f} %)"
    md = [markdown(title, "method", summary.get("methods", {}))]
    md += [separation(summary["methods"])] if "methods" in summary else []
    md += [markdown(f"{m} ablation", m, t) for m, t in summary.items() if m != "methods"]
    md += [two_stage_table(list(done.values()))]
    bench = {"identities": scale.identities, "test_identities": n_test, "splits": SPLITS, "realism": "hard",
             "synth_seed": 0, "image_size": IMAGE_SIZE, "chance_R@1": chance, "frozen_epochs": scale.frozen,
             "e2e_epochs": scale.e2e, "threads": args.threads}  # fmt: skip
    write_json_atomic(out / "results.json", {
        "benchmark": bench, "schedules": {m: schedule(m, scale) for m in args.methods},
        "tables": summary,
        "runs": list(done.values()),
    })  # fmt: skip
    write_text_atomic(out / "results.md", "\n".join(md))
    print("\n" + "\n".join(md) + f"\nwrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
