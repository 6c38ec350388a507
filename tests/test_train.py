"""Training engine: learning, run folders, resume, DDP, frozen-trunk cache, options, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_BASELINE, tiny_train
from typer.testing import CliRunner

from pedcli.cli import app
from pedcli.cli_options import parse_assignments
from pedcli.data import cache as cache_mod
from pedcli.data.dataset import CaptionDataset, collate, data_info
from pedcli.engine import train as train_mod
from pedcli.engine.batching import LoaderOptions
from pedcli.engine.distributed import DistContext
from pedcli.engine.runs import checkpoint_path, load_checkpoint, load_run
from pedcli.engine.stages import complete_stage, set_trainable, train_mode
from pedcli.engine.train import TrainOptions, train
from pedcli.engine.trunk_cache import open_trunk_cache, trunk_key
from pedcli.errors import PedError
from pedcli.models.methods import TrainConfig, create_method
from pedcli.models.methods.base import method_class
from pedcli.models.methods.baseline import BaselineConfig

TIME_KEYS = ("train_time_s", "val_time_s", "samples_per_s", "trunk_cache_s")


def _metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS} for line in lines]


# ---- learning on the synthetic benchmark ------------------------------------------------------------
@pytest.mark.slow
def test_baseline_keeps_the_best_val_epoch(synth_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    method_options = TINY_BASELINE | {
        "embed_dim": 64,
        "hidden": 64,
        "word_dim": 64,
        "frozen_epochs": 20,
        "frozen_lr": 3e-3,
        "full_epochs": 0,
    }
    result = train(
        "baseline",
        synth_cache,
        run,
        method_options=method_options,
        options={"batch_size": 16},
        seed=0,
        progress=False,
    )
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.5 * losses[0]

    val = [(r["val"]["R@1"], r["val"]["mAP"]) for r in result.history]
    best_epoch = max(range(len(val)), key=lambda i: (*val[i], -i)) + 1  # ties on R@1 go to mAP
    assert result.best["epoch"] == best_epoch
    assert load_checkpoint(checkpoint_path(run, "best"))["epoch"] == best_epoch

    method, config = load_run(run)  # best.pt, eval mode (what it retrieves: tests/test_learning.py)
    assert not method.training and config["method"] == "baseline"


def test_a_val_r1_tie_goes_to_the_higher_map() -> None:
    best = {"metric": "val_t2i_R@1", "value": 20.0, "mAP": 15.0, "epoch": 3}
    assert train_mod._beats(20.0, 15.5, best)  # same R@1, higher mAP
    assert not train_mod._beats(20.0, 15.0, best)  # a full tie keeps the earlier epoch
    assert not train_mod._beats(20.0, 14.0, best)
    assert not train_mod._beats(19.9, 40.0, best)  # R@1 first
    assert train_mod._beats(20.1, 1.0, best)
    assert not train_mod._beats(20.0, 99.0, {"metric": "val_t2i_R@1", "value": 20.0, "epoch": 3})


def test_best_is_never_an_epoch_before_the_whole_score_has_learned(tiny_cache: Path, tmp_path: Path) -> None:
    """MIA's fused score includes the BFM MLPs, which only step 3 trains: a step-1 epoch scores with them
    at random, so however its val R@1 compares, it is not the paper's model and not a best.pt."""
    mia = {"embed_dim": 8, "hidden": 6, "word_dim": 5, "mlp_hidden": 7, "step1_objectives": "id+mat",
           "step1_epochs": 2, "step2_epochs": 0, "step3_epochs": 1}  # fmt: skip
    batch = collate([CaptionDataset(tiny_cache, "train")[i] for i in range(2)])
    info = data_info(tiny_cache)
    model = create_method("mia", info, mia)
    stages = model.stages()
    assert stages[complete_stage(model, stages, batch)].name == "step3"
    baseline = create_method("baseline", info, TINY_BASELINE)
    assert complete_stage(baseline, baseline.stages(), batch) == 0  # its first stage trains the whole score

    result = train("mia", tiny_cache, tmp_path / "run", method_options=mia, options={"batch_size": 8},
                   seed=1, progress=False)  # fmt: skip
    picked = [(r["stage"], r["best"]) for r in _metrics(tmp_path / "run")]
    assert picked == [("step1", False), ("step1", False), ("step3", True)]
    assert result.best["epoch"] == 3
    assert load_checkpoint(checkpoint_path(tmp_path / "run", "best"))["epoch"] == 3
    checkpoint_path(tmp_path / "run", "best").unlink()  # as a run stopped in step 1 leaves it
    with pytest.raises(PedError, match="no best checkpoint yet") as err:
        load_run(tmp_path / "run")
    assert "--resume" in str(err.value) and "--checkpoint last" in str(err.value)
    assert load_run(tmp_path / "run", "last")[1]["method"] == "mia"


