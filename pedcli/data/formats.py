"""Dataset adapters: each annotation format becomes one list of `Record`s (IRRA-style registry).

Formats (data/README.md shows the folder layouts):

- ``cuhk-pedes``: ``reid_raw.json`` or ``caption_all.json`` — a list of ``{id, file_path, captions, split,
  processed_tokens?}``. ``caption_all.json`` may come without ``split``: then the standard CUHK-PEDES split
  by identity order applies (ids sorted ascending: the first 11,003 train, the next 1,000 val, the last
  1,000 test, i.e. ids 1–11003 / 11004–12003 / 12004–13003), which needs all 13,003 identities.
- ``rstpreid``: ``data_captions.json`` — the same with ``img_path`` instead of ``file_path``.
- ``icfg-pedes``: ``ICFG-PEDES.json`` — only train and test; val is carved from train by identity: the
  last 5% of the train ids sorted ascending (at least one id), so the rule is deterministic and the
  carved val never shares an identity with train.
- ``synth``: ``ped synth`` output, the CUHK-PEDES layout plus ``keypoints`` ([[x, y, v] × 14]).

Image paths in the annotation files are relative to ``ROOT/imgs/`` in the released datasets, but some
re-packagings make them relative to ``ROOT``; the adapter probes the first records and picks the base
that holds them, and `Record.path` is relative to ``ROOT`` (an absolute annotated path stays absolute).

`validate_records` then checks what a json cannot: image files that are missing, unreadable or truncated,
empty or wordless captions, captions with control characters, duplicate paths (compared resolved),
paths outside ROOT, unknown split names — and either fails listing them or drops them with a report,
never silently. An identity in two splits is always refused: it would leak a test person into training.
"""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NamedTuple

from PIL import Image

from pedcli.data.schema import KEYPOINTS, SPLITS, Record
from pedcli.errors import PedError

OnError = Literal["fail", "skip"]
CUHK_STANDARD_SPLIT = (("train", 11003), ("val", 1000), ("test", 1000))  # identities, in id order
ICFG_VAL_FRACTION = 0.05
IMAGE_DIR = "imgs"
_PROBE = 50  # records probed to decide whether paths are relative to ROOT or ROOT/imgs
_SHOWN = 20  # problems listed in a failure message


@dataclass(frozen=True)
class Format:
    """How one dataset's annotation file reads: its default file names and the json key of the path."""

    name: str
    annotation_files: tuple[str, ...]  # tried in order under ROOT
    path_key: str
    keypoints: bool = False
    finalize: Callable[[list[Record]], list[Record]] | None = None  # split post-processing (ICFG val)


def _carve_icfg_val(records: list[Record]) -> list[Record]:
    """ICFG-PEDES has no val split: move the last 5% of train identities (sorted by id) to val.

    A file that already has val records (a re-packaging) is left as it is.
    """
    if any(r.split == "val" for r in records):
        return records
    train_ids = sorted({r.pid for r in records if r.split == "train"})
    n_val = max(1, round(len(train_ids) * ICFG_VAL_FRACTION)) if len(train_ids) > 1 else 0
    val_ids = set(train_ids[len(train_ids) - n_val :])
    return [dataclasses.replace(r, split="val") if r.pid in val_ids else r for r in records]


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Make a format available as `ped preprocess --dataset NAME` (one registry, IRRA-style)."""
    _FORMATS[fmt.name] = fmt
    return fmt


register_format(Format("cuhk-pedes", ("reid_raw.json", "caption_all.json"), "file_path"))
register_format(Format("rstpreid", ("data_captions.json",), "img_path"))
register_format(Format("icfg-pedes", ("ICFG-PEDES.json",), "file_path", finalize=_carve_icfg_val))
register_format(Format("synth", ("reid_raw.json",), "file_path", keypoints=True))


def list_formats() -> list[str]:
    return sorted(_FORMATS)


def _format(dataset: str) -> Format:
    if dataset not in _FORMATS:
        raise PedError(f"unknown dataset format '{dataset}'", f"choose one of: {', '.join(list_formats())}")
    return _FORMATS[dataset]


def annotation_path(dataset: str, root: Path, annotations: Path | None = None) -> Path:
    """The annotation file to read: `annotations` if given, else the dataset's default under `root`."""
    fmt = _format(dataset)
    if annotations is not None:
        if not Path(annotations).is_file():
            raise PedError(f"annotation file {annotations} not found", "check the --annotations path")
        return Path(annotations)
    candidates = [Path(root) / name for name in fmt.annotation_files]
    for path in candidates:
        if path.is_file():
            return path
    expected = " or ".join(str(p) for p in candidates)
    raise PedError(
        f"no {dataset} annotation file: expected {expected}",
        "point --root at the dataset folder, or pass the file with --annotations FILE (data/README.md)",
    )


