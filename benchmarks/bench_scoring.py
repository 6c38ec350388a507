"""Seconds to score the CUHK-PEDES test split (6,156 captions × 3,074 images) with a cross-attention method.

    make bench-scoring
    python benchmarks/bench_scoring.py --methods pma --k 100
    python benchmarks/bench_scoring.py --texts 1000 --images 500        # a quicker, smaller run
    python benchmarks/bench_scoring.py --exact-texts 300     # exact timed on 300 captions, scaled
    OMP_NUM_THREADS=1 python benchmarks/bench_scoring.py --cpu-time   # on a machine busy with other jobs
    python benchmarks/bench_scoring.py --methods pma --profile        # where two-stage time goes
    python benchmarks/bench_scoring.py --exact-texts 100 --score-budget 24   # another score_budget

For each method: random stored features of the paper's real widths (float16, as `ped embed` stores
them) go through the engine's exact `score_matrix` and its two-stage `two_stage_scores` (cosine
shortlist of K images per caption, then `shortlist_similarity` on those pairs only). Weights do not
change the cost, so the methods are built untrained. Each line gives the matrix-product FLOPs of exact
scoring (counted by `torch.utils.flop_counter` on a sample of captions, scaled) and of the two-stage
re-scoring (the same per pair, K pairs per caption), the GFLOP/s reached, and the time a plain float32
GEMM would need for exact scoring's FLOPs (the dot-product bound).

Adding a method: write a function `(n_text, n_image, generator) -> (method, text_feats, image_feats)`
and decorate it with `@feature_maker("name")`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from pedcli.engine.retrieval.scoring import score_matrix, two_stage_scores
from pedcli.models.methods import mia
from pedcli.models.methods.base import DataInfo, Features, Method, create_method
from pedcli.models.methods.pairwise import PairwiseMethod

CUHK_TEXTS, CUHK_IMAGES = 6156, 3074
CUHK_INFO = DataInfo(num_classes=11003, vocab_size=4984)  # PMA's vocabulary after min-count 2

Maker = Callable[[int, int, torch.Generator], tuple[Method, Features, Features]]
FEATURE_MAKERS: dict[str, Maker] = {}


def feature_maker(name: str) -> Callable[[Maker], Maker]:
    """Register a method's feature maker under the name `--methods` selects it by."""

    def deco(fn: Maker) -> Maker:
        FEATURE_MAKERS[name] = fn
        return fn

    return deco


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g).half()


def _padded_mask(g: torch.Generator, n: int, low: int, high: int) -> torch.Tensor:
    """[n, high] valid-slot masks with between `low` and `high` leading slots valid per row."""
    counts = torch.randint(low, high + 1, (n,), generator=g)
    return torch.arange(high)[None, :] < counts[:, None]


@feature_maker("pma")
def pma_features(n_text: int, n_image: int, g: torch.Generator) -> tuple[Method, Features, Features]:
    """PMA at the paper's b = 1024: 24 CA regions, 6 pose parts and 6 attended parts per image;
    2–10 noun phrases per caption (CUHK-PEDES captions average 23 words)."""
    method = create_method("pma", CUHK_INFO, {"pretrained": "none"}).eval()
    b = method.cfg.embed_dim
    text = {
        "global": _randn(g, n_text, 2 * b),  # the shortlist feature: sentence and phrase-sum pieces
        "sentence": _randn(g, n_text, b),
        "phrases": _randn(g, n_text, 10, b),
        "phrase_norms": _randn(g, n_text, 10).abs(),
        "phrases_mask": _padded_mask(g, n_text, 2, 10),
    }
    image = {key: _randn(g, n_image, n, b) for key, n in (("regions", 24), ("parts", 6), ("fa_parts", 6))}
    return method, text, {"global": _randn(g, n_image, 2 * b), **image}


@feature_maker("mia")
def mia_features(n_text: int, n_image: int, g: torch.Generator) -> tuple[Method, Features, Features]:
    """MIA at the paper's width 1024 (V = C = P = N): 6 stripe parts, their Gram matrix and their RGA /
    BFM MLP outputs per image; 2–10 noun phrases per caption with theirs."""
    method = create_method("mia", CUHK_INFO, {"pretrained": "none"}).eval()
    d = method.cfg.embed_dim

    def units(n: int, k: int, name: str) -> Features:
        """Random units with what `mia.unit_features` stores beside them (random MLP outputs)."""

        def mlp(u: torch.Tensor) -> torch.Tensor:
            return torch.randn(u.shape, generator=g)

        feats = mia.unit_features(_randn(g, n, k, d).float(), name, {"rga": mlp, "bfm": mlp})
        return {key: v.half() for key, v in feats.items()}

    text = units(n_text, 10, "phrases")
    text |= {"global": _randn(g, n_text, d), "phrases_mask": _padded_mask(g, n_text, 2, 10)}
    return method, text, {"global": _randn(g, n_image, d), **units(n_image, 6, "parts")}


