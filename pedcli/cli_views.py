"""How `ped` shows what the library returns: Rich renderings of plain records (the library draws none)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pedcli.data.schema import SPLITS


def print_cache_summary(summary: dict[str, Any], console: Console) -> None:
    """`ped preprocess --check`: the per-split counts of `check_cache`'s summary, then the rest in a line."""
    table = Table(title=escape(f"cache {summary['cache']} ({summary['dataset']})"))
    for column in ("split", "images", "captions", "identities"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for s in SPLITS:
        table.add_row(s, *(str(summary[key][s]) for key in ("images", "captions", "identities")))
    console.print(table)
    h, w = summary["image_size"]
    console.print(
        f"vocabulary {summary['vocab_size']} words · {summary['phrases_per_caption']:.2f} noun phrases "
        f"per caption · pose {summary['pose']} · image size {h}×{w}",
        markup=False,
    )
    console.print("[green]cache OK[/]")


def metrics_table(result: dict[str, Any]) -> Table:
    """`ped eval`: one row per reported ranking of `evaluate`'s record: final t2i / i2t, then (when
    present) before re-ranking, exact, Δ; a column per R@K it computed, then mAP and mINP."""
    cols = [k for k in result["t2i"] if k.startswith("R@")] + ["mAP", "mINP"]
    table = Table(title=f"retrieval ({result['scoring']})")
    table.add_column("task")
    for c in cols:
        table.add_column(c, justify="right")
    rows: list[tuple[str, dict[str, Any], str]] = [("t2i", result["t2i"], ""), ("i2t", result["i2t"], "")]
    if "t2i_before_rerank" in result:
        rows.insert(1, ("t2i before re-ranking", result["t2i_before_rerank"], ""))
    if "exact" in result:
        rows += [(f"{d} exact", result["exact"][d], "") for d in ("t2i", "i2t")]
        rows += [(f"{d} two-stage − exact", result["difference"][d], "+") for d in ("t2i", "i2t")]
    for name, m, sign in rows:
        table.add_row(name, *(f"{m[c]:{sign}.2f}" for c in cols))
    return table