def _read_json_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PedError(
            f"cannot read {path} as JSON ({e})", "check that the file is complete and UTF-8"
        ) from e
    if not isinstance(data, list):
        raise PedError(
            f"{path} holds a {type(data).__name__}, expected a list of records", "see data/README.md"
        )
    return data


def _field(entry: Any, key: str, index: int, path: Path) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise PedError(
            f"{path}: record {index} has no '{key}'",
            "repair that record, or pass the right --dataset for this file (data/README.md lists the keys)",
        )
    return entry[key]


def _parse_keypoints(value: Any, index: int, path: Path) -> tuple[tuple[float, float, float], ...]:
    try:
        points = tuple((float(x), float(y), float(v)) for x, y, v in value)
    except (TypeError, ValueError) as e:
        raise PedError(
            f"{path}: record {index} has malformed 'keypoints' ({e})", "expected [[x, y, v] × 14]"
        ) from e
    if len(points) != len(KEYPOINTS):
        raise PedError(
            f"{path}: record {index} has {len(points)} keypoints, expected {len(KEYPOINTS)}",
            "keypoints follow the 14-point order of pedcli.data.schema.KEYPOINTS",
        )
    return points


class _Entry(NamedTuple):
    """One json record, parsed; the image path is still as annotated and split may be missing."""

    raw_path: str
    pid: int
    split: str | None
    captions: tuple[str, ...]
    keypoints: tuple[tuple[float, float, float], ...] | None


def _integer_id(value: Any) -> int | None:
    """An identity as an int: a JSON integer, an integral float (5.0) or a string of digits; else None
    (5.5, 1.99, true, "abc" are refused rather than truncated, which would merge two people)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _parse(entry: Any, index: int, fmt: Format, path: Path) -> _Entry:
    """Check one json record's keys and types; captions are kept as annotated (validation cleans them)."""
    raw_path = _field(entry, fmt.path_key, index, path)
    raw_pid = _field(entry, "id", index, path)
    captions = _field(entry, "captions", index, path)
    pid = _integer_id(raw_pid)
    if pid is None:
        raise PedError(
            f"{path}: record {index} has a non-integer 'id' {json.dumps(raw_pid)}",
            "ids must be whole numbers; repair that record",
        )
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise PedError(f"{path}: record {index} has 'captions' that are not a list of strings", "repair it")
    split = entry.get("split")
    keypoints = (
        _parse_keypoints(_field(entry, "keypoints", index, path), index, path) if fmt.keypoints else None
    )
    return _Entry(
        str(raw_path).replace("\\", "/"),
        pid,
        None if split is None else str(split),
        tuple(captions),
        keypoints,
    )


def _image_prefix(root: Path, raw_paths: Sequence[str]) -> str:
    """'imgs/' when the paths are relative to ROOT/imgs, '' when relative to ROOT (whichever holds more of
    the first records; ROOT/imgs wins a tie when it exists, as in the released datasets)."""
    probe = raw_paths[:_PROBE]
    in_root = sum((root / p).is_file() for p in probe)
    in_imgs = sum((root / IMAGE_DIR / p).is_file() for p in probe)
    if in_imgs > in_root or (in_imgs == in_root and (root / IMAGE_DIR).is_dir()):
        return f"{IMAGE_DIR}/"
    return ""


