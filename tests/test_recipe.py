"""Each paper's training recipe as the engine builds it: stage overrides, optimisers, schedules, batch
sizes, augmentation, the trainable set declared by module, and the guard that every parameter of the
test score learns in some stage or starts pretrained."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_BASELINE, tiny_train
from method_batch import TINY_INFO, tiny_batch
from torch import nn
from typer.testing import CliRunner

from pedcli.cli import app
from pedcli.data.dataset import CaptionDataset, collate
from pedcli.engine import augment
from pedcli.engine.stages import (
    build_optimizer,
    build_scheduler,
    complete_stage,
    set_trainable,
)
from pedcli.engine.train import train
from pedcli.errors import PedError
from pedcli.models.methods import DataInfo, Stage, TrainConfig, create_method, list_methods, method_class
from pedcli.models.methods.base import apply_overrides

# tiny widths per method (the tiny cache: 32×16 images, 20 words, 4 train identities, BERT ids)
TINY_OPTIONS: dict[str, dict] = {
    "baseline": {**TINY_BASELINE, "pretrained": "none"},
    "han": {"pretrained": "none", "embed_dim": 8, "word_dim": 6, "hidden": 5, "attention_dim": 4,
            "channel_reduction": 8},
    "mgel": {"pretrained": "none", "embed_dim": 8, "word_dim": 6, "channel_reduction": 4,
             "granularities": (1, 2)},
    "mia": {"pretrained": "none", "embed_dim": 8, "hidden": 6, "word_dim": 5, "mlp_hidden": 7},
    "nafs": {"pretrained": "none", "bert_random_init": True, "bert_layers": 1, "bert_hidden": 32,
             "embed_dim": 16},
    "pma": {"pretrained": "none", "embed_dim": 8, "hidden": 6, "word_dim": 5, "pose_widths": [4, 4, 4, 4]},
}  # fmt: skip
CACHE_INFO = DataInfo(num_classes=4, vocab_size=20, image_size=(32, 16))
# the project's methods (test modules may register toy methods of their own)
METHODS = [n for n in list_methods() if method_class(n).__module__.startswith("pedcli.models.methods.")]


def stage(**kw) -> Stage:
    return Stage(**({"name": "s", "epochs": 4, "lr": 0.1, "losses": ("x",)} | kw))


# ---- overrides and batch sizes ---------------------------------------------------------------------------
def test_overrides_apply_once_and_zero_counts_as_given() -> None:
    stages = [stage(epochs=5, lr=1e-3, batch_size=96), stage(epochs=7, lr=2e-4, batch_size=96)]
    assert apply_overrides(stages, TrainConfig()) == stages
    out = apply_overrides(stages, TrainConfig(epochs=1, lr=0.0, batch_size=8))
    assert [(s.epochs, s.lr, s.batch_size) for s in out] == [(1, 0.0, 8), (1, 0.0, 8)]


@pytest.mark.parametrize(
    ("name", "batch"), [("pma", 128), ("mgel", 32), ("mia", 96), ("han", 64), ("nafs", 64)]
)
def test_each_method_declares_its_papers_batch_size(name: str, batch: int) -> None:
    m = create_method(name, TINY_INFO, TINY_OPTIONS[name])
    assert {s.batch_size for s in m.stages()} == {batch}
    assert {s.batch_size for s in m.stages(TrainConfig(batch_size=12))} == {12}
    assert all(s.lr == 0 for s in m.stages(TrainConfig(lr=0.0)))  # `--lr 0` is not "unset"


def test_papers_optimisers_and_schedules() -> None:
    han1, han2 = create_method("han", TINY_INFO, TINY_OPTIONS["han"]).stages()
    assert (han1.optimizer, han1.momentum, han2.optimizer, han2.momentum) == ("sgd", 0.5, "sgd", 0.9)
    assert han1.scheduler == han2.scheduler == "step"
    step1, step2, step3 = create_method("mia", TINY_INFO, TINY_OPTIONS["mia"]).stages()
    assert step1.optimizer == step2.optimizer == "adam"
    assert (step2.scheduler, step2.milestones, step2.gamma) == ("step", (10,), 0.1)  # ÷10 every 10 epochs
    assert step1.scheduler == step3.scheduler == "constant"
    assert {s.optimizer for s in create_method("pma", TINY_INFO, TINY_OPTIONS["pma"]).stages()} == {"adam"}
    (joint,) = create_method("mgel", TINY_INFO, TINY_OPTIONS["mgel"]).stages()
    assert (joint.optimizer, joint.lr, joint.epochs) == ("adam", 2e-4, 50)


# ---- optimiser and schedule --------------------------------------------------------------------------
def _lrs(s: Stage, steps_per_epoch: int) -> list[float]:
    opt = build_optimizer([("w", nn.Parameter(torch.zeros(1)))], s)
    sched = build_scheduler(opt, s, steps_per_epoch)
    out = []
    for _ in range(s.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_sgd_has_the_stages_momentum_and_nesterov_flag() -> None:
    opt = build_optimizer(
        [("w", nn.Parameter(torch.zeros(1)))], stage(optimizer="sgd", momentum=0.5, nesterov=True)
    )
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.5 and opt.param_groups[0]["nesterov"]
    assert isinstance(build_optimizer([("w", nn.Parameter(torch.zeros(1)))], stage()), torch.optim.Adam)


def test_step_schedule_divides_at_each_milestone() -> None:
    lrs = _lrs(stage(epochs=5, scheduler="step", milestones=(2, 4), gamma=0.1), steps_per_epoch=3)
    assert lrs == pytest.approx([0.1] * 6 + [0.01] * 6 + [0.001] * 3)


def test_constant_cosine_and_warmup() -> None:
    assert _lrs(stage(scheduler="constant"), 2) == pytest.approx([0.1] * 8)
    cosine = _lrs(stage(epochs=2), 4)
    assert cosine[0] == pytest.approx(0.1) and all(a > b for a, b in zip(cosine, cosine[1:], strict=False))
    assert cosine[4] == pytest.approx(0.1 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 2))))
    warm = _lrs(stage(epochs=3, scheduler="constant", warmup_epochs=1), 4)
    assert warm[0] == pytest.approx(0.001) and warm[:4] == sorted(warm[:4]) and warm[4:] == [0.1] * 8


def test_a_stage_refuses_an_unknown_optimizer() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        stage(optimizer="rmsprop")


# ---- trainable set, declared by module -----------------------------------------------------------------
def test_freeze_trunk_and_frozen_take_modules_out() -> None:
    m = create_method("han", TINY_INFO, TINY_OPTIONS["han"])
    names = {n for n, _ in m.trainable_parameters(stage(freeze_trunk=True, frozen=("text_encoder",)))}
    assert names and not any(n.startswith(("backbone.", "text_encoder.")) for n in names)
    assert any(n.startswith("fc2.") for n in names)
    with pytest.raises(ValueError, match="no submodule or parameter 'nope'"):
        list(m.trainable_parameters(stage(trainable=("nope",))))


@pytest.mark.parametrize("frozen_epochs", [0, 2])
def test_nafs_bert_trainable_false_keeps_bert_out_of_the_optimiser(frozen_epochs: int) -> None:
    m = create_method("nafs", TINY_INFO, TINY_OPTIONS["nafs"] | {"bert_trainable": False,
                                                                 "frozen_epochs": frozen_epochs})  # fmt: skip
    bert = {id(p) for p in m.text.bert.parameters()}
    for s in m.stages():
        opt = build_optimizer(set_trainable(m, s), s)
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        assert in_opt and not in_opt & bert
        assert not any(p.requires_grad for p in m.text.bert.parameters())
    on = create_method("nafs", TINY_INFO, TINY_OPTIONS["nafs"])
    learning = {id(p) for _, p in set_trainable(on, on.stages()[-1])}
    assert {id(p) for p in on.text.bert.parameters()} <= learning


# ---- augmentation ---------------------------------------------------------------------------------------
def test_augmented_batch_differs_and_keeps_shape_and_dtype() -> None:
    batch = tiny_batch()
    batch["pose"] = torch.rand(6, 14, 8, 4)
    out = augment.augment_batch(batch, ("flip", "crop", "erase"), crop_pad=16, erase_prob=1.0, seed=0)
    for key in ("image", "pose"):
        assert out[key].shape == batch[key].shape and out[key].dtype == batch[key].dtype
    assert not torch.equal(out["image"], batch["image"]) and not torch.equal(out["pose"], batch["pose"])
    same = augment.augment_batch(batch, ("flip", "crop", "erase"), crop_pad=16, erase_prob=1.0, seed=0)
    assert torch.equal(same["image"], out["image"])  # a function of the seed alone
    assert torch.equal(augment.augment_batch(batch, ("flip",), 4, 1.0, seed=0)["image"], batch["image"])


def test_crop_shifts_image_and_pose_together() -> None:
    image = torch.zeros(64, 1, 32, 16)
    image[:, 0, 16, 8] = 1.0
    pose = torch.zeros(64, 1, 8, 4)
    pose[:, 0, 4, 2] = 1.0
    torch.manual_seed(3)
    shifted, shifted_pose = augment.random_shift(image, 4, pose)
    moves = set()
    for img, p in zip(shifted, shifted_pose, strict=True):
        (y, x), (py, px) = img[0].nonzero()[0].tolist(), p[0].nonzero()[0].tolist()
        assert abs((y - 16) / 4 - (py - 4)) <= 0.5 and abs((x - 8) / 4 - (px - 2)) <= 0.5  # 1/4 resolution
        moves.add((y - 16, x - 8))
    assert len(moves) > 10 and all(abs(dy) <= 4 and abs(dx) <= 4 for dy, dx in moves)


def test_a_frozen_trunk_stage_never_crops(tiny_cache: Path, tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple[int, ...]] = []
    shift = augment.random_shift

    def counting(images, pad, pose=None):
        calls.append(tuple(images.shape))
        return shift(images, pad, pose)

    monkeypatch.setattr(augment, "random_shift", counting)
    frozen_only = TINY_BASELINE | {"frozen_epochs": 1, "full_epochs": 0}  # ImageNet trunk: pretrained
    train("baseline", tiny_cache, tmp_path / "frozen", method_options=frozen_only, options={"batch_size": 4},
          progress=False)  # fmt: skip
    assert calls == []
    tiny_train(tiny_cache, tmp_path / "both", epochs=1, batch_size=4)
    assert calls and all(shape[1:] == (3, 32, 16) for shape in calls)


# ---- the guard: every parameter of the test score learns or is pretrained ------------------------------
def cache_batch(cache: Path) -> dict:
    ds = CaptionDataset(cache, "train")
    return collate([ds[i] for i in range(2)])


def presets(name: str) -> list[dict]:
    """The method's defaults and each boolean option flipped alone (the ablation switches)."""
    cls = method_class(name)
    out = [{}]
    for f in dataclasses.fields(cls.Config):
        if f.type in ("bool", bool):
            out.append({f.name: not f.default})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_every_preset_trains_every_parameter_of_its_score(name: str, tiny_cache: Path) -> None:
    batch = cache_batch(tiny_cache)
    checked = 0
    for preset in presets(name):
        try:
            m = create_method(name, CACHE_INFO, TINY_OPTIONS[name] | preset)
            stages = m.stages()
        except PedError:  # a preset its config refuses with a clear error (e.g. no loss left)
            continue
        # tiny widths are built without weights; the guard judges them as the defaults would run:
        # ImageNet trunk, pretrained BERT
        m.cfg.pretrained = "imagenet"
        if name == "nafs":
            m.cfg.bert_random_init = False
        complete_stage(m, stages, batch)
        checked += 1
    assert checked
    assert set(METHODS) == set(TINY_OPTIONS)  # a new method adds its tiny widths here


def test_the_guard_names_untrained_parameters(tiny_cache: Path, tmp_path: Path) -> None:
    batch = cache_batch(tiny_cache)
    m = create_method("baseline", CACHE_INFO, TINY_OPTIONS["baseline"] | {"full_epochs": 0})
    with pytest.raises(PedError, match=r"backbone\.stages\.0") as err:
        complete_stage(m, m.stages(), batch)
    assert "image_fc" not in str(err.value)  # the frozen stage trains it
    pretrained = create_method("baseline", CACHE_INFO, TINY_OPTIONS["baseline"] | {"full_epochs": 0})
    pretrained.cfg.pretrained = "imagenet"  # the trunk counts as pretrained (no weights needed to check)
    complete_stage(pretrained, pretrained.stages(), batch)
    with pytest.raises(PedError, match="no stage trains"):
        tiny_train(tiny_cache, tmp_path / "run", epochs=0)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_ped_methods_lists_the_recipe_options() -> None:
    result = CliRunner().invoke(app, ["methods", "han"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in ("optimizer", "channel_relu", "stage1_decay_epoch", "augment", "crop_pad", "erase_prob"):
        assert option in result.output
