"""Moving batches to the compute device and the precision context, shared by training and encoding."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from pedcli.models.methods.base import Batch


def move_batch(batch: Batch, device: torch.device, channels_last: bool = False) -> Batch:
    """Tensors to `device` (non-blocking from pinned memory); 4-D float maps optionally channels_last."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if channels_last and value.dim() == 4 and value.is_floating_point():
                value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def precision(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when `amp` (no loss scaling needed for bf16); plain fp32 elsewhere."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class LoaderOptions:
    """How inference-style passes (validation encoding, trunk caching) batch and run."""

    batch_size: int = 64
    num_workers: int = 0
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = False