# ---- run folders, resume ----------------------------------------------------------------------------
class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def reference_run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2 + 2 epoch run (frozen trunk, then everything) on the tiny cache."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("ref") / "run"
    tiny_train(tiny_cache, run)
    return run


def test_run_folder_layout(reference_run: Path) -> None:
    config = json.loads((reference_run / "config.json").read_text())
    assert config["method_config"] == json.loads(json.dumps(BaselineConfig(**TINY_BASELINE).__dict__))
    assert config["train"]["epochs"] == 2 and config["seed"] == 3
    assert [s["freeze_trunk"] for s in config["stages"]] == [True, False]
    assert json.loads((reference_run / "vocab.json").read_text())[:2] == ["<pad>", "<unk>"]
    records = _metrics(reference_run)
    assert [(r["stage"], r["stage_epoch"]) for r in records] == [
        ("frozen_cnn", 1),
        ("frozen_cnn", 2),
        ("all", 1),
        ("all", 2),
    ]
    assert all("R@1" in r["val"] for r in records)
    assert not (reference_run / "trunk_cache").exists()  # removed when its stage ended


# Two stages on the frozen CNN with one trunk: an uninterrupted run drops the first stage's trunk cache and
# fills the second's afresh (the fill draws from the RNG); a run resumed between them must do the same,
# not reuse the first stage's cache left on disk.
TINY_HAN_FROZEN = {"embed_dim": 32, "word_dim": 16, "hidden": 16, "attention_dim": 16,
                   "channel_reduction": 8, "stage1_freeze_trunk": True, "stage1_epochs": 2,
                   "stage2_frozen_epochs": 2, "stage2_epochs": 0}  # fmt: skip


def tiny_train_method(method: str, cache: Path, run: Path) -> None:
    if method == "baseline":
        tiny_train(cache, run)
    else:
        train(method, cache, run, method_options=TINY_HAN_FROZEN, options={"batch_size": 8}, seed=3,
              progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def reference_han_run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted HAN run of two stages on the frozen CNN (2 + 2 epochs)."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("ref_han") / "run"
    tiny_train_method("han", tiny_cache, run)
    return run


@pytest.mark.parametrize(
    ("method", "stop_after"),
    # inside the frozen stage (trunk cache reused), at its end, inside stage 2; between two frozen stages
    [("baseline", 1), ("baseline", 2), ("baseline", 3), ("han", 2)],
)
def test_resume_gives_the_uninterrupted_result(
    tiny_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    method: str,
    stop_after: int,
) -> None:
    reference = request.getfixturevalue("reference_run" if method == "baseline" else "reference_han_run")
    save = train_mod._Trainer._save

    def save_then_stop(self, record, state, *args):
        save(self, record, state, *args)
        if state.epoch == stop_after:
            raise _Interrupt

    vocab_calls: list[list[str]] = []  # the pretrained start is for a new run only: resume loads it trained
    run = tmp_path / "run"
    monkeypatch.setattr(train_mod._Trainer, "_save", save_then_stop)

    def record_vocab(self, words: list[str]) -> None:
        vocab_calls.append(words)

    monkeypatch.setattr(method_class(method), "init_from_vocab", record_vocab)
    with pytest.raises(_Interrupt):
        tiny_train_method(method, tiny_cache, run)
    assert vocab_calls == [json.loads((run / "vocab.json").read_text())]
    assert len(_metrics(run)) == stop_after

    monkeypatch.setattr(train_mod._Trainer, "_save", save)
    train(None, None, run, resume=True, progress=False)
    assert len(vocab_calls) == 1
    assert _metrics(run) == _metrics(reference)
    ours = load_checkpoint(checkpoint_path(run, "last"))["model"]
    ref = load_checkpoint(checkpoint_path(reference, "last"))["model"]
    for name, tensor in ref.items():  # bit for bit
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)


