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
