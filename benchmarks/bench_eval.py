"""Evaluation speed at the CUHK-PEDES test size: 6,156 captions × 3,074 images, random 512-d features.

Times exact cosine scoring through the Method contract (chunked), the metrics in both directions, and
optionally the two-stage path and the two re-rankers; prints seconds and the process's peak memory.

    .venv/bin/python benchmarks/bench_eval.py [--texts 6156 --images 3074 --dim 512 --ids 1000 --extras]
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from pedcli.engine.retrieval.metrics import bidirectional_metrics
from pedcli.engine.retrieval.rerank import kreciprocal, rvn
from pedcli.engine.retrieval.scoring import score_matrix, two_stage_scores
from pedcli.models.methods.base import DataInfo, Features, Method


class Cosine(Method):
    """The cheapest method: cosine of the global features (what a global baseline costs to evaluate)."""

    def similarity(self, text_feats: Features, image_feats: Features) -> torch.Tensor:
        return F.normalize(text_feats["global"], dim=1) @ F.normalize(image_feats["global"], dim=1).T

    def pair_similarity(self, text_feats: Features, image_feats: Features) -> torch.Tensor:
        return (F.normalize(text_feats["global"], dim=1) * F.normalize(image_feats["global"], dim=1)).sum(1)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    print(f"{name:<34} {time.perf_counter() - t0:7.2f} s   peak RSS so far {peak_mib():7.0f} MiB")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=6156)
    ap.add_argument("--images", type=int, default=3074)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ids", type=int, default=1000)
    ap.add_argument("--extras", action="store_true", help="also time two-stage top-100, RVN, k-reciprocal")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    image_pids = torch.arange(args.images) % args.ids
    text_pids = image_pids[torch.arange(args.texts) * args.images // args.texts]  # ~2 captions per image
    centres = torch.randn(args.ids, args.dim, generator=g)
    image = {"global": centres[image_pids] + 2 * torch.randn(args.images, args.dim, generator=g)}
    text = {"global": centres[text_pids] + 2 * torch.randn(args.texts, args.dim, generator=g)}
    method = Cosine(None, DataInfo(num_classes=1, vocab_size=2)).eval()
    print(f"{args.texts} texts × {args.images} images, {args.dim}-d, {torch.get_num_threads()} threads")
    print(f"{'baseline after setup':<34} {'':7}     peak RSS so far {peak_mib():7.0f} MiB")

    t0 = time.perf_counter()
    sim = timed("exact scores (chunked)", lambda: score_matrix(method, text, image))
    m = timed("metrics t2i + i2t", lambda: bidirectional_metrics(sim, text_pids, image_pids))
    print(f"{'total (scores + metrics)':<34} {time.perf_counter() - t0:7.2f} s")
    print("t2i", {k: round(v, 2) for k, v in m["t2i"].items()})
    if args.extras:
        timed(
            "two-stage top-100, t2i + i2t",
            lambda: [two_stage_scores(method, text, image, 100, queries=q) for q in ("text", "image")],
        )
        timed("RVN (l = 10)", lambda: rvn(sim, text["global"], image["global"]))
        timed("k-reciprocal (k1 = 20, k2 = 6)", lambda: kreciprocal(sim, text["global"], image["global"]))


if __name__ == "__main__":
    main()
