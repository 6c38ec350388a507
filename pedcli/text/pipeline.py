"""One text pipeline for training captions and user queries: caption strings → the text.h5 arrays.

`ped preprocess` calls `encode` on batches (possibly in worker processes: pickling sends only the
vocabulary and options, models reload lazily once per process); `ped query` calls it on one sentence,
rebuilt from the cache's vocabulary and `options` so it is processed exactly as the captions were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from pedcli.errors import PedError, refuse
from pedcli.text.bert import load_tokenizer, word_pieces
from pedcli.text.options import TextOptions
from pedcli.text.phrases import load_spacy, noun_phrases
from pedcli.text.tokenize import normalize, tokenize_words
from pedcli.text.vocab import UNK_ID, Vocab

TEXT_ARRAYS = ("tokens", "length", "phrases", "n_phrases", "bert_ids", "bert_length", "bert_spans", "n_spans")


@dataclass
class TextStats:
    """What encoding cut or could not map, summed over batches for the preprocess report."""

    captions: int = 0
    words: int = 0
    unknown_words: int = 0
    truncated: int = 0
    bert_truncated: int = 0
    phrases_dropped: int = 0
    spans_dropped: int = 0

    def __iadd__(self, other: TextStats) -> TextStats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


def pad_ids(seqs: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 [n, width] zero padded (sequences already cut to width) and int32 lengths."""
    out = np.zeros((len(seqs), width), dtype=np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, np.array([len(s) for s in seqs], dtype=np.int32)


def pad_spans(spans: Sequence[Sequence[tuple[int, int]]], width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """int16 [n, width, 2] spans padded with -1, int16 counts, and how many spans did not fit."""
    out = np.full((len(spans), width, 2), -1, dtype=np.int16)
    counts = np.zeros(len(spans), dtype=np.int16)
    dropped = 0
    for i, s in enumerate(spans):
        kept = s[:width]
        if kept:
            out[i, : len(kept)] = kept
        counts[i] = len(kept)
        dropped += len(s) - len(kept)
    return out, counts, dropped


def _clip(spans: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """Phrases of a truncated caption: cut at the end, dropped if they start past it."""
    return [(s, min(e, length)) for s, e in spans if s < length]


class TextPipeline:
    """Vocabulary + options; spaCy and the BERT tokenizer are loaded on first use, once per process."""

    def __init__(self, vocab: Vocab, options: TextOptions | None = None) -> None:
        self.vocab = vocab
        self.options = options or TextOptions()

    @classmethod
    def from_options(cls, vocab: Vocab | Sequence[str], options: dict[str, Any]) -> TextPipeline:
        """Rebuild from what the cache stores (text.h5 `vocab`, meta `options`)."""
        return cls(vocab if isinstance(vocab, Vocab) else Vocab(vocab), TextOptions.from_dict(options))

    def __getstate__(self) -> dict[str, Any]:
        return {"vocab": self.vocab.words, "options": self.options.to_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.vocab = Vocab(state["vocab"])
        self.options = TextOptions.from_dict(state["options"])

    def load(self) -> TextPipeline:
        """Load spaCy and the tokenizer now, so a missing model fails before any work is done."""
        load_spacy(self.options.phrase_backend)
        load_tokenizer(self.options.bert_model)
        return self

    def tokenize(self, captions: Sequence[str]) -> list[list[str]]:
        """Word tokens of each caption; a caption with no word at all is an error."""
        token_lists = [tokenize_words(c, self.options.keep_punct) for c in captions]
        for caption, tokens in zip(captions, token_lists, strict=True):
            if not tokens:
                raise PedError(
                    f"the caption {caption!r} has no words", "give a sentence describing the person"
                )
        return token_lists

    def unknown_words(self, texts: Sequence[str]) -> list[list[str]]:
        """Per text, its words outside the vocabulary (the model reads each as <unk>). A text with no
        known word at all is refused: any ranking for it would be noise presented as an answer."""
        out = []
        for text, tokens in zip(texts, self.tokenize(texts), strict=True):
            unknown = self.vocab.unknown(tokens)
            if len(unknown) == len(set(tokens)):
                refuse(
                    f"no word of {text!r} is in the run's vocabulary (unknown: {', '.join(unknown)})",
                    "describe the person with words the training captions use (clothes, colours, bags, ...)",
                )
            out.append(unknown)
        return out

    def encode(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        """The text.h5 arrays (TEXT_ARRAYS) of these captions, in order."""
        return self.encode_with_stats(captions)[0]

    def encode_with_stats(self, captions: Sequence[str]) -> tuple[dict[str, np.ndarray], TextStats]:
        opts = self.options
        token_lists = self.tokenize(captions)
        ids = [self.vocab.encode(t[: opts.max_length]) for t in token_lists]
        phrases = [_clip(p, opts.max_length) for p in noun_phrases(token_lists, opts.phrase_backend)]
        pieces = word_pieces(
            load_tokenizer(opts.bert_model), [normalize(c) for c in captions], opts.bert_max_length
        )

        tokens, length = pad_ids(ids, opts.max_length)
        bert_ids, bert_length = pad_ids([p.ids for p in pieces], opts.bert_max_length)
        phrase_arr, n_phrases, phrases_dropped = pad_spans(phrases, opts.max_phrases)
        span_arr, n_spans, spans_dropped = pad_spans([p.spans for p in pieces], opts.max_spans)
        arrays = {
            "tokens": tokens, "length": length, "phrases": phrase_arr, "n_phrases": n_phrases,
            "bert_ids": bert_ids, "bert_length": bert_length, "bert_spans": span_arr, "n_spans": n_spans,
        }  # fmt: skip
        stats = TextStats(
            captions=len(captions),
            words=int(length.sum()),
            unknown_words=int((tokens == UNK_ID).sum()),
            truncated=sum(len(t) > opts.max_length for t in token_lists),
            bert_truncated=sum(p.truncated for p in pieces),
            phrases_dropped=phrases_dropped,
            spans_dropped=spans_dropped,
        )
        return arrays, stats
