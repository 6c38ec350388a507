"""Evaluate a method on embedded features: exact or two-stage scores, optional re-ranking, metrics, report.

Text→image is the benchmark task; image→text is reported too (IRRA does the same). Re-ranking applies to
text→image only (both re-rankers are defined for a text query against an image gallery). With a
two-stage shortlist the exact metrics are computed as well (unless switched off) so the report says how
far the fast path is from the exact one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pedcli.engine.distributed import resolve_device
from pedcli.engine.embed import encode_split, load_embeddings, run_cache
from pedcli.engine.retrieval.metrics import DEFAULT_KS, retrieval_metrics
from pedcli.engine.retrieval.rerank import kreciprocal, rvn
from pedcli.engine.retrieval.scoring import score_matrix, two_stage_scores
from pedcli.engine.runs import load_run, resolve_checkpoint
from pedcli.errors import PedError
from pedcli.fileio import check_output, sha256_file, write_json_atomic
from pedcli.models.methods.base import Features, Method

RERANKERS = {"rvn": rvn, "kreciprocal": kreciprocal}
Metrics = dict[str, Any]


def _rerank(
    name: str, sim: torch.Tensor, text_feats: Features, image_feats: Features, options: dict[str, Any]
) -> torch.Tensor:
    if name not in RERANKERS:
        raise PedError(f"unknown re-ranking '{name}'", f"choose one of: {', '.join(RERANKERS)}")
    return RERANKERS[name](sim, text_feats["global"], image_feats["global"], **options)


def _both(
    t2i: torch.Tensor, i2t: torch.Tensor, text_pids: torch.Tensor, image_pids: torch.Tensor, ks: Sequence[int]
) -> dict[str, Metrics]:
    """Metrics of text→image from `t2i` rows and image→text from `i2t` columns (both [n_text, n_image])."""
    return {
        "t2i": retrieval_metrics(t2i, text_pids, image_pids, ks),
        "i2t": retrieval_metrics(i2t.T, image_pids, text_pids, ks),
    }


def _difference(a: Metrics, b: Metrics) -> Metrics:
    return {k: a[k] - b[k] for k in a if k not in ("queries", "gallery")}


def evaluate(
    method: Method,
    text_feats: Features,
    image_feats: Features,
    text_pids: torch.Tensor,
    image_pids: torch.Tensor,
    rerank_top: int | None = None,
    rerank: str | None = None,
    *,
    rerank_options: dict[str, Any] | None = None,
    compare_exact: bool = True,
    ks: Sequence[int] = DEFAULT_KS,
    pair_chunk: int | None = None,
) -> Metrics:
    """Metrics dict: {"t2i", "i2t", "scoring", "seconds"} and, when asked, {"exact", "difference"}
    (two-stage minus exact) and {"t2i_before_rerank"}."""
    text_pids, image_pids = torch.as_tensor(text_pids), torch.as_tensor(image_pids)
    seconds: dict[str, float] = {}
    result: Metrics = {"scoring": "exact" if rerank_top is None else f"two-stage top-{rerank_top}"}
    exact: torch.Tensor | None = None
    if rerank_top is None or compare_exact:
        t0 = time.perf_counter()
        exact = score_matrix(method, text_feats, image_feats)
        seconds["exact"] = time.perf_counter() - t0
    if rerank_top is None:
        assert exact is not None
        t2i = i2t = exact
    else:
        t0 = time.perf_counter()
        kw = {} if pair_chunk is None else {"pair_chunk": pair_chunk}
        t2i = two_stage_scores(method, text_feats, image_feats, rerank_top, queries="text", **kw)
        i2t = two_stage_scores(method, text_feats, image_feats, rerank_top, queries="image", **kw)
        seconds["two_stage"] = time.perf_counter() - t0
        result["rerank_top"] = rerank_top
        if exact is not None:
            result["exact"] = _both(exact, exact, text_pids, image_pids, ks)
    if rerank is not None:
        result["t2i_before_rerank"] = retrieval_metrics(t2i, text_pids, image_pids, ks)
        t0 = time.perf_counter()
        t2i = _rerank(rerank, t2i, text_feats, image_feats, rerank_options or {})
        seconds["rerank"] = time.perf_counter() - t0
        result["rerank"] = {"name": rerank, **(rerank_options or {})}
    result.update(_both(t2i, i2t, text_pids, image_pids, ks))
    if "exact" in result:  # the cost of the shortlist alone, before any re-ranking
        two_stage = {"t2i": result.get("t2i_before_rerank", result["t2i"]), "i2t": result["i2t"]}
        result["difference"] = {d: _difference(two_stage[d], result["exact"][d]) for d in ("t2i", "i2t")}
    result["seconds"] = seconds
    return result


def write_metrics(path: str | Path, result: Metrics) -> Path:
    """Write the metrics record as JSON, atomically (a reader never sees half a file)."""
    write_json_atomic(path, result)
    return Path(path)


def is_metrics_file(path: Path) -> bool:
    """Whether `path` holds a metrics record `write_metrics` wrote (then replacing it needs no --force)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and {"scoring", "t2i", "i2t"} <= record.keys()