def test_refuses_to_overwrite_and_to_change_a_resumed_config(tiny_cache: Path, reference_run: Path) -> None:
    with pytest.raises(PedError, match="already exists") as err:
        tiny_train(tiny_cache, reference_run)
    assert "--resume" in err.value.hint
    with pytest.raises(PedError, match="lr: saved None, given 0.5"):
        train(None, None, reference_run, options={"lr": 0.5}, resume=True, progress=False)
    with pytest.raises(PedError, match="no config.json"):
        train(None, None, reference_run.parent / "never", resume=True, progress=False)


def test_load_run_accepts_a_checkpoint_file(reference_run: Path) -> None:
    method, _ = load_run(checkpoint_path(reference_run, "last"))
    state = load_checkpoint(checkpoint_path(reference_run, "last"))["model"]
    torch.testing.assert_close(method.state_dict()["image_fc.weight"], state["image_fc.weight"])
    with pytest.raises(PedError, match="no run folder"):
        load_run(reference_run / "missing")


# ---- distributed ------------------------------------------------------------------------------------
DDP_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
from pedcli.engine.train import train
train("baseline", sys.argv[1], sys.argv[2], method_options={tiny}, seed=3, progress=False,
      options={{"epochs": 1, "batch_size": 8, "flip_prob": 0.0, "accum_steps": int(sys.argv[3])}})
