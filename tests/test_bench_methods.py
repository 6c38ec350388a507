"""The method comparison's planning and bookkeeping (benchmarks/bench_methods.py), without training."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_methods", Path(__file__).parents[1] / "benchmarks" / "bench_methods.py"
)
bench = sys.modules["bench_methods"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(bench)


def test_plan_runs_costliest_first_and_evaluation_rows_reuse_the_full_run():
    jobs = bench.plan(["baseline", "nafs", "mgel"], [0, 1], bench.QUICK, ablations=list(bench.ABLATIONS))
    main = [j for j in jobs if j.table == "methods"]
    assert [(j.method, j.seed) for j in main][:4] == [("nafs", 0), ("mgel", 0), ("baseline", 0), ("nafs", 1)]
    assert {j.name for j in main if j.two_stage} == {"mgel-s0", "nafs-s0", "baseline-s0"}
    no_rvn = next(j for j in jobs if j.row == "without RVN")
    assert no_rvn.run == "nafs-s0" and no_rvn.eval_args == ["--rerank", "none"]
    no_nonlocal = next(j for j in jobs if j.row == "without non-local attention")
    assert no_nonlocal.run == no_nonlocal.name and "nonlocal_attention=false" in no_nonlocal.sets
    full_rows = [j for j in jobs if j.table == "nafs" and j.row == "full"]
    assert [j.name for j in full_rows] == ["nafs-s0"]  # the main table's run, not a second training


def test_ablation_seeds_give_each_table_one_row_per_seed_on_that_seeds_full_run():
    jobs = bench.plan(["baseline", "mgel"], [0, 1, 2], bench.QUICK, ["mgel"], ablation_seeds=[1, 2])
    table = [(j.row, j.seed, j.run) for j in jobs if j.table == "mgel"]
    assert ("granularities 1", 0, "mgel-granularities-1-s0") not in table
    for s in (1, 2):
        assert (bench.FULL_NAME["mgel"], s, f"mgel-s{s}") in table  # the main table's run of that seed
        assert ("granularities 1", s, f"mgel-granularities-1-s{s}") in table
    assert len({j.name for j in jobs}) == len([j for j in jobs if j.table == "methods"]) + 2 * 2


def test_run_all_runs_in_parallel_evaluations_after_trainings_and_survives_a_failure():
    jobs = bench.plan(["baseline", "nafs", "mgel"], [0], bench.QUICK, ablations=list(bench.ABLATIONS))
    active, peak, finished, lock = [0], [0], [], threading.Lock()
    two_stage = {}

    def fake(job):
        two_stage[job.name] = job.two_stage
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            if job.eval_args:  # evaluation rows start only after every training has finished
                assert {j.name for j in jobs if not j.eval_args} <= set(finished)
        time.sleep(0.05)
        with lock:
            active[0] -= 1
            finished.append(job.name)
        if job.method == "mgel" and job.row == "granularities 1":
            raise subprocess.CalledProcessError(1, "ped train")
        return {"t2i": {"R@1": 1.0}, "train_s": 0.0}

    done = bench.run_all(jobs, 2, fake)
    assert peak[0] == 2
    assert "mgel-granularities-1-s0" not in done and "nafs-without-rvn-s0" in done
    assert len(done) == len({j.name for j in jobs}) - 1
    assert two_stage["nafs-s0"] and two_stage["mgel-s0"]  # the main run, not its ablation-table repeat


@pytest.mark.parametrize(
    ("base", "other", "verdict"),
    [
        ((10.0, 1.0), (13.0, 1.0), "beats it"),
        ((10.0, 1.0), (11.5, 1.0), "does not separate"),
        ((10.0, 2.0), (5.0, 0.5), "below it"),
    ],  # fmt: skip
)
def test_separation_needs_more_than_twice_the_larger_std(base, other, verdict):
    row = lambda r1: {"t2i": {"R@1": r1}, "seeds": [0, 1, 2]}  # noqa: E731
    text = bench.separation({"baseline": row(base), "mgel": row(other)})
    assert verdict in text


def test_one_seed_gives_no_verdict():
    """With one seed there is no spread: "2σ = 0.0: beats it" would claim what it cannot show."""
    row = {"t2i": {"R@1": (13.0, 0.0)}, "seeds": [0]}
    text = bench.separation({"baseline": {"t2i": {"R@1": (10.0, 0.0)}, "seeds": [0]}, "mgel": row})
    assert "one seed" in text and "beats" not in text


def test_batch_rule_caps_the_papers_batch_sizes_at_mgels():
    assert bench.paper_batch("pma") == 128 and bench.paper_batch("mgel") == 32
    assert f"train.batch_size={bench.BATCH_CAP}" in bench.schedule("pma", bench.FULL)
    assert not any(s.startswith("train.batch_size") for s in bench.schedule("mgel", bench.FULL))


@pytest.mark.parametrize("method", bench.METHODS)
def test_every_schedule_spells_the_same_budget(method):
    """FROZEN epochs with the CNN frozen, then E2E epochs that train it, in each method's own options."""
    from pedcli.cli_options import parse_assignments
    from pedcli.engine.train import TrainOptions
    from pedcli.models.methods.base import DataInfo, create_method, method_class

    scale = bench.FULL
    opts, train = parse_assignments(bench.schedule(method, scale), method_class(method).Config, TrainOptions)
    info = DataInfo(num_classes=2, vocab_size=4, image_size=(128, 64))
    stages = create_method(method, info, {"pretrained": "none", **opts}).default_stages()
    frozen = [s.epochs for s in stages if s.freeze_trunk]
    learning = [s.epochs for s in stages if not s.freeze_trunk]
    assert (sum(frozen), sum(learning)) == (scale.frozen, scale.e2e)
    assert train.get("batch_size", bench.paper_batch(method)) <= bench.BATCH_CAP