@feature_maker("nafs")
def nafs_features(n_text: int, n_image: int, g: torch.Generator) -> tuple[Method, Features, Features]:
    """NAFS at the paper's D = 768: 6 image units (global, 2 regions, 3 patches) as queries and values;
    per caption the sentence, 6 sub-sentence slots (2–6 used) and 70 word-piece slots (15–70 used) as
    keys and values, with their int8 scale codes (0 = padding)."""
    method = create_method("nafs", CUHK_INFO, {"pretrained": "none", "bert_random_init": True}).eval()
    d, m = method.cfg.embed_dim, method.n_image_units
    subs, words = _padded_mask(g, n_text, 2, 6), _padded_mask(g, n_text, 15, 70)
    scales = torch.cat([torch.ones(n_text, 1), 2 * subs, 3 * words], dim=1).to(torch.int8)
    n = scales.shape[1]
    text = {"global": _randn(g, n_text, d), "scales": scales}
    text |= {key: _randn(g, n_text, n, d) for key in ("keys", "values")}
    image = {"global": _randn(g, n_image, d)}
    image |= {key: _randn(g, n_image, m, d) for key in ("queries", "values")}
    return method, text, image


def _flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def gemm_gflops(n: int = 2048, clock: Callable[[], float] = time.perf_counter) -> float:
    """GFLOP/s of one plain float32 matrix product on this machine: the dot-product bound's rate."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    start = clock()
    a @ b
    return 2 * n**3 / (clock() - start) / 1e9


def bench(
    name: str,
    n_text: int,
    n_image: int,
    k: int,
    peak: float,
    exact_texts: int,
    sample: int = 64,
    clock: Callable[[], float] = time.perf_counter,
    profile: bool = False,
) -> None:
    g = torch.Generator().manual_seed(0)
    method, text, image = FEATURE_MAKERS[name](n_text, n_image, g)
    some = {key: v[:sample] for key, v in text.items()}  # FLOPs of a sample of captions, scaled
    scale = n_text / min(sample, n_text)
    exact_flops = _flops(lambda: score_matrix(method, some, image)) * scale
    two_flops = exact_flops * min(k, n_image) / n_image  # the same kernels on K of the images per text
    n_exact = min(exact_texts, n_text) if exact_texts > 0 else n_text
    start = clock()
    score_matrix(method, {key: v[:n_exact] for key, v in text.items()}, image)
    exact = (clock() - start) * n_text / n_exact  # exact time grows linearly in the texts
    how = "" if n_exact == n_text else f" (timed on {n_exact} texts, scaled)"
    start = clock()
    two_stage_scores(method, text, image, k)
    two = clock() - start
    if profile:  # where the two-stage time goes, by operator (process CPU seconds)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            two_stage_scores(method, text, image, k)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8), flush=True)
    ex, tw = exact_flops / 1e9, two_flops / 1e9
    print(f"{name}: {n_text} texts × {n_image} images on {torch.get_num_threads()} thread(s): "
          f"exact {exact:.1f} s{how} ({ex:.0f} GFLOP, {ex / exact:.1f} GFLOP/s, bound {ex / peak:.1f} s); "
          f"two-stage K={k} {two:.1f} s ({tw:.0f} GFLOP, {tw / two:.1f} GFLOP/s); {exact / two:.1f}× faster",
          flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", nargs="+", default=sorted(FEATURE_MAKERS), choices=sorted(FEATURE_MAKERS)
    )
    parser.add_argument("--texts", type=int, default=CUHK_TEXTS)
    parser.add_argument("--images", type=int, default=CUHK_IMAGES)
    parser.add_argument("--k", type=int, default=100, help="shortlist size of the two-stage scoring")
    parser.add_argument("--exact-texts", type=int, default=0,
                        help="time exact scoring on this many texts only and scale (0: all; exact NAFS at "
                        "the full size takes most of an hour on 2 cores)")  # fmt: skip
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by this process's CPU seconds instead of the wall clock: on a machine "
                        "shared with other jobs, with one thread (OMP_NUM_THREADS=1)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="also profile each two-stage run by operator")
    parser.add_argument("--score-budget", type=int, default=0,
                        help="log2 of PairwiseMethod.score_budget to try (0: the default)")  # fmt: skip
    args = parser.parse_args()
    if args.score_budget:
        PairwiseMethod.score_budget = 1 << args.score_budget
    clock = time.process_time if args.cpu_time else time.perf_counter
    peak = gemm_gflops(clock=clock)
    print(f"plain float32 GEMM: {peak:.1f} GFLOP/s on {torch.get_num_threads()} thread(s)", flush=True)
    for name in args.methods:
        bench(name, args.texts, args.images, args.k, peak, args.exact_texts, clock=clock,
              profile=args.profile)  # fmt: skip


if __name__ == "__main__":
    main()
