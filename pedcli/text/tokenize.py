"""Word tokenisation: lowercase NLTK Treebank tokens, one sentence at a time.

Treebank splits only a string-final period ("shoes. he" would stay "shoes."), and punkt needs a data
download, so sentences are split here with a regex first. Commas and periods are kept as tokens by default
(they mark clause and sentence ends for the LSTM and the POS tagger); quotes, brackets and the like are
dropped.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_MISSING_SPACE = re.compile(r"([.!?;,])(?=[^\W\d_])")  # "shirt.she" / "shirt,and": annotators' typos
_SPACES = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORDLIKE = re.compile(r"\w")


def normalize(caption: str) -> str:
    """A space after punctuation glued to the next word, single spaces; case is kept.

    Both the word tokenizer and the BERT tokenizer read this form, so their sentence splits agree.
    """
    return _SPACES.sub(" ", _MISSING_SPACE.sub(r"\1 ", caption)).strip()


@lru_cache(maxsize=1)
def _treebank() -> Any:
    from nltk.tokenize import TreebankWordTokenizer  # imported on first use: nltk takes ~1 s to import

    return TreebankWordTokenizer()


def tokenize_words(caption: str, keep_punct: str = ",.") -> list[str]:
    """Lowercase word tokens of a caption; punctuation-only tokens survive only if listed in keep_punct."""
    tokenizer = _treebank()
    tokens: list[str] = []
    for sentence in _SENTENCE_END.split(normalize(caption).lower()):
        tokens.extend(
            t
            for t in tokenizer.tokenize(sentence)
            if _WORDLIKE.search(t) or (len(t) == 1 and t in keep_punct)
        )
    return tokens
