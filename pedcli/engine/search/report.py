"""`ped query` output: a Rich table for people, JSON for scripts, a self-contained HTML page to look at.

JSON (`QUERY_JSON_FORMAT`):
    {"format": 1, "run": str, "checkpoint": str, "method": str, "gallery": str, "index": "flat"|"faiss",
     "gallery_size": int, "embedded": int, "skipped": [{"path": str, "reason": str}],
     "queries": [{"query": str, "phrases": [str], "unknown_words": [str],
                  "results": [{"rank": int, "score": float, "path": str}]}]}
Scores are written unrounded: one copied into `--min-score` (or the page's min score) keeps its result.
The HTML page embeds each thumbnail as a base64 JPEG (no file beside it is needed) and, where the method
explains its matches, draws the attention over the thumbnail and lists the noun phrases with the part
each one matched.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pedcli.data.images import load_rgb
from pedcli.engine.search.explain_view import View
from pedcli.engine.search.query import QueryReport
from pedcli.fileio import write_text_atomic

QUERY_JSON_FORMAT = 1
THUMB_HW = (192, 96)


def to_json(report: QueryReport) -> dict[str, Any]:
    return {
        "format": QUERY_JSON_FORMAT,
        "run": str(report.run.resolve()),
        "checkpoint": str(report.checkpoint.resolve()),
        "method": report.method,
        "gallery": str(report.gallery.resolve()),
        "index": report.index,
        "gallery_size": report.gallery_size,
        "embedded": report.embedded,
        "skipped": [{"path": str(p.resolve()), "reason": r} for p, r in report.skipped],
        "queries": [
            {
                "query": res.query,
                "phrases": res.phrases,
                "unknown_words": res.unknown,
                "results": [
                    {"rank": m.rank, "score": m.score, "path": str(m.path.resolve())} for m in res.matches
                ],
            }
            for res in report.results
        ],
    }


def print_tables(report: QueryReport, console: Console) -> None:
    for res in report.results:
        unknown = f"words not in the run's vocabulary: {', '.join(res.unknown)}" if res.unknown else None
        table = Table(
            title=escape(f"“{res.query}”"),
            title_justify="left",
            caption=escape(unknown) if unknown else None,
            caption_justify="left",
        )
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        table.add_column("path")
        for m in res.matches:
            table.add_row(str(m.rank), f"{m.score:.4f}", escape(_shown_path(m.path, report.gallery)))
        no_match = f"“{res.query}”: no match" + (f" ({unknown})" if unknown else "")
        console.print(table if res.matches else escape(no_match))


def _shown_path(path: Path, gallery: Path) -> str:
    try:
        return path.relative_to(gallery).as_posix()
    except ValueError:
        return str(path)


def thumbnail_jpeg(path: Path) -> bytes:
    """A small JPEG of the image (the HTML page embeds it, `ped serve` sends it)."""
    im = Image.fromarray(load_rgb(path))  # 16-bit images scaled, not clipped to white
    im.thumbnail((THUMB_HW[1], THUMB_HW[0]))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def thumbnail_uri(path: Path) -> str:
    """A small JPEG of the image as a data: URI."""
    return "data:image/jpeg;base64," + base64.b64encode(thumbnail_jpeg(path)).decode("ascii")


def _overlay(view: View) -> str:
    """Absolutely placed cells over the thumbnail, tinted by attention (squared, so weak cells stay clear);
    kept regions get an outline."""
    if view.grid is None:
        return ""
    rows, cols = view.grid.shape
    cells = []
    for r in range(rows):
        for c in range(cols):
            sel = view.selected is not None and bool(view.selected[r, c])
            cells.append(
                f'<div class="cell{" sel" if sel else ""}" style="top:{100 * r / rows:.3f}%;'
                f"left:{100 * c / cols:.3f}%;height:{100 / rows:.3f}%;width:{100 / cols:.3f}%;"
                f'background:rgba(255,40,0,{0.55 * float(view.grid[r, c]) ** 2:.3f})"></div>'
            )
    return f'<div class="overlay" title="{html.escape(view.label)}">{"".join(cells)}</div>'


def _card(m: Any, gallery: Path) -> str:
    view: View = m.view
    phrases = "".join(
        f"<li><b>{html.escape(p)}</b> → {html.escape(part)} <span>{w:.2f}</span></li>"
        for p, part, w in view.phrases
    )
    name = html.escape(_shown_path(m.path, gallery))
    uri = thumbnail_uri(m.path)
    explained = (  # the image beside its attention, as the papers' figures show them
        f'<div class="thumb"><img alt="attention on {name}" src="{uri}">{_overlay(view)}</div>'
        if view.grid is not None
        else ""
    )
    return (
        f'<figure class="match"><div class="rank">#{m.rank}</div>'
        f'<div class="thumbs"><div class="thumb"><img alt="{name}" src="{uri}"></div>{explained}</div>'
        f'<figcaption><div class="score">{m.score:.4f}</div><div class="path">{name}</div>'
        f"{f'<div class=label>{html.escape(view.label)}</div>' if view.label else ''}"
        f"{f'<ul class=phrases>{phrases}</ul>' if phrases else ''}</figcaption></figure>"
    )


CSS = """
body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
h1{font-size:20px} h2{font-size:17px;margin-top:28px} .meta{color:#666;font-size:13px}
.matches{display:flex;flex-wrap:wrap;gap:14px} .match{margin:0;min-width:140px;max-width:240px;
background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px} .rank{font-weight:bold;font-size:13px}
.thumbs{display:flex;gap:4px} .thumb{position:relative;display:inline-block;line-height:0}
.thumb img{height:192px;width:auto}
.overlay{position:absolute;inset:0} .cell{position:absolute;box-sizing:border-box}
.cell.sel{outline:1px solid #ffd400;outline-offset:-1px}
.score{font-size:15px;font-weight:bold} .path{font-size:11px;color:#555;word-break:break-all}
.label{font-size:11px;color:#a33} .phrases{font-size:11px;padding-left:14px;margin:4px 0}
.phrases span{color:#888} .none{color:#a33} .skipped{font-size:12px;color:#a33}
"""


def to_html(report: QueryReport) -> str:
    sections = []
    for res in report.results:
        cards = "".join(_card(m, report.gallery) for m in res.matches)
        body = f'<div class="matches">{cards}</div>' if cards else '<p class="none">no match</p>'
        phrases = ", ".join(html.escape(p) for p in res.phrases)
        sections.append(
            f'<section class="query"><h2>“{html.escape(res.query)}”</h2>'
            f'<p class="meta">noun phrases: {phrases or "none"}</p>{body}</section>'
        )
    skipped = "".join(f"<li>{html.escape(str(p))}: {html.escape(r)}</li>" for p, r in report.skipped)
    meta = (
        f"method {html.escape(report.method)} · run {html.escape(str(report.run))} · "
        f"{report.gallery_size} images in {html.escape(str(report.gallery))} · index {report.index}"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>ped query</title>'
        f'<style>{CSS}</style></head><body><h1>ped query</h1><p class="meta">{meta}</p>'
        f"{''.join(sections)}"
        f"{f'<h2>skipped</h2><ul class=skipped>{skipped}</ul>' if skipped else ''}</body></html>\n"
    )


def write_html(path: str | Path, report: QueryReport) -> Path:
    write_text_atomic(path, to_html(report))
    return Path(path)


def is_query_page(path: Path) -> bool:
    """Whether `path` is a page `write_html` wrote (replacing it needs no --force)."""
    head = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>ped query</title>'
    try:
        with open(path, "rb") as f:
            return f.read(len(head)) == head.encode()
    except OSError:
        return False


def dump_json(report: QueryReport) -> str:
    return json.dumps(to_json(report), indent=2, ensure_ascii=False)
