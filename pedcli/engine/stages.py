"""What a `Stage` means for the optimiser: which parameters learn, at which rate, on which schedule.

The schedule is a per-step cosine decay from the stage's learning rate to 1% of it (SGDR-style: every
stage restarts at its own rate). PMA gives no schedule ("stop training when the loss converges"); cosine
needs no extra knobs and ends each stage at a small rate, so the last epoch is the settled one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pedcli.models.methods.base import Method, Stage

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


def build_optimizer(trainable: list[tuple[str, nn.Parameter]], stage: Stage) -> torch.optim.Adam:
    """Adam (the papers' optimiser) with one parameter group per learning-rate multiplier."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in trainable:
        groups.setdefault(stage.lr_mult.get(name.split(".")[0], 1.0), []).append(p)
    return torch.optim.Adam(
        [{"params": ps, "lr": stage.lr * mult} for mult, ps in sorted(groups.items())],
        lr=stage.lr,
        weight_decay=stage.weight_decay,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine from 1 to MIN_LR_FACTOR of each group's rate over `total_steps` optimiser steps."""
    total = max(1, total_steps)

    def factor(step: int) -> float:
        return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
