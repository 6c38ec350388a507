"""`ped train`: run a method's stage schedule on a cache, into a run folder (layout in `runs.py`).

The method's `stages()` drive everything — which parameters learn, the losses, the optimiser, learning
rates and schedule, epochs, batch size, whether the CNN trunk is frozen (its outputs are then cached on
disk once, see `trunk_cache.py`) — so this loop never asks which method it trains. Before the first
step it refuses a schedule that leaves a parameter of the test score untrained and not pretrained.
Stages whose CNN learns see pad-and-crop and random erasing on top of the dataset's flips (`augment.py`).
Each epoch ends with a validation pass on the val split (R@1 text → image, ties broken by mAP, picks
`best.pt`, among the epochs from the first stage by which every parameter of the test score has learned:
`complete_stage`; the test split is never looked at) and a `last.pt` checkpoint holding everything
`--resume` needs: data order, flips and augmentation are functions of (seed, epoch), and the RNG,
optimiser and scheduler states are restored, so an interrupted and resumed run ends with the same weights.

Under `torchrun` every rank trains on its share of the identity-balanced batches (DDP, gloo on CPU,
nccl on CUDA); only rank 0 writes. N ranks × batch B is the same optimisation as one process with
`accum_steps = N` × batch B. From the shell (the `--` keeps torchrun from reading `--run` as its own
`--run-path`):

    torchrun --standalone --nproc_per_node 2 $(which ped) -- train --method baseline --cache C --run R
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from pedcli.data.cache import Cache, load_cache_info
from pedcli.data.dataset import CaptionDataset, IdentityBalancedSampler, collate
from pedcli.engine import runs
from pedcli.engine.augment import AUGMENTATIONS, augment_batch
from pedcli.engine.batching import LoaderOptions, move_batch, precision
from pedcli.engine.distributed import DistContext, setup, teardown
from pedcli.engine.embed import encode_split
from pedcli.engine.retrieval.metrics import retrieval_metrics
from pedcli.engine.retrieval.scoring import score_matrix
from pedcli.engine.stages import (
    build_optimizer,
    build_scheduler,
    complete_stage,
    set_trainable,
    train_mode,
)
from pedcli.engine.trunk_cache import TrunkCache, open_trunk_cache, trunk_key
from pedcli.errors import PedError
from pedcli.fileio import atomic_path, check_writable, remove_stale_partials_in, write_json_atomic
from pedcli.logs import log_to
from pedcli.models.methods.base import Batch, Method, Stage, TrainConfig, create_method

log = logging.getLogger(__name__)
BEST_METRIC = "val_t2i_R@1"
TRUNK_DIR = "trunk_cache"


@dataclass
class TrainOptions(TrainConfig):
    """Engine options, saved as config.json "train". epochs / lr / batch_size (TrainConfig), when set,
    override every stage the method returns; the rest is how the engine runs them.

    instances_per_id: captions per identity in a batch (IdentityBalancedSampler's K).
    accum_steps: batches whose gradients add up before each optimiser step.
    flip_prob: horizontal flip of training images. workers: DataLoader worker processes.
    augment: the training augmentations on ("flip", "crop", "erase": IRRA's set, see `augment.py`); crop
    and erase apply only to stages whose CNN learns. crop_pad: pixels of the pad-and-random-crop.
    erase_prob: probability of random erasing per image.
    trunk_cache: cache the trunk outputs while a stage freezes it. amp: bf16 autocast (CUDA only).
    channels_last: NHWC convolutions (faster for MobileNetV2 on CPU and on tensor cores).
    eval_batch_size: batch size of the validation encoding.
    tensorboard: also write TensorBoard event files into the run folder (needs the tensorboard extra).
    """

    instances_per_id: int = 2
    accum_steps: int = 1
    flip_prob: float = 0.5
    augment: tuple[str, ...] = AUGMENTATIONS
    crop_pad: int = 10
    erase_prob: float = 0.5
    workers: int = 0
    trunk_cache: bool = True
    amp: bool = True
    channels_last: bool = True
    eval_batch_size: int = 128
    tensorboard: bool = False

    def __post_init__(self) -> None:
        self.augment = tuple(self.augment)  # a JSON config gives a list
        if (
            self.accum_steps < 1
            or self.workers < 0
            or (self.batch_size is not None and self.batch_size < 2)
            or not 0 <= self.flip_prob <= 1
            or not 0 <= self.erase_prob <= 1
            or self.crop_pad < 0
            or not set(self.augment) <= set(AUGMENTATIONS)
        ):
            raise PedError(
                f"invalid train options: accum_steps={self.accum_steps}, workers={self.workers}, "
                f"batch_size={self.batch_size}, flip_prob={self.flip_prob}, augment={self.augment}, "
                f"crop_pad={self.crop_pad}, erase_prob={self.erase_prob}",
                "accum_steps ≥ 1, workers ≥ 0, batch_size ≥ 2, 0 ≤ flip_prob ≤ 1, "
                f"augment ⊆ {AUGMENTATIONS}, crop_pad ≥ 0, 0 ≤ erase_prob ≤ 1",
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise PedError(
                f"unknown train option(s): {', '.join(unknown)}", f"valid: {', '.join(sorted(names))}"
            )
        return cls(**values)


@dataclass
class TrainResult:
    run_dir: Path
    best: dict[str, Any]
    history: list[dict[str, Any]]  # the metrics records of the epochs this call trained
    is_main: bool = True  # rank 0 (the one that writes and reports)


@dataclass
class _Progress:
    """Where training stands; what `last.pt` stores besides the states."""

    stage: int = 0  # index into the stage list
    stage_epoch: int = 0  # epochs completed in that stage
    epoch: int = 0  # epochs completed overall (1-based numbering in metrics)
    global_step: int = 0
    best: dict[str, Any] = dataclasses.field(default_factory=lambda: {"metric": BEST_METRIC, "value": None})


class _Objective(nn.Module):
    """`method.losses` as a forward pass, so DistributedDataParallel sees and synchronises it."""

    def __init__(self, method: Method, stage: Stage) -> None:
        super().__init__()
        self.method = method
        self.stage = stage

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        losses = self.method.losses(batch, self.stage)
        missing = [name for name in self.stage.losses if name not in losses]
        if missing:
            raise ValueError(f"{self.method.name}.losses gave no {missing} in stage '{self.stage.name}'")
        return losses


def train(
    method_name: str | None,
    cache: str | Path | None,
    run_dir: str | Path,
    *,
    method_options: dict[str, Any] | None = None,
    options: TrainOptions | dict[str, Any] | None = None,
    seed: int | None = None,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `method_name` on `cache` into the new folder `run_dir`, or continue it (`resume=True`).

    A new run needs `method_name` and `cache`; a resumed run takes both and every option from its
    config.json, and refuses arguments that contradict it. `options` given as a dict names only the
    options the caller sets. Launch under `torchrun` for multi-process training.
    """
    check_writable(run_dir, folder=True)  # an unwritable --run fails now, not at the first checkpoint
    ctx = setup(device)
    run_dir = Path(run_dir)
    try:
        # the log: rank 0 appends to RUN/train.log (and echoes it to stderr unless quiet)
        with (
            runs.running(run_dir, hold=ctx.is_main),
            log_to(rank=ctx.rank, console=progress, file=run_dir / runs.LOG),
        ):
            return _train(method_name, cache, run_dir, method_options, options, seed, resume, ctx, progress)
    finally:
        teardown(ctx)


def _train(
    method_name: str | None,
    cache: str | Path | None,
    run_dir: Path,
    method_options: dict[str, Any] | None,
    options: TrainOptions | dict[str, Any] | None,
    seed: int | None,
    resume: bool,
    ctx: DistContext,
    progress: bool,
) -> TrainResult:
    requested = asdict(options) if isinstance(options, TrainOptions) else dict(options or {})
    runs.check_run_dir(run_dir, resume)
    ctx.barrier()  # every rank has checked before rank 0 creates anything
    if resume:
        config = runs.resumed_config(run_dir, method_name, cache, method_options, requested, seed)
        data = load_cache_info(Path(config["cache"]))
    else:
        if method_name is None or cache is None:
            raise PedError(
                "a new run needs --method and --cache", "e.g. ped train --method baseline --cache C --run R"
            )
        resolved = asdict(TrainOptions.from_dict(requested))
        seed = 0 if seed is None else seed
        data = load_cache_info(cache)
        config = runs.new_config(method_name, data, method_options, resolved, seed)
    # `data`, the cache opened once (meta, splits, vocabulary), is what every step below reads
    opts = TrainOptions.from_dict(config["train"])
    if opts.tensorboard and ctx.is_main:
        runs.check_tensorboard()
    _seed_everything(config["seed"])
    method = create_method(config["method"], runs.data_info_from_config(config), config["method_config"])
    if not resume:  # a resumed run's checkpoint holds them, trained
        method.init_from_vocab(data.vocab)
    stages = method.stages(opts)
    complete = complete_stage(method, stages, _probe_batch(data))  # refuses before any file is written
    state = _Progress()
    ckpt: dict[str, Any] | None = None
    if resume:
        if ctx.is_main:  # what a killed checkpoint save left
            remove_stale_partials_in(runs.checkpoint_path(run_dir, "last").parent)
        ckpt = runs.load_checkpoint(runs.checkpoint_path(run_dir, "last"))
        method.load_state_dict(ckpt["model"])
        state = _Progress(
            ckpt["stage"], ckpt["stage_epoch"], ckpt["epoch"], ckpt["global_step"], ckpt["best"]
        )
        runs.set_rng_state(ckpt["rng"])
    elif ctx.is_main:
        runs.create_run_dir(run_dir)
        write_json_atomic(run_dir / runs.CONFIG, config | {"stages": [asdict(s) for s in stages]})
        write_json_atomic(run_dir / runs.VOCAB, data.vocab)
    ctx.barrier()
    if resume and ctx.is_main:
        runs.truncate_metrics(run_dir, state.epoch)
    verb = "resuming" if resume else "training"
    log.info(
        f"{verb} {config['method']} on {config['cache']} ({ctx.world_size} process(es), {ctx.device}) "
        f"from stage {state.stage} epoch {state.stage_epoch}"
    )

    method.to(ctx.device)
    if opts.channels_last:
        method.to(memory_format=torch.channels_last)
    trainer = _Trainer(
        method, data, config["cache_meta_hash"], run_dir, opts, config["seed"], ctx, progress, complete
    )
    history: list[dict[str, Any]] = []
    for index, stage in enumerate(stages):
        if index < state.stage or (index == state.stage and state.stage_epoch >= stage.epochs):
            if index == state.stage:  # stopped at its end: drop its trunk cache as run_stage does there,
                if ctx.is_main:  # so the next stage fills its own as an uninterrupted run does (a fill
                    shutil.rmtree(run_dir / TRUNK_DIR, ignore_errors=True)  # draws from the RNG)
                ctx.barrier()
            continue
        resume_states = ckpt if (ckpt is not None and index == ckpt["stage"]) else None
        if index > state.stage:
            state.stage, state.stage_epoch = index, 0
        history += trainer.run_stage(index, stage, state, resume_states)
    log.info(f"done: best {BEST_METRIC} = {state.best['value']} at epoch {state.best.get('epoch')}")
    return TrainResult(run_dir, state.best, history, ctx.is_main)


def _probe_batch(cache: Cache) -> Batch:
    """Two training items, unflipped, for the checks before training."""
    dataset = CaptionDataset(cache, "train")
    return collate([dataset[i] for i in range(2)])


class _Trainer:
    """The per-stage loop; one instance per `train` call."""

    def __init__(
        self,
        method: Method,
        cache: Cache,
        cache_hash: str,
        run_dir: Path,
        opts: TrainOptions,
        seed: int,
        ctx: DistContext,
        progress: bool,
        complete: int,
    ) -> None:
        self.method, self.cache, self.cache_hash, self.run_dir = method, cache, cache_hash, run_dir
        self.complete = complete  # the first stage whose checkpoints may be best (`complete_stage`)
        self.opts, self.seed = opts, seed
        self.ctx, self.progress = ctx, progress
        self.flip_prob = opts.flip_prob if "flip" in opts.augment else 0.0
        self.dataset = CaptionDataset(cache, "train", flip_prob=self.flip_prob)
        self.sampler: IdentityBalancedSampler  # the current stage's (its batch size)
        self.has_val = len(cache.split_pids("val")) > 0

    # ---- one stage --------------------------------------------------------------------------------
    def run_stage(
        self, index: int, stage: Stage, state: _Progress, ckpt: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        trainable = set_trainable(self.method, stage)
        if not trainable:
            raise ValueError(f"stage '{stage.name}' of {self.method.name} trains no parameters")
        ctx, opts = self.ctx, self.opts
        self.sampler = IdentityBalancedSampler(
            self.dataset.pids, stage.batch_size, opts.instances_per_id, self.seed, ctx.rank, ctx.world_size
        )
        optimizer = build_optimizer(trainable, stage)
        steps = len(self.sampler) // self.opts.accum_steps
        if steps == 0:
            raise PedError(
                f"the train split gives {len(self.sampler)} batch(es) per process, fewer than accum_steps "
                f"({self.opts.accum_steps})",
                "lower --batch-size or accum_steps",
            )
        scheduler = build_scheduler(optimizer, stage, steps)
        if ckpt is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        start = time.perf_counter()
        trunk = self._trunk() if stage.freeze_trunk and self.opts.trunk_cache else None
        trunk_s = round(time.perf_counter() - start, 3)
        objective: nn.Module = _Objective(self.method, stage)
        if self.ctx.distributed:
            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            # find_unused_parameters: a stage's losses may leave some trainable parameters out
            objective = DistributedDataParallel(objective, device_ids=device_ids, find_unused_parameters=True)
        log.info(
            f"stage {index} '{stage.name}': {stage.epochs} epoch(s), {stage.optimizer} lr {stage.lr} "
            f"({stage.scheduler}), batch {stage.batch_size}, "
            f"{sum(p.numel() for _, p in trainable)} trainable parameters, losses {list(stage.losses)}"
            + (", trunk outputs cached" if trunk else "")
        )
        history = []
        while state.stage_epoch < stage.epochs:
            state.epoch += 1
            state.stage_epoch += 1
            record = self._train_epoch(objective, stage, optimizer, scheduler, trunk, state)
            record |= {"stage": stage.name, "stage_index": index, "stage_epoch": state.stage_epoch}
            record |= self._validate()
            record = self.ctx.broadcast(
                record
            )  # rank 0 validated: every rank keeps the same history and best
            if trunk is not None and not history:
                record["trunk_cache_s"] = trunk_s  # one-off cost (small when the cache is reused)
            self._save(record, state, optimizer, scheduler)
            history.append(record)
        if trunk is not None and self.ctx.is_main:
            shutil.rmtree(trunk.folder, ignore_errors=True)  # only this stage's frozen weights fit it
            with contextlib.suppress(OSError):
                trunk.folder.parent.rmdir()  # when no other stage's cache is left
        self.ctx.barrier()
        return history

    def _trunk(self) -> TrunkCache:
        flips = [False, True] if self.flip_prob > 0 else [False]
        key = trunk_key(self.method, self.cache_hash, "train", flips, self.ctx.device)
        loader = LoaderOptions(
            self.opts.eval_batch_size, self.opts.workers, self.opts.amp, self.opts.channels_last
        )
        log.info(f"frozen trunk outputs of the train images ({len(flips)} flip(s)): cache key {key}")
        return open_trunk_cache(
            self.method, self.cache, "train", flips, self.run_dir / TRUNK_DIR, key, self.ctx, loader
        )

    # ---- one epoch --------------------------------------------------------------------------------
    def _loader(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        seed = int(np.random.SeedSequence([self.seed, epoch, self.ctx.rank]).generate_state(1)[0])
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=self.opts.workers,
            pin_memory=self.ctx.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),  # worker seeds: a function of (seed, epoch, rank)
        )

    def _batches(self, loader: DataLoader, trunk: TrunkCache | None, n: int) -> Iterator[Batch]:
        for i, batch in enumerate(loader):
            if i >= n:
                return
            if trunk is not None:
                batch["trunk"] = trunk.lookup(batch["image_index"], batch["flip"])
                del batch["image"]  # the method must read the trunk output, not the pixels
            yield move_batch(batch, self.ctx.device, self.opts.channels_last)

    def _train_epoch(
        self,
        objective: nn.Module,
        stage: Stage,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        trunk: TrunkCache | None,
        state: _Progress,
    ) -> dict[str, Any]:
        opts, ctx = self.opts, self.ctx
        train_mode(self.method)
        accum = opts.accum_steps
        n_batches = (len(self.sampler) // accum) * accum  # a trailing incomplete accumulation is dropped
        sums: dict[str, torch.Tensor] = {}
        bar = tqdm(
            total=n_batches // accum,
            desc=f"{stage.name} {state.stage_epoch}/{stage.epochs}",
            unit="step",
            disable=not (self.progress and ctx.is_main),
            leave=False,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        pixels_augmented = not stage.freeze_trunk  # a frozen trunk (cached or not) keeps flip only
        for i, batch in enumerate(self._batches(self._loader(state.epoch), trunk, n_batches)):
            if pixels_augmented:  # draws: a function of (seed, epoch, global batch index)
                index = i * ctx.world_size + ctx.rank
                seed = int(np.random.SeedSequence([self.seed, state.epoch, index]).generate_state(1)[0])
                batch = augment_batch(batch, opts.augment, opts.crop_pad, opts.erase_prob, seed)
            step_now = (i + 1) % accum == 0
            sync = contextlib.nullcontext() if step_now or not ctx.distributed else objective.no_sync()
            with sync:
                with precision(ctx.device, opts.amp):
                    losses = objective(batch)
                    total = sum(losses[name] for name in stage.losses)
                (total / accum).backward()
            if step_now:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state.global_step += 1
                bar.update(1)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0) + value.detach().float()
            if step_now and bar.n % 10 == 1:
                rate = (i + 1) * stage.batch_size * ctx.world_size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{float(total.detach()):.4f}", samples_s=f"{rate:.1f}")
        bar.close()
        elapsed = time.perf_counter() - start
        means = ctx.mean({name: float(v) / n_batches for name, v in sums.items()})
        samples = ctx.sum(n_batches * stage.batch_size)
        return {
            "epoch": state.epoch,
            "losses": means,
            "loss": sum(means[name] for name in stage.losses),
            "lr": scheduler.get_last_lr()[0],
            "steps": n_batches // accum,
            "samples": int(samples),
            "train_time_s": round(elapsed, 3),
            "samples_per_s": round(samples / elapsed, 2),
        }

    # ---- validation and checkpoints ---------------------------------------------------------------
    def _validate(self) -> dict[str, Any]:
        """Text → image metrics on the val split (rank 0); empty when the dataset has no val split."""
        if not (self.has_val and self.ctx.is_main):
            return {}
        start = time.perf_counter()
        with precision(self.ctx.device, self.opts.amp):
            emb = encode_split(
                self.method,
                self.cache,
                "val",
                batch_size=self.opts.eval_batch_size,
                device=self.ctx.device,
                workers=self.opts.workers,
                progress=False,
            )
            sim = score_matrix(self.method, emb.text, emb.image)
        metrics = retrieval_metrics(sim, torch.from_numpy(emb.text_pid), torch.from_numpy(emb.image_pid))
        val = {k: round(v, 4) for k, v in metrics.items() if k.startswith("R@") or k in ("mAP", "mINP")}
        return {"val": val, "val_time_s": round(time.perf_counter() - start, 3)}

    def _save(
        self,
        record: dict[str, Any],
        state: _Progress,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> None:
        """metrics line, then last.pt, then best.pt when val R@1 improved (or every epoch without val),
        once every parameter of the test score has learned (from stage `self.complete` on). A tie on
        R@1 goes to the higher val mAP: on 32 validation identities R@1 ties are common, and in every
        tie checked on the method comparison the epoch with the higher mAP scored higher on test."""
        val = record.get("val", {})
        value, tie_break = val.get("R@1"), val.get("mAP")
        improved = record["stage_index"] >= self.complete and (
            value is None or state.best["value"] is None or _beats(value, tie_break, state.best)
        )
        if improved:
            state.best = {
                "metric": BEST_METRIC if value is not None else "last",
                "value": value,
                "mAP": tie_break,
                "epoch": state.epoch,
            }
        record["best"] = improved
        if self.ctx.is_main:
            runs.append_metrics(self.run_dir, record, self.opts.tensorboard)
            ckpt = {
                "model": self.method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": runs.rng_state(),
                "stage": record["stage_index"],
                "stage_epoch": state.stage_epoch,
                "epoch": state.epoch,
                "global_step": state.global_step,
                "best": state.best,
            }
            last = runs.checkpoint_path(self.run_dir, "last")
            runs.save_checkpoint(last, ckpt)
            if improved:
                with atomic_path(runs.checkpoint_path(self.run_dir, "best")) as tmp:
                    shutil.copyfile(last, tmp)
            val = record.get("val", {})
            log.info(
                f"epoch {state.epoch} ({record['stage']} {state.stage_epoch}): loss {record['loss']:.4f} "
                f"{json.dumps(record['losses'])}, {record['samples_per_s']} samples/s, "
                f"val R@1 {val.get('R@1')} R@5 {val.get('R@5')} mAP {val.get('mAP')}"
                + (" (best)" if improved else "")
            )
        self.ctx.barrier()


def _beats(value: float, tie_break: float | None, best: dict[str, Any]) -> bool:
    """Val R@1 `value` above the best's, or equal with a higher mAP `tie_break` (a best saved without
    its mAP, by an older version, keeps its ties)."""
    if value != best["value"]:
        return value > best["value"]
    return tie_break is not None and best.get("mAP") is not None and tie_break > best["mAP"]


# ---- seeding ----------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