def _joined(prefix: str, raw_path: str) -> str:
    return raw_path if PurePosixPath(raw_path).is_absolute() else prefix + raw_path


def _standard_cuhk_splits(pids: Sequence[int], path: Path) -> dict[int, str]:
    ids = sorted(set(pids))
    expected = sum(n for _, n in CUHK_STANDARD_SPLIT)
    if len(ids) != expected:
        raise PedError(
            f"{path} has no 'split' and {len(ids)} identities; the standard CUHK-PEDES split "
            f"by identity order needs all {expected}",
            "use reid_raw.json (it carries the split), or add a 'split' field to every record",
        )
    out: dict[int, str] = {}
    start = 0
    for name, n in CUHK_STANDARD_SPLIT:
        out.update(dict.fromkeys(ids[start : start + n], name))
        start += n
    return out


def load_records(dataset: str, root: Path, annotations: Path | None = None) -> list[Record]:
    """Read a dataset's annotation file into Records (paths relative to `root`, captions as annotated).

    Captions and images are not checked here; `validate_records` does that and reports what it drops.
    """
    fmt = _format(dataset)
    root = Path(root)
    path = annotation_path(dataset, root, annotations)
    parsed = [_parse(entry, i, fmt, path) for i, entry in enumerate(_read_json_list(path))]
    if not parsed:
        raise PedError(f"{path} holds no records", "check that it is the right annotation file")
    with_split = [e.split is not None for e in parsed]
    if not all(with_split):
        if any(with_split):
            index = with_split.index(False)
            raise PedError(
                f"{path}: record {index} has no 'split' (other records have one)", "repair that record"
            )
        if fmt.name != "cuhk-pedes":
            raise PedError(
                f"{path}: record 0 has no 'split'", f"{dataset} annotations must give each record's split"
            )
        by_id = _standard_cuhk_splits([e.pid for e in parsed], path)
        parsed = [e._replace(split=by_id[e.pid]) for e in parsed]
    prefix = _image_prefix(root, [e.raw_path for e in parsed])
    records = [  # an absolute path stays absolute (validation refuses it unless allowed outside ROOT)
        Record(str(PurePosixPath(_joined(prefix, e.raw_path))), e.pid, str(e.split), e.captions, e.keypoints)
        for e in parsed
    ]
    return fmt.finalize(records) if fmt.finalize else records


# ---- validation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    index: int  # position in the records given to validate_records
    path: str
    # missing_image | unreadable_image | no_captions | bad_caption | duplicate_path | outside_root |
    # unknown_split; empty_captions (a note)
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"record {self.index} ({self.path}): {self.kind}: {self.detail}"


@dataclass
class ValidationReport:
    """What validation found. `problems` make a record bad (dropped under `skip`); `notes` are repairs
    made to records that were kept (e.g. empty captions removed beside non-empty ones)."""

    total: int
    kept: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)

    @property
    def bad_indices(self) -> list[int]:
        return sorted({p.index for p in self.problems})

    def summary(self, limit: int = _SHOWN) -> str:
        lines = [f"{self.total} records, {len(self.bad_indices)} bad, {len(self.notes)} repaired"]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more problems")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"bad": len(self.bad_indices)}


def check_image(path: Path) -> str | None:
    """None if the image decodes completely, else why not (a truncated file fails in `load`)."""
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as im:
            # JPEG decodes at 1/8 scale: every byte is still read, so truncation still fails, ~25% faster
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb…)
        return f"{type(e).__name__}: {e}"
    return None


