"""`ped`: the command-line interface. One function per subcommand; the work is in the library."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from pedcli import __version__
from pedcli.data.schema import DEFAULT_IMAGE_SIZE
from pedcli.engine.project import DATA_DIR, RUNS_DIR, SYNTH, Pick
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
            # soft_wrap: a command in the message stays on one line, so it can be copied
            console.print(f"[bold red]error:[/] {escape(e.message)}", highlight=False, soft_wrap=True)
            if e.hint:
                console.print(f"[bold]fix:[/] {escape(e.hint)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _picked(pick: Pick, what: str) -> Path:
    """Say which default was chosen and why (one line), and return it."""
    console.print(pick.line(what), highlight=False, markup=False, soft_wrap=True)
    return pick.path


def _newest_run(checkpoint: str) -> Path:
    """The newest run under runs/ with this checkpoint (eval, embed, query and serve default to it)."""
    from pedcli.engine.project import pick_run

    return _picked(pick_run(checkpoint=checkpoint), "using run")


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
    out: Path = typer.Option(
        Path(DATA_DIR) / SYNTH, "--out", help="Folder to write reid_raw.json and imgs/ into."
    ),
    identities: int = typer.Option(300, "--identities", min=3, help="Number of people to render."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same files."),
    preview: Path | None = typer.Option(None, "--preview", help="Also save a contact sheet PNG here."),
    realism: str = typer.Option(
        "standard",
        "--realism",
        help="standard, or hard: low resolution, blur, JPEG artefacts, camera colour, clutter, occlusion, "
        "other views, and rougher captions (synonyms, order, length, typos), as real crops and annotators.",
    ),
    splits: str = typer.Option("0.8,0.1,0.1", "--splits", help="Train,val,test fractions of the identities."),
) -> None:
    """Render a synthetic pedestrian benchmark in the CUHK-PEDES layout (the demo and test data)."""
    from pedcli.data.synth import contact_sheet, generate

    try:
        fractions = tuple(float(v) for v in splits.split(","))
    except ValueError:
        raise PedError(f"--splits {splits!r} is not three numbers", "e.g. --splits 0.6,0.1,0.3") from None
    summary = generate(out, identities=identities, seed=seed, split_fractions=fractions, realism=realism)
    console.print(f"wrote {out / 'reid_raw.json'}: {summary}", markup=False)
    if preview is not None:
        console.print(f"preview: {contact_sheet(out, preview)}", markup=False)


@app.command()
@friendly
def preprocess(
    dataset: str | None = typer.Option(
        None,
        "--dataset",
        help="Annotation format: cuhk-pedes, icfg-pedes, rstpreid or synth (default: read from the file).",
    ),
    root: Path | None = typer.Option(
        None, "--root", help="Dataset folder (annotation file + images; default: the one under data/)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Cache folder to write (default: cache/<dataset>)."),
    annotations: Path | None = typer.Option(
        None, "--annotations", help="Annotation file, if not the dataset's default name under --root."
    ),
    pose_source: str = typer.Option(
        "auto",
        "--pose-source",
        help="Pose maps from: blazepose, annotations (synthetic set) or none; auto: annotations when the "
        "records carry keypoints, else blazepose.",
    ),
    np_backend: str = typer.Option("nltk", "--np-backend", help="Noun phrases with: nltk or spacy."),
    bert_model: Path | None = typer.Option(
        None,
        "--bert-model",
        help="Local Hugging Face model folder for word pieces (default: offline MiniLM).",
    ),
    image_size: str = typer.Option(
        "x".join(map(str, DEFAULT_IMAGE_SIZE)), "--image-size", help="Resize images to HxW."
    ),
    min_count: int = typer.Option(2, "--min-count", help="Drop words seen fewer times in train captions."),
    on_error: str = typer.Option(
        "fail", "--on-error", help="Bad records (missing/corrupt image, empty caption): fail or skip."
    ),
    workers: int = typer.Option(0, "--workers", help="Worker processes (0 = one per CPU core)."),
    check: Path | None = typer.Option(None, "--check", help="Validate an existing cache and summarise it."),
    allow_outside_root: bool = typer.Option(
        False, "--allow-outside-root", help="Read annotation paths that resolve outside --root (.., links)."
    ),
) -> None:
    """Build the HDF5 caches (images, tokens, noun phrases, BERT pieces, pose maps); resumable."""
    from pedcli.cli_views import print_cache_summary
    from pedcli.engine.preprocess import PreprocessOptions, check_cache, parse_size, run_preprocess
    from pedcli.engine.project import default_cache_dir, pick_dataset

    if check is not None:
        print_cache_summary(check_cache(check), console)
        return
    found, why = pick_dataset(root, dataset, annotations)
    out = out if out is not None else default_cache_dir(found)
    console.print(
        f"dataset {found.root} ({why}) → cache {out}", highlight=False, markup=False, soft_wrap=True
    )
    opts = PreprocessOptions(
        image_size=parse_size(image_size),
        pose_source=found.pose_source if pose_source == "auto" else pose_source,
        np_backend=np_backend,
        bert_model=str(bert_model) if bert_model else None,
        min_count=min_count,
        on_error=on_error,
        workers=workers,
        allow_outside_root=allow_outside_root,
    )
    run_preprocess(found.format, found.root, out, opts, annotations=annotations, console=console)


@app.command()
@friendly
def train(
    method: str | None = typer.Option(None, "--method", help="Method to train (see `ped methods`)."),
    cache: Path | None = typer.Option(
        None, "--cache", help="Cache folder from `ped preprocess` (default: the newest under cache/)."
    ),
    run: Path | None = typer.Option(
        None,
        "--run",
        help="Run folder to create (default: runs/METHOD, runs/METHOD-2, …), or to continue with --resume "
        "(default: the newest run).",
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="TOML file of options: method, seed, cache, method options as KEY = VALUE, engine options "
        "under [train] (as written by `ped runs show RUN --config-out`); --set and flags override it.",
    ),
    epochs: int | None = typer.Option(None, "--epochs", min=0, help="Epochs per stage (default: method's)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate of each stage (default: method's)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=2, help="Per process (default: paper)."),
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
    from pedcli.cli_options import parse_assignments, read_options_file
    from pedcli.engine.project import new_run_dir, pick_cache, pick_run
    from pedcli.engine.runs import read_config
    from pedcli.engine.train import TrainOptions
    from pedcli.engine.train import train as run_training
    from pedcli.models.methods import method_class

    file = read_options_file(config)  # precedence: the file, then --set, then the flags
    if resume and run is None:
        run = _picked(pick_run(checkpoint="last"), "resuming run")
    method = method or file.method
    name = method or (read_config(run)["method"] if resume and run is not None else None)
    if name is None:
        raise PedError("--method is required for a new run", "see `ped methods` for the choices")
    seed = seed if seed is not None else file.seed
    config_cls = method_class(name).Config
    method_opts, train_opts = parse_assignments(file.items, config_cls, TrainOptions, source=file.source)
    set_method, set_train = parse_assignments(sets, config_cls, TrainOptions)
    method_opts, train_opts = method_opts | set_method, train_opts | set_train
    given = {"epochs": epochs, "lr": lr, "batch_size": batch_size}
    train_opts |= {k: v for k, v in given.items() if v is not None}
    if not resume:
        cache = cache or file.cache or _picked(pick_cache(), "using cache")
        run = run or _picked(new_run_dir(name), "writing run")
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

    from pedcli.cli_options import describe_options
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
    run: Path | None = typer.Option(
        None, "--run", help="Run folder from `ped train`, or a .pt checkpoint in it (default: the newest)."
    ),
    cache: Path | None = typer.Option(None, "--cache", help="Cache to embed (default: the run's own cache)."),
    split: str = typer.Option("test", "--split", help="Split to embed: train, val or test."),
    out: Path = typer.Option(..., "--out", help="Embeddings file (.h5) to write."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="Checkpoint of the run: best or last."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Items per encoder call."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA if any)."),
    dtype: str = typer.Option("float16", "--dtype", help="Stored feature precision: float16 or float32."),
    workers: int = typer.Option(0, "--workers", min=0, help="Data-loading worker processes."),
    force: bool = typer.Option(False, "--force", help="Replace an --out file that pedcli did not write."),
) -> None:
    """Encode every image and caption of a split with a trained method and store the features."""
    from pedcli.engine.embed import embed_run

    run = run or _newest_run(checkpoint)
    path = embed_run(run, cache, split, out, checkpoint, batch_size, device, dtype, workers, force=force)
    console.print(f"wrote {path}", markup=False)


@app.command("eval")
@friendly
def evaluate_cmd(
    run: Path | None = typer.Option(
        None, "--run", help="Run folder from `ped train`, or a .pt checkpoint in it (default: the newest)."
    ),
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
    force: bool = typer.Option(False, "--force", help="Replace an --out file that pedcli did not write."),
) -> None:
    """R@1/5/10, mAP and mINP, text→image and image→text (two-stage and re-ranking optional)."""
    from pedcli.cli_views import metrics_table
    from pedcli.engine.evaluate import check_metrics_out, evaluate_run, write_metrics
    from pedcli.engine.runs import record_eval

    if out is not None:
        check_metrics_out(out, force)  # before the encoding, not after it
    run = run or _newest_run(checkpoint)
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
    Console().print(metrics_table(result))
    if out is not None:
        console.print(f"wrote {write_metrics(out, result)}", markup=False)
    try:
        recorded = record_eval(result)  # for `ped runs`
    except (PedError, OSError) as e:  # e.g. a read-only run folder: the metrics above still stand
        console.print(f"not recorded in the run ({e})", style="yellow", highlight=False, markup=False)
    else:
        if recorded is not None:
            console.print(f"recorded in {recorded}", highlight=False, markup=False)


@app.command()
@friendly
def query(
    text: list[str] = typer.Argument(None, help='Query sentence(s), e.g. "a woman in a red shirt".'),
    gallery: Path = typer.Option(..., "--gallery", help="Folder of images (searched recursively)."),
    run: Path | None = typer.Option(
        None, "--run", help="Run folder from `ped train`, or a .pt checkpoint in it (default: the newest)."
    ),
    queries: Path | None = typer.Option(None, "--queries", help="Also read queries from a file, one a line."),
    top: int = typer.Option(10, "--top", min=1, help="Matches to show per query."),
    min_score: float | None = typer.Option(None, "--min-score", help="Drop matches scoring below this."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout instead of tables."),
    html: Path | None = typer.Option(None, "--html", help="Write a self-contained HTML page here."),
    index: str = typer.Option(
        "auto",
        "--index",
        help="Shortlist search: auto, flat (exact), faiss (IVF), sq8 or pq (compressed; auto: pq above 2M).",
    ),
    rerank_top: int = typer.Option(
        100, "--rerank-top", min=1, help="Score this many cosine-shortlisted images exactly per query."
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Feature cache (default GALLERY/.pedcli)."
    ),
    checkpoint: str = typer.Option("best", "--checkpoint", help="Checkpoint of the run: best or last."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per encoder call."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA if any)."),
    force: bool = typer.Option(False, "--force", help="Replace an --html file that pedcli did not write."),
) -> None:
    """Rank the images of a folder by a sentence; features are cached, so later queries are fast."""
    from pedcli.engine.search.query import query_gallery, read_queries
    from pedcli.engine.search.report import dump_json, is_query_page, print_tables, write_html
    from pedcli.fileio import check_output
    from pedcli.logs import log_to

    if html is not None:  # before the gallery is embedded, not after
        check_output(html, "ped query HTML page", is_query_page, force)
    sentences = list(text or []) + (read_queries(queries) if queries is not None else [])
    run = run or _newest_run(checkpoint)
    with log_to(console=console):
        report = query_gallery(
            run, gallery, sentences, top=top, min_score=min_score, index=index, rerank_top=rerank_top,
            cache_dir=cache_dir, checkpoint=checkpoint, batch_size=batch_size, device=device,
            explain=html is not None,
        )  # fmt: skip
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun the ranks shared the embedding; rank 0 reports
        return
    for path, reason in report.skipped:
        console.print(f"[yellow]skipped[/] {escape(f'{path}: {reason}')}", highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(dump_json(report))
    else:
        print_tables(report, Console())
    if html is not None:
        console.print(f"wrote {write_html(html, report)}", markup=False)


@app.command()
@friendly
def serve(
    gallery: Path = typer.Option(..., "--gallery", help="Folder of images (searched recursively)."),
    run: Path | None = typer.Option(None, "--run", help="Run folder (default: the newest under runs/)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; non-local needs --token."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    token: str | None = typer.Option(
        None, "--token", help="Secret every request must carry (required with a non-local --host)."
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Feature cache (default GALLERY/.pedcli)."
    ),
    checkpoint: str = typer.Option("best", "--checkpoint", help="Checkpoint of the run: best or last."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per encoder call."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA if any)."),
) -> None:
    """Search a gallery from the browser: a page and a JSON API (/api/search, /api/similar/ID)."""
    from pedcli.logs import log_to
    from pedcli.serve.server import check_listen, run_server
    from pedcli.serve.service import SearchService

    check_listen(host, token)  # before loading anything: a refused --host fails fast
    with log_to(console=console):  # the gallery's messages, at start and from later syncs
        service = SearchService(
            run or _newest_run(checkpoint),
            gallery,
            checkpoint=checkpoint,
            cache_dir=cache_dir,
            device=device,
            batch_size=batch_size,
        )
        run_server(service, host, port, token, console)


# ---- ped runs ----------------------------------------------------------------------------------------
runs_app = typer.Typer(
    help="List the training runs under runs/ (method, cache, epochs done/planned, best val R@1 and its "
    "epoch, test R@1/mAP from `ped eval`, wall time, finished/interrupted/running); `show` and `compare` "
    "look closer."
)
app.add_typer(runs_app, name="runs")
_RUNS_ROOT_HELP = "Folder holding the runs."


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    from rich.table import Table

    from pedcli.engine.run_summary import format_cell

    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(format_cell(v) for v in row))
    # piped or redirected: no terminal width to fit, so nothing is cut to "…" (grep finds every cell)
    Console(width=None if sys.stdout.isatty() else 1000).print(table)


@runs_app.callback(invoke_without_command=True)
@friendly
def runs_list(
    ctx: typer.Context,
    root: Path = typer.Option(Path(RUNS_DIR), "--root", help=_RUNS_ROOT_HELP),
    method: str | None = typer.Option(None, "--method", help="Only the runs of this method."),
    sort: str = typer.Option("newest", "--sort", help="newest, name, method, best (val R@1) or test (R@1)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout instead of a table."),
) -> None:
    """List the runs: method, cache, epochs done/planned, best val R@1 and its epoch, test R@1/mAP (from
    `ped eval`), wall time, state (finished, interrupted, running)."""
    import json

    from pedcli.engine.run_summary import format_seconds, list_summaries

    if ctx.invoked_subcommand is not None:
        return
    rows = list_summaries(root, method=method, sort=sort)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    if not rows:
        console.print(f"no runs under {root}/" + (f" of method {method}" if method else ""), highlight=False)
        return
    columns = ("run", "method", "cache", "epochs", "val R@1", "best at", "test R@1", "test mAP", "time")
    table = []
    for r in rows:
        epochs = f"{r.epochs_done}/{r.epochs_planned}"
        metrics = (r.best_val_r1, r.best_epoch, r.test_r1, r.test_map, format_seconds(r.wall_s))
        table.append((r.name, r.method, r.cache, epochs, *metrics, r.state))
    _table(f"runs under {root}/", (*columns, "state"), table)


@runs_app.command("show")
@friendly
def runs_show(
    run: str = typer.Argument(..., help="Run folder, or a run's name under --root."),
    root: Path = typer.Option(Path(RUNS_DIR), "--root", help=_RUNS_ROOT_HELP),
    plot: Path | None = typer.Option(None, "--plot", help="Draw loss and val R@1 per epoch into this PNG."),
    config_out: Path | None = typer.Option(
        None, "--config-out", help="Write the run's resolved options as a TOML file for `ped train --config`."
    ),
) -> None:
    """A run's resolved config and its per-epoch table."""
    from pedcli.cli_options import options_toml
    from pedcli.engine.run_summary import EPOCH_COLUMNS, epoch_rows, find_run, flat_config, plot_run
    from pedcli.engine.runs import read_config
    from pedcli.fileio import write_text_atomic

    run_dir = find_run(run, root)
    config = read_config(run_dir)
    _table(f"{run_dir}: resolved config", ("option", "value"), list(flat_config(config).items()))
    _table(f"{run_dir}: epochs", EPOCH_COLUMNS, epoch_rows(run_dir))
    if plot is not None:
        console.print(f"wrote {plot_run(run_dir, plot)}", highlight=False, markup=False)
    if config_out is not None:
        write_text_atomic(config_out, options_toml(config))
        console.print(
            f"wrote {config_out} (repeat the run: ped train --config {config_out})",
            highlight=False,
            markup=False,
        )


@runs_app.command("compare")
@friendly
def runs_compare(
    names: list[str] = typer.Argument(..., help="Two or more run folders, or names under --root."),
    root: Path = typer.Option(Path(RUNS_DIR), "--root", help=_RUNS_ROOT_HELP),
) -> None:
    """The options in which runs differ, and their metrics, side by side."""
    from pedcli.engine.run_summary import compare_rows, find_run

    if len(names) < 2:
        raise PedError("compare needs two or more runs", "e.g. ped runs compare mgel mgel-2")
    run_dirs = [find_run(name, root) for name in names]
    differ, metrics = compare_rows(run_dirs)
    columns = ("", *(p.name for p in run_dirs))
    _table("options that differ", columns, differ or [("(none: same options)", *("" for _ in run_dirs))])
    _table("metrics", columns, metrics)
