"""The text options: saved in the cache meta so `ped query` rebuilds the pipeline preprocess used."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pedcli.errors import PedError

PHRASE_BACKENDS = ("nltk", "spacy")


@dataclass(frozen=True)
class TextOptions:
    """max_length: word tokens kept per caption (longer ones are truncated and counted).
    min_count: a train word seen fewer times maps to <unk> (PMA drops words seen fewer than twice).
    keep_punct: punctuation-only tokens kept as words; every other punctuation token is dropped.
    phrase_backend: "nltk" (RegexpParser over spaCy POS tags, as PMA/MIA) or "spacy" (doc.noun_chunks).
    max_phrases: noun phrases kept per caption (the rest are dropped and counted).
    bert_model: local Hugging Face folder of the word-piece tokenizer; None = the offline MiniLM package.
    bert_max_length: word pieces kept including [CLS] and [SEP].
    max_spans: sub-sentence spans kept per caption (NAFS middle level).
    """

    max_length: int = 64
    min_count: int = 2
    keep_punct: str = ",."
    phrase_backend: str = "nltk"
    max_phrases: int = 16
    bert_model: str | None = None
    bert_max_length: int = 64
    max_spans: int = 8

    def __post_init__(self) -> None:
        if self.phrase_backend not in PHRASE_BACKENDS:
            raise PedError(
                f"unknown noun-phrase backend {self.phrase_backend!r}",
                f"choose one of {', '.join(PHRASE_BACKENDS)}",
            )
        for name in ("max_length", "min_count", "max_phrases", "max_spans"):
            if getattr(self, name) < 1:
                raise PedError(f"text option {name} must be at least 1, got {getattr(self, name)}")
        if self.bert_max_length < 3:
            raise PedError(
                f"bert_max_length must leave room for [CLS], one piece and [SEP], got {self.bert_max_length}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextOptions:
        """From the cache meta's options; other stages' keys (image_size, pose_source) are skipped."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
