"""What a `Stage` means for the optimiser: which parameters learn, with which optimiser, at which rate,
on which schedule; and from which stage on every parameter of the test score has learned or starts
pretrained (the guard against a schedule where it never does).

Schedules are per optimiser step: "cosine" decays from the stage's rate to 1% of it (every stage
restarts at its own rate), "step" multiplies it by `gamma` after each milestone epoch, "constant" keeps
it; `warmup_epochs` first ramps it linearly from 1%.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pedcli.errors import PedError
from pedcli.models.methods.base import Batch, Method, Stage

MIN_LR_FACTOR = 0.01


def set_trainable(method: Method, stage: Stage) -> list[tuple[str, nn.Parameter]]:
    """requires_grad on exactly the stage's parameters; returns them (name, parameter)."""
    trainable = list(method.trainable_parameters(stage))
    keep = {id(p) for _, p in trainable}
    for p in method.parameters():
        p.requires_grad_(id(p) in keep)
    return trainable


def frozen_children(method: Method) -> list[nn.Module]:
    """Top-level submodules with parameters, none of which learn (e.g. the trunk of a frozen stage)."""
    out = []
    for child in method.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(child)
    return out


def train_mode(method: Method) -> None:
    """`train()` for the learning parts, `eval()` for the frozen ones: frozen BatchNorm keeps its
    ImageNet statistics instead of drifting with (and then disagreeing with) the cached trunk outputs."""
    method.train()
    for child in frozen_children(method):
        child.eval()


def build_optimizer(trainable: list[tuple[str, nn.Parameter]], stage: Stage) -> torch.optim.Optimizer:
    """The stage's optimiser (Adam, or SGD with momentum) with one parameter group per rate multiplier."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in trainable:
        groups.setdefault(stage.lr_mult.get(name.split(".")[0], 1.0), []).append(p)
    params = [{"params": ps, "lr": stage.lr * mult} for mult, ps in sorted(groups.items())]
    if stage.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=stage.lr,
            momentum=stage.momentum,
            nesterov=stage.nesterov,
            weight_decay=stage.weight_decay,
        )
    return torch.optim.Adam(params, lr=stage.lr, weight_decay=stage.weight_decay)


def lr_factor(stage: Stage, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of each group's rate after `step` optimiser steps of the stage."""
    per_epoch = max(1, steps_per_epoch)
    warmup = round(stage.warmup_epochs * per_epoch)
    total = max(1, stage.epochs * per_epoch - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * step / warmup
        if stage.scheduler == "step":
            epoch = step // per_epoch
            return stage.gamma ** sum(epoch >= m for m in stage.milestones)
        if stage.scheduler == "cosine":
            t = min(step - warmup, total) / total
            return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, stage: Stage, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The stage's schedule (see `lr_factor`), stepped once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(stage, steps_per_epoch))


def score_parameters(method: Method, batch: Batch) -> set[str]:
    """Names of the parameters the test score depends on: those autograd reaches from the scores of
    `batch`'s captions against its images (through `encode_texts`, `encode_images`, `similarity`)."""
    params = dict(method.named_parameters())
    was_training = method.training
    flags = {n: p.requires_grad for n, p in params.items()}
    method.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            image = method.encode_images({k: v for k, v in batch.items() if k != "trunk"})
            scores = method.similarity(method.encode_texts(batch), image)
            grads = torch.autograd.grad(scores.float().sum(), list(params.values()), allow_unused=True)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        method.train(was_training)
    return {n for n, g in zip(params, grads, strict=True) if g is not None}


def complete_stage(method: Method, stages: list[Stage], batch: Batch) -> int:
    """The index of the first stage by whose first epoch every parameter of the test score has learned or
    starts pretrained. A checkpoint from before it scores with random weights in part of its score (MIA's
    BFM MLPs before step 3), so it is not the paper's model and not a candidate for `best.pt`. Refuses a
    schedule that leaves part of the test score at its random initialisation in every stage."""
    needed = score_parameters(method, batch)
    covered = method.parameter_names(method.pretrained_modules())
    for index, stage in enumerate(stages):
        if stage.epochs > 0:
            covered |= {n for n, _ in method.trainable_parameters(stage)}
        if needed <= covered:
            return index
    untrained = sorted(needed - covered)
    more = f" and {len(untrained) - 12} more" if len(untrained) > 12 else ""
    raise PedError(
        f"{method.name}: the test score depends on parameters that no stage trains and that are not "
        f"pretrained: {', '.join(untrained[:12])}{more}",
        "change the method options so a stage's losses reach them (see `ped methods`), "
        "or give that stage epochs",
    )