"""


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(tiny_cache: Path, tmp_path: Path) -> None:
    """2 ranks × batch B == 1 process accumulating 2 batches of B (same batches, averaged gradients)."""
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tiny=TINY_BASELINE))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*two, str(script), str(tiny_cache), str(tmp_path / "ddp"), "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    subprocess.run(
        [sys.executable, str(script), str(tiny_cache), str(tmp_path / "one"), "2"],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    ddp, one = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "one")
    assert [r["samples"] for r in ddp] == [r["samples"] for r in one]
    for a, b in zip(ddp, one, strict=True):
        for name in a["losses"]:
            assert a["losses"][name] == pytest.approx(b["losses"][name], rel=1e-4)
    # frozen stage: BatchNorm in eval mode, so validation sees identical weights
    assert ddp[0]["val"] == pytest.approx(one[0]["val"], abs=1e-3)


# ---- frozen-trunk cache -----------------------------------------------------------------------------
def test_trunk_cache_gives_the_losses_of_the_live_trunk(tiny_cache: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    method = create_method("baseline", data_info(tiny_cache), TINY_BASELINE)
    stage = method.stages(TrainConfig())[0]
    assert stage.freeze_trunk
    set_trainable(method, stage)
    train_mode(method)
    assert not method.backbone.training and method.text.training  # frozen BatchNorm keeps ImageNet stats

    ctx = DistContext()
    key = trunk_key(method, "h", "train", [False, True], ctx.device)
    cache = open_trunk_cache(method, tiny_cache, "train", [False, True], tmp_path, key, ctx, LoaderOptions(4))
    assert method.text.training and not method.backbone.training  # building it restores every mode

    ds = CaptionDataset(tiny_cache, "train", flip_prob=0.5)
    batch = collate([ds[i] for i in range(8)])
    assert batch["flip"].any() and not batch["flip"].all()
    live = method.losses(batch, stage)
    cached_batch = {k: v for k, v in batch.items() if k != "image"}
    cached_batch["trunk"] = cache.lookup(batch["image_index"], batch["flip"])
    cached = method.losses(cached_batch, stage)
    for name in stage.losses:
        torch.testing.assert_close(cached[name], live[name], rtol=1e-5, atol=1e-6)

    method.image_fc.weight.data += 1.0  # a trainable layer changes: same key; the trunk changes: new key
    assert trunk_key(method, "h", "train", [False, True], ctx.device) == key
    method.backbone.stages[0][0][0].weight.data += 1.0
    assert trunk_key(method, "h", "train", [False, True], ctx.device) != key


def test_baseline_ablation_switches(tiny_cache: Path) -> None:
    """Base-LSTM (forward state only) and no identity loss: PMA Table 2 / loss ablations."""
    method = create_method(
        "baseline", data_info(tiny_cache), TINY_BASELINE | {"bidirectional": False, "id_weight": 0.0}
    )
    stages = method.stages(TrainConfig(epochs=1, lr=0.01))
    assert [(s.epochs, s.lr, s.losses) for s in stages] == [(1, 0.01, ("ranking",))] * 2
    batch = collate([CaptionDataset(tiny_cache, "train")[i] for i in range(8)])
    assert method.text_fc.in_features == TINY_BASELINE["hidden"]
    assert set(method.losses(batch, stages[0])) == {"ranking"}


# ---- options and CLI --------------------------------------------------------------------------------
def test_set_options_are_typed_and_checked() -> None:
    method, engine = parse_assignments(
        ["embed_dim=64", "margin=0.3", "bidirectional=false", "backbone=resnet50", "train.accum_steps=2"],
        BaselineConfig,
        TrainOptions,
    )
    assert method == {"embed_dim": 64, "margin": 0.3, "bidirectional": False, "backbone": "resnet50"}
    assert engine == {"accum_steps": 2}
    _, engine = parse_assignments(["train.lr=none", "train.epochs=3"], BaselineConfig, TrainOptions)
    assert engine == {"lr": None, "epochs": 3}
    for bad, message in (
        ("embed=1", "no such method option"),
        ("embed_dim=x", "not a valid int"),
        ("train.nope=1", "no such train option"),
        ("embed_dim", "KEY=VALUE"),
    ):
        with pytest.raises(PedError, match=message):
            parse_assignments([bad], BaselineConfig, TrainOptions)


def test_cli_trains_lists_and_refuses_overwrite(tiny_cache: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    run = tmp_path / "run"
    args = [
        "train",
        "--method",
        "baseline",
        "--cache",
        str(tiny_cache),
        "--run",
        str(run),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--quiet",
        "--set",
        "embed_dim=32",
        "--set",
        "hidden=16",
    ]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert json.loads((run / "config.json").read_text())["method_config"]["embed_dim"] == 32
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in " ".join(again.output.split())  # rich wraps lines
    listing = runner.invoke(app, ["methods", "baseline"])
    assert listing.exit_code == 0 and "frozen_lr" in listing.output and "accum_steps" in listing.output


def test_a_training_opens_its_cache_once(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache is opened once and passed along (config, probe, datasets, validation, trunk cache), not
    reopened by every step that reads it."""
    reads: list[Path] = []
    read_meta = cache_mod._read_meta
    monkeypatch.setattr(cache_mod, "_read_meta", lambda root: reads.append(root) or read_meta(root))
    run = tmp_path / "run"
    tiny_train(tiny_cache, run, epochs=1)
    assert reads == [tiny_cache]
    train(None, None, run, resume=True, progress=False)  # finished: nothing left to train
    assert reads == [tiny_cache, tiny_cache.resolve()]