def test_variant_rows_train_their_own_runs_beside_the_methods_row():
    jobs = bench.plan(["han", "baseline"], [0, 1], bench.QUICK, ablations=[])
    assert [j.name for j in jobs] == [  # the methods' own rows seed by seed, the extras after them
        "han-s0", "baseline-s0", "han-s1", "baseline-s1", "han-paper-sgd-s0", "han-paper-sgd-s1"
    ]  # fmt: skip
    sgd = [j for j in jobs if j.row == "han, paper SGD"]
    assert all(j.method == "han" and "frozen_optimizer=sgd" in j.sets and not j.two_stage for j in sgd)
    main = next(j for j in jobs if j.name == "han-s0")
    assert main.two_stage and not any(kv.startswith("frozen_") for kv in main.sets)  # the defaults
    assert bench.plan(["baseline"], [0], bench.QUICK, ablations=[])[0].name == "baseline-s0"
    table = [j for j in bench.plan(["han"], [0], bench.QUICK, ablations=["han"]) if j.table == "han"]
    assert table[0].name == "han-s0"  # HAN's table ablates the method's own row
    assert all(j.sets[: len(table[0].sets)] == table[0].sets for j in table)
    assert bench.slug("global + relation") == "global-relation"


def test_a_kept_result_of_other_options_is_refused_not_reused(tmp_path):
    job = bench.Job(
        "han-adam-s0", "han-adam-s0", "han", ["optimizer=adam", "stage1_lr=5e-4"], 0, "methods", "x"
    )
    kept = tmp_path / "results" / "han-adam-s0.json"
    kept.parent.mkdir()
    kept.write_text(json.dumps({"set": job.sets, "eval": [], "t2i": {"R@1": 9.0}}))
    assert bench.kept_result(kept, job)["t2i"]["R@1"] == 9.0
    kept.write_text(json.dumps({"set": ["optimizer=adam"], "eval": [], "t2i": {"R@1": 9.0}}))
    with pytest.raises(SystemExit, match="stage1_lr=5e-4.*runs/han-adam-s0"):
        bench.kept_result(kept, job)
    kept.write_text(json.dumps({"set": job.sets, "eval": [], "t2i": {"R@1": 9.0}}))
    evaluated_otherwise = bench.Job(job.name, job.run, "han", job.sets, 0, "han", "x", ["--rerank", "none"])
    with pytest.raises(SystemExit, match="--rerank"):
        bench.kept_result(kept, evaluated_otherwise)