def _control_chars(text: str) -> str:
    """The control characters in `text` (NUL and the like break HDF5 strings and tokenizers), escaped."""
    bad = sorted({c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r"})
    return ", ".join(repr(c) for c in bad)


def _split_leaks(records: Sequence[Record]) -> dict[int, list[str]]:
    """Identities annotated in more than one split, with those splits."""
    splits: dict[int, set[str]] = {}
    for rec in records:
        splits.setdefault(rec.pid, set()).add(rec.split)
    return {pid: sorted(s) for pid, s in sorted(splits.items()) if len(s) > 1}


def validate_records(
    records: Sequence[Record],
    root: Path,
    on_error: OnError = "fail",
    workers: int = 4,
    *,
    words: Callable[[str], Sequence[str]] | None = None,
    allow_outside_root: bool = False,
) -> tuple[list[Record], ValidationReport]:
    """Check records against the files under `root`; `workers` threads decode the images.

    `fail` raises a PedError listing the problems; `skip` drops the bad records and returns the report,
    which the caller prints or saves. Records keep only their captions that are non-empty and, when the
    caller passes its tokenizer as `words`, hold at least one word (an emoji-only caption has none).
    Paths are compared and contained after resolving (`..`, symlinks): one that resolves outside `root`
    is a problem unless `allow_outside_root`. ROOT/imgs may itself be a link to the image folder (a
    common setup): what it resolves to counts as inside.
    """
    if on_error not in ("fail", "skip"):
        raise PedError(f"unknown --on-error policy '{on_error}'", "use fail or skip")
    leaks = _split_leaks(records)
    if leaks:
        shown = "; ".join(f"id {pid} in {' and '.join(s)}" for pid, s in list(leaks.items())[:_SHOWN])
        more = f" (and {len(leaks) - _SHOWN} more)" if len(leaks) > _SHOWN else ""
        raise PedError(
            f"{len(leaks)} identities appear in more than one split, so a test person would be trained "
            f"on: {shown}{more}",
            "give each identity one split (datasets split by identity; data/README.md)",
        )
    root = Path(root)
    inside = (root.resolve(), (root / IMAGE_DIR).resolve())
    report = ValidationReport(total=len(records))
    cleaned: list[Record] = []
    seen: dict[Path, int] = {}
    to_decode: list[int] = []
    for i, rec in enumerate(records):
        caps = tuple(c.strip() for c in rec.captions if c.strip() and (words is None or words(c)))
        cleaned.append(dataclasses.replace(rec, captions=caps))
        if rec.split not in SPLITS:
            report.problems.append(
                Problem(i, rec.path, "unknown_split", f"'{rec.split}' is not one of {SPLITS}")
            )
        if not caps:
            report.problems.append(Problem(i, rec.path, "no_captions", "no caption has a word"))
        elif len(caps) < len(rec.captions):
            dropped = len(rec.captions) - len(caps)
            report.notes.append(
                Problem(i, rec.path, "empty_captions", f"dropped {dropped} empty or wordless caption(s)")
            )
        control = ", ".join(filter(None, (_control_chars(c) for c in caps)))
        if control:
            report.problems.append(
                Problem(i, rec.path, "bad_caption", f"a caption holds control characters ({control})")
            )
        real = (root / rec.path).resolve()
        if not allow_outside_root and not any(real.is_relative_to(d) for d in inside):
            report.problems.append(
                Problem(i, rec.path, "outside_root", f"resolves to {real}, outside the root {inside[0]}")
            )
        elif real in seen:
            report.problems.append(
                Problem(i, rec.path, "duplicate_path", f"same image as record {seen[real]}")
            )
        else:
            seen[real] = i
            to_decode.append(i)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda i: check_image(root / records[i].path), to_decode)
        for i, why in zip(to_decode, results, strict=True):
            if why == "missing":
                report.problems.append(
                    Problem(i, records[i].path, "missing_image", f"no file {root / records[i].path}")
                )
            elif why is not None:
                report.problems.append(Problem(i, records[i].path, "unreadable_image", why))
    report.problems.sort(key=lambda p: p.index)
    bad = set(report.bad_indices)
    if bad and on_error == "fail":
        outside = any(p.kind == "outside_root" for p in report.problems)
        raise PedError(
            f"{len(bad)} of {len(records)} records are bad:\n{report.summary()}",
            "repair or remove those files/records, or pass `--on-error skip` to drop them "
            "(the report lists each one)"
            + ("; `--allow-outside-root` reads paths outside the root" if outside else ""),
        )
    kept = [rec for i, rec in enumerate(cleaned) if i not in bad]
    report.kept = len(kept)
    return kept, report
