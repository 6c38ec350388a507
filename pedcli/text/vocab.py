"""The word vocabulary: built on training captions only, so val/test words a model never saw are <unk>."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from pedcli.data.schema import Record
from pedcli.errors import PedError
from pedcli.fileio import write_json_atomic
from pedcli.text.options import TextOptions
from pedcli.text.tokenize import tokenize_words

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1


class Vocab:
    """id → word list with "<pad>" at 0 and "<unk>" at 1; the list is the whole saved state."""

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        if words[:2] != [PAD, UNK]:
            raise PedError(
                f"a vocabulary must start with {PAD!r}, {UNK!r}; this one starts with {words[:2]}",
                "rebuild the cache with `ped preprocess`",
            )
        if len(set(words)) != len(words):
            raise PedError("the vocabulary lists a word twice", "rebuild the cache with `ped preprocess`")
        self.words = words
        self._ids = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], min_count: int = 2) -> Vocab:
        """Words seen at least `min_count` times, most frequent first, ties alphabetical (deterministic)."""
        counts = Counter(t for tokens in token_lists for t in tokens)
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([PAD, UNK, *(w for w in kept if w not in (PAD, UNK))])

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.words == other.words

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self._ids.get(t, UNK_ID) for t in tokens]

    def unknown(self, tokens: Iterable[str]) -> list[str]:
        """The tokens this vocabulary maps to <unk>, once each, in order of appearance."""
        return list(dict.fromkeys(t for t in tokens if t not in self._ids))

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of the non-pad ids (for reports and checks)."""
        return [self.words[int(i)] for i in ids if int(i) != PAD_ID]

    def to_array(self) -> np.ndarray:
        """The text.h5 `vocab` dataset (variable-length str)."""
        return np.array(self.words, dtype=object)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.words)

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        try:
            words = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise PedError(
                f"cannot read the vocabulary {path} ({e})", "rebuild it with `ped preprocess`"
            ) from e
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise PedError(f"{path} is not a JSON list of words", "rebuild it with `ped preprocess`")
        return cls(words)


def vocab_from_records(records: Iterable[Record], options: TextOptions | None = None) -> Vocab:
    """The vocabulary of the train-split captions; other splits are skipped, never counted."""
    opts = options or TextOptions()
    return Vocab.build(
        (tokenize_words(c, opts.keep_punct) for r in records if r.split == "train" for c in r.captions),
        opts.min_count,
    )