def check_metrics_out(path: str | Path, force: bool = False) -> None:
    """Before any encoding: `path` can be written and is not another kind of file (unless `force`)."""
    check_output(path, "metrics file", is_metrics_file, force)


def _features_to(feats: Features, device: torch.device) -> Features:
    return {k: v.to(device) for k, v in feats.items()}


def _check_embeddings_match(path: Path, attrs: dict[str, Any], config: dict[str, Any], ckpt: Path) -> None:
    """Features from another method or checkpoint would be scored with the wrong similarity weights."""
    if attrs.get("method") != config["method"]:
        raise PedError(
            f"{path} holds '{attrs.get('method')}' features but the run is '{config['method']}'",
            "embed with this run: ped embed --run RUN --cache CACHE --out FILE",
        )
    if attrs.get("checkpoint_sha256") not in (None, sha256_file(ckpt)):
        raise PedError(
            f"{path} was embedded with another checkpoint than {ckpt}",
            "embed again with this checkpoint, or pass the checkpoint it was made with",
        )


def _resolve_rerank(method: Method, rerank: str | None) -> tuple[str | None, dict[str, Any]]:
    """'auto' = the method's own post-processing (NAFS: RVN, its eq. 8), 'none' = no re-ranking."""
    if rerank == "auto":
        return method.default_rerank, dict(method.rerank_options)
    if rerank in (None, "none"):
        return None, {}
    return rerank, {}


def evaluate_run(
    run: str | Path,
    *,
    cache: str | Path | None = None,
    split: str = "test",
    embeddings: str | Path | None = None,
    checkpoint: str = "best",
    rerank_top: int | None = None,
    rerank: str | None = "auto",
    device: str | None = None,
    batch_size: int = 64,
) -> Metrics:
    """`ped eval`: evaluate a run on stored embeddings or on a cache split encoded now (default: the
    run's own cache). The result names what was evaluated."""
    if cache is not None and embeddings is not None:
        raise PedError("pass either --cache or --embeddings, not both", "drop one of them")
    run_dir, ckpt = resolve_checkpoint(run, checkpoint)
    dev = resolve_device(device)
    method, config = load_run(run, checkpoint, device=dev)
    rerank_name, rerank_options = _resolve_rerank(method, rerank)
    if embeddings is not None:
        _, _, emb = load_embeddings(embeddings)
        _check_embeddings_match(Path(embeddings), emb.attrs, config, ckpt)
        source = {"embeddings": str(Path(embeddings).resolve()), "split": emb.attrs.get("split")}
    else:
        opened = run_cache(run_dir, config, cache)
        emb = encode_split(method, opened, split, batch_size, dev)
        source = {"cache": str(opened.root.resolve()), "split": split}
    result = evaluate(
        method,
        _features_to(emb.text, dev),
        _features_to(emb.image, dev),
        torch.from_numpy(emb.text_pid),
        torch.from_numpy(emb.image_pid),
        rerank_top,
        rerank_name,
        rerank_options=rerank_options,
    )
    context = {"run": str(run_dir.resolve()), "checkpoint": str(ckpt.resolve()), "method": config["method"]}
    return context | source | result
