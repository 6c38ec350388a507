"""Images/s of each preprocess part (resize, text, BERT, pose) and of the whole `ped preprocess`.

    make bench-preprocess                      # 300 synthetic identities (~900 images), 2 workers
    python benchmarks/bench_preprocess.py --identities 600 --workers 2

Each part runs alone over the same shards in a process pool, as `ped preprocess` runs it, so the rates
add up the way the real run does (text counts its ~2 captions per image).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pedcli.data.formats import load_records
from pedcli.data.schema import Record
from pedcli.data.synth import generate
from pedcli.engine import preprocess as pp
from pedcli.text import TextOptions, TextPipeline, vocab_from_records

SHARD = 64


def _text_only(captions: Sequence[str], pipeline: TextPipeline) -> int:
    from pedcli.text.phrases import noun_phrases

    tokens = pipeline.tokenize(captions)
    [pipeline.vocab.encode(t) for t in tokens]
    noun_phrases(tokens, pipeline.options.phrase_backend)
    return len(captions)


def _bert_only(captions: Sequence[str], pipeline: TextPipeline) -> int:
    from pedcli.text.bert import load_tokenizer, word_pieces
    from pedcli.text.tokenize import normalize

    tok = load_tokenizer(pipeline.options.bert_model)
    word_pieces(tok, [normalize(c) for c in captions], pipeline.options.bert_max_length)
    return len(captions)


def _warm(pipeline: TextPipeline) -> None:
    pipeline.load()


def _rate(fn: Callable[..., object], tasks: Sequence[tuple], n_images: int, workers: int, init=None) -> float:
    """Images/s of `fn` over `tasks` in a `workers`-process pool whose workers are already warm."""
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        if init is not None:  # load models in every worker before the clock starts
            list(pool.map(init[0], [init[1]] * workers * 2))
        list(pool.map(fn, *zip(*tasks[:workers], strict=True)))  # warm imports
        t0 = time.perf_counter()
        list(pool.map(fn, *zip(*tasks, strict=True)))
        return n_images / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-pose", action="store_true", help="leave BlazePose out (it dominates the time)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        generate(root, identities=args.identities, seed=0, progress=False)
        records: list[Record] = load_records("synth", root)
        n = len(records)
        shards = [records[i : i + SHARD] for i in range(0, n, SHARD)]
        work = Path(tmp) / "work"
        work.mkdir()
        topts = TextOptions()
        pipeline = TextPipeline(vocab_from_records(records, topts), topts)
        caps = [[c for r in s for c in r.captions] for s in shards]
        size, pose_hw = (384, 128), (48, 16)
        rows = [
            ("resize (decode + 384×128)", _rate(
                pp._images_shard,
                [(root, s, size, work / f"i{i}.npz") for i, s in enumerate(shards)],
                n, args.workers,
            )),
            ("text (tokens, vocab, noun phrases)", _rate(
                _text_only, [(c, pipeline) for c in caps], n, args.workers, init=(_warm, pipeline)
            )),
            ("BERT word pieces + sub-sentence spans", _rate(
                _bert_only, [(c, pipeline) for c in caps], n, args.workers, init=(_warm, pipeline)
            )),
            ("pose from annotations", _rate(
                pp._pose_shard,
                [(root, s, "annotations", pose_hw, work / f"a{i}.npz") for i, s in enumerate(shards)],
                n, args.workers,
            )),
        ]  # fmt: skip
        if not args.skip_pose:
            tasks = [(root, s, "blazepose", pose_hw, work / f"p{i}.npz") for i, s in enumerate(shards)]
            rows.append(("pose (BlazePose)", _rate(pp._pose_shard, tasks, n, args.workers)))
        for source in ("annotations",) + (() if args.skip_pose else ("blazepose",)):
            t0 = time.perf_counter()
            opts = pp.PreprocessOptions(pose_source=source, workers=args.workers)
            pp.run_preprocess("synth", root, Path(tmp) / f"cache-{source}", opts)
            rows.append(
                (f"whole `ped preprocess`, pose {source} (incl. start-up)", n / (time.perf_counter() - t0))
            )
    print(f"\n{n} synthetic images ({args.identities} identities), {args.workers} worker processes")
    print(f"{'part':<58} {'images/s':>9}")
    for name, rate in rows:
        print(f"{name:<58} {rate:>9.1f}")


if __name__ == "__main__":
    main()
