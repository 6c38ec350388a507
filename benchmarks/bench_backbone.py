"""Images/s of a backbone on CPU, contiguous against channels_last memory format (inference and training).

    python benchmarks/bench_backbone.py                          # mobilenet_v2, batch 16, 384x128
    python benchmarks/bench_backbone.py --backbone resnet50 --batch 8

The engine should switch to channels_last (`Backbone.use_channels_last()`) when this shows it faster.
"""

from __future__ import annotations

import argparse
import time

import torch

from pedcli.models.backbones import BACKBONES, Backbone, build_backbone


def _rate(net: Backbone, x: torch.Tensor, train: bool, repeats: int) -> float:
    """Images/s of forward (or forward + backward) passes after one warm-up pass."""
    net.train(train)

    def step() -> None:
        with torch.set_grad_enabled(train):
            outs = net(x)
            if train:
                sum(o.mean() for o in outs).backward()

    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return repeats * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=BACKBONES, default="mobilenet_v2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.height, args.width)
    threads = torch.get_num_threads()
    print(f"{args.backbone}, batch {args.batch}, {args.height}x{args.width}, {threads} threads")
    for train in (False, True):
        plain = _rate(build_backbone(args.backbone, pretrained="none"), x, train, args.repeats)
        fast_net = build_backbone(args.backbone, pretrained="none").use_channels_last()
        fast = _rate(fast_net, x, train, args.repeats)
        mode = "train" if train else "infer"
        print(f"{mode}: contiguous {plain:7.1f} img/s  channels_last {fast:7.1f} img/s  x{fast / plain:.2f}")


if __name__ == "__main__":
    main()
