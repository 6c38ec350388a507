"""Text preprocessing shared by `ped preprocess` (batches of captions) and `ped query` (one sentence).

Both go through `TextPipeline.encode`, so a query is tokenised, chunked and word-pieced exactly like the
training captions. Heavy libraries (spaCy, transformers) load lazily, once per process.
"""

from pedcli.text.options import TextOptions
from pedcli.text.pipeline import TextPipeline, TextStats
from pedcli.text.vocab import PAD, UNK, Vocab, vocab_from_records

__all__ = ["PAD", "UNK", "TextOptions", "TextPipeline", "TextStats", "Vocab", "vocab_from_records"]
