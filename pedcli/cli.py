"""`ped`: the command-line interface. One function per subcommand; the work is in the library."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from pedcli import __version__
from pedcli.errors import PedError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    name="ped",
    help="Text-based person search: synthesise or read data, preprocess, train, embed, evaluate, query.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Print a PedError as 'error: … / fix: …' and exit 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PedError as e:
            console.print(f"[bold red]error:[/] {e.message}", highlight=False)
            if e.hint:
                console.print(f"[bold]fix:[/] {e.hint}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ped {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Text-based person search toolkit (PMA, MGEL, HAN, MIA, NAFS and a global baseline)."""


@app.command()
@friendly
def synth(
    out: Path = typer.Option(..., "--out", help="Folder to write reid_raw.json and imgs/ into."),
    identities: int = typer.Option(300, "--identities", min=3, help="Number of people to render."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same files."),
    preview: Path | None = typer.Option(None, "--preview", help="Also save a contact sheet PNG here."),
) -> None:
    """Render a synthetic pedestrian benchmark in the CUHK-PEDES layout (the demo and test data)."""
    from pedcli.data.synth import contact_sheet, generate

    summary = generate(out, identities=identities, seed=seed)
    console.print(f"wrote {out / 'reid_raw.json'}: {summary}")
    if preview is not None:
        console.print(f"preview: {contact_sheet(out, preview)}")


@app.command()
@friendly
def preprocess(
    dataset: str = typer.Option(
        "synth", "--dataset", help="Annotation format: cuhk-pedes, icfg-pedes, rstpreid or synth."
    ),
    root: Path | None = typer.Option(None, "--root", help="Dataset folder (annotation file + images)."),
    out: Path | None = typer.Option(None, "--out", help="Cache folder to write."),
    annotations: Path | None = typer.Option(
        None, "--annotations", help="Annotation file, if not the dataset's default name under --root."
    ),
    pose_source: str = typer.Option(
        "blazepose", "--pose-source", help="Pose maps from: blazepose, annotations (synthetic set) or none."
    ),
    np_backend: str = typer.Option("nltk", "--np-backend", help="Noun phrases with: nltk or spacy."),
    bert_model: Path | None = typer.Option(
        None,
        "--bert-model",
        help="Local Hugging Face model folder for word pieces (default: offline MiniLM).",
    ),
    image_size: str = typer.Option("384x128", "--image-size", help="Resize images to HxW."),
    min_count: int = typer.Option(2, "--min-count", help="Drop words seen fewer times in train captions."),
    on_error: str = typer.Option(
        "fail", "--on-error", help="Bad records (missing/corrupt image, empty caption): fail or skip."
    ),
    workers: int = typer.Option(0, "--workers", help="Worker processes (0 = one per CPU core)."),
    check: Path | None = typer.Option(None, "--check", help="Validate an existing cache and summarise it."),
) -> None:
    """Build the HDF5 caches (images, tokens, noun phrases, BERT pieces, pose maps); resumable."""
    from pedcli.engine.preprocess import PreprocessOptions, check_cache, parse_size, run_preprocess

    if check is not None:
        check_cache(check, console=console)
        return
    if root is None or out is None:
        raise PedError(
            "--root and --out are required", "e.g. ped preprocess --dataset synth --root DIR --out CACHE"
        )
    opts = PreprocessOptions(
        image_size=parse_size(image_size),
        pose_source=pose_source,
        np_backend=np_backend,
        bert_model=str(bert_model) if bert_model else None,
        min_count=min_count,
        on_error=on_error,
        workers=workers,
    )
    run_preprocess(dataset, root, out, opts, annotations=annotations, console=console)


@app.command()
@friendly
def train(
    method: str | None = typer.Option(None, "--method", help="Method to train (see `ped methods`)."),
    cache: Path | None = typer.Option(None, "--cache", help="Cache folder from `ped preprocess`."),
    run: Path = typer.Option(..., "--run", help="Run folder to create (or to continue with --resume)."),
    epochs: int | None = typer.Option(None, "--epochs", min=0, help="Epochs per stage (default: method's)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate of each stage (default: method's)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=2, help="Per process (default 64)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed (default 0): init and data order."),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN from its last checkpoint."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA if any)."),
    sets: list[str] = typer.Option(
        [], "--set", help="Method option KEY=VALUE, or train.KEY=VALUE for engine options; repeatable."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars (RUN/train.log still logs)."),
) -> None:
    """Train a method on a cache into a run folder.

    Several processes: torchrun --standalone --nproc_per_node 2 $(which ped) -- train ... --run R
    """
    from pedcli.engine.options import parse_assignments
    from pedcli.engine.runs import read_config
    from pedcli.engine.train import TrainOptions
    from pedcli.engine.train import train as run_training
    from pedcli.models.methods import method_class

    name = method or (read_config(run)["method"] if resume else None)
    if name is None:
        raise PedError("--method is required for a new run", "see `ped methods` for the choices")
    method_opts, train_opts = parse_assignments(sets, method_class(name).Config, TrainOptions)
    given = {"epochs": epochs, "lr": lr, "batch_size": batch_size}
    train_opts |= {k: v for k, v in given.items() if v is not None}
    result = run_training(
        method,
        cache,
        run,
        method_options=method_opts,
        options=train_opts,
        seed=seed,
        resume=resume,
        device=device,
        progress=not quiet,
    )
    best = result.best
    if result.is_main:  # under torchrun every rank returns; one report
        console.print(
            f"[green]{result.run_dir}[/]: best {best['metric']} = {best['value']} (epoch {best['epoch']})"
        )


@app.command()
@friendly
def methods(name: str | None = typer.Argument(None, help="Show only this method.")) -> None:
    """List the registered methods with their options (set them with `ped train --set KEY=VALUE`)."""
    from rich.table import Table

    from pedcli.engine.options import describe_options
    from pedcli.engine.train import TrainOptions
    from pedcli.models.methods import list_methods, method_class

    for m in [name] if name else list_methods():
        table = Table(title=f"{m}  (ped train --method {m} --set KEY=VALUE)", title_justify="left")
        for col in ("option", "type", "default"):
            table.add_column(col)
        for row in describe_options(method_class(m).Config):
            table.add_row(*row)
        Console().print(table)
    table = Table(title="engine options (--set train.KEY=VALUE)", title_justify="left")
    for col in ("option", "type", "default"):
        table.add_column(col)
    for row in describe_options(TrainOptions):
        table.add_row(*row)
    Console().print(table)


@app.command()
@friendly
def embed(
    run: Path = typer.Option(..., "--run", help="Run folder from `ped train` (or a .pt checkpoint in it)."),
    cache: Path | None = typer.Option(None, "--cache", help="Cache to embed (default: the run's own cache)."),
    split: str = typer.Option("test", "--split", help="Split to embed: train, val or test."),
    out: Path = typer.Option(..., "--out", help="Embeddings file (.h5) to write."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="Checkpoint of the run: best or last."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Items per encoder call."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA if any)."),
    dtype: str = typer.Option("float16", "--dtype", help="Stored feature precision: float16 or float32."),
    workers: int = typer.Option(0, "--workers", min=0, help="Data-loading worker processes."),
) -> None:
    """Encode every image and caption of a split with a trained method and store the features."""
    from pedcli.engine.embed import embed_run

    path = embed_run(run, cache, split, out, checkpoint, batch_size, device, dtype, workers)
    console.print(f"wrote {path}")


@app.command("eval")
@friendly
def evaluate_cmd(
    run: Path = typer.Option(..., "--run", help="Run folder from `ped train` (or a .pt checkpoint in it)."),
    cache: Path | None = typer.Option(None, "--cache", help="Encode this cache now (default: the run's)."),
    split: str = typer.Option("test", "--split", help="Split to evaluate when encoding a cache."),
    embeddings: Path | None = typer.Option(None, "--embeddings", help="Use a file from `ped embed` instead."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="Checkpoint of the run: best or last."),
    rerank_top: int | None = typer.Option(
        None, "--rerank-top", min=1, help="Two-stage: score exactly only each query's K best by cosine."
    ),
    rerank: str = typer.Option(
        "auto",
        "--rerank",
        help="Re-rank text→image: auto (the method's own: RVN for NAFS), none, rvn, kreciprocal.",
    ),
    out: Path | None = typer.Option(None, "--out", help="Also write the metrics as JSON here."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Items per encoder call (with --cache)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA if any)."),
) -> None:
    """R@1/5/10, mAP and mINP, text→image and image→text (two-stage and re-ranking optional)."""
    from pedcli.engine.evaluate import evaluate_run, print_metrics, write_metrics

    result = evaluate_run(
        run,
        cache=cache,
        split=split,
        embeddings=embeddings,
        checkpoint=checkpoint,
        rerank_top=rerank_top,
        rerank=rerank,
        device=device,
        batch_size=batch_size,
    )
    print_metrics(result, Console())
    if out is not None:
        console.print(f"wrote {write_metrics(out, result)}")


@app.command()
@friendly
def query(
    text: list[str] = typer.Argument(None, help='Query sentence(s), e.g. "a woman in a red shirt".'),
    gallery: Path = typer.Option(..., "--gallery", help="Folder of images (searched recursively)."),
    run: Path = typer.Option(..., "--run", help="Run folder from `ped train` (or a .pt checkpoint in it)."),
    queries: Path | None = typer.Option(None, "--queries", help="Also read queries from a file, one a line."),
    top: int = typer.Option(10, "--top", min=1, help="Matches to show per query."),
    min_score: float | None = typer.Option(None, "--min-score", help="Drop matches scoring below this."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout instead of tables."),
    html: Path | None = typer.Option(None, "--html", help="Write a self-contained HTML page here."),
    index: str = typer.Option("auto", "--index", help="Shortlist search: auto, flat (exact) or faiss."),
    rerank_top: int = typer.Option(
        100, "--rerank-top", min=1, help="Score this many cosine-shortlisted images exactly per query."
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Feature cache (default GALLERY/.pedcli)."
    ),
    checkpoint: str = typer.Option("best", "--checkpoint", help="Checkpoint of the run: best or last."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per encoder call."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA if any)."),
) -> None:
    """Rank the images of a folder by a sentence; features are cached, so later queries are fast."""
    from pedcli.engine.query import query_gallery, read_queries
    from pedcli.engine.report import dump_json, print_tables, write_html

    sentences = list(text or []) + (read_queries(queries) if queries is not None else [])
    report = query_gallery(
        run, gallery, sentences, top=top, min_score=min_score, index=index, rerank_top=rerank_top,
        cache_dir=cache_dir, checkpoint=checkpoint, batch_size=batch_size, device=device,
        explain=html is not None, log=console.print,
    )  # fmt: skip
    for path, reason in report.skipped:
        console.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(dump_json(report))
    else:
        print_tables(report, Console())
    if html is not None:
        console.print(f"wrote {write_html(html, report)}")
