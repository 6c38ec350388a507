"""Pretrained word vectors (pedcli/text/word_vectors.py) and the embedding they start (HAN, sec. 4.2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from method_batch import TINY_INFO

from pedcli.errors import PedError
from pedcli.models.methods.base import create_method
from pedcli.models.text_encoders import PAD, RNNTextEncoder
from pedcli.text.word_vectors import MINILM, load_word_vectors

VECTORS = {"Red": [1.0, 0.0, 0.5], "shirt": [0.0, 2.0, -1.0], "bag": [3.0, 3.0, 3.0]}


def write_word2vec(path: Path, vectors: dict[str, list[float]], binary: bool) -> Path:
    """A file in word2vec's own format (`gensim` writes the same bytes)."""
    width = len(next(iter(vectors.values())))
    with path.open("wb") as f:
        f.write(f"{len(vectors)} {width}\n".encode())
        for word, v in vectors.items():
            if binary:
                f.write(word.encode() + b" " + np.asarray(v, dtype="<f4").tobytes() + b"\n")
            else:
                f.write((word + " " + " ".join(map(str, v)) + "\n").encode())
    return path


@pytest.mark.parametrize("name", ["vectors.bin", "vectors.txt"])
def test_word2vec_files_give_each_word_its_vector(tmp_path: Path, name: str) -> None:
    path = write_word2vec(tmp_path / name, VECTORS, binary=name.endswith(".bin"))
    words = ["<pad>", "<unk>", "shirt", "red", "bag", "hat"]
    vectors, found = load_word_vectors(str(path), words)
    assert found.tolist() == [False, False, True, True, True, False]
    np.testing.assert_array_equal(vectors[2], VECTORS["shirt"])
    np.testing.assert_array_equal(vectors[3], VECTORS["Red"])  # looked up lower-cased
    np.testing.assert_array_equal(vectors[5], 0.0)


def test_bad_word2vec_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(PedError, match="no such file") as err:
        load_word_vectors(str(tmp_path / "missing.bin"), ["red"])
    assert "word_vectors=minilm" in err.value.hint
    headless = tmp_path / "headless.txt"
    headless.write_text("red 1 2 3\n")
    with pytest.raises(PedError, match="header"):
        load_word_vectors(str(headless), ["red"])
    short = write_word2vec(tmp_path / "short.bin", VECTORS, binary=True)
    short.write_bytes(short.read_bytes()[:-20])
    with pytest.raises(PedError, match="ends before the 3 vectors"):
        load_word_vectors(str(short), ["bag"])
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("2 3\nred 1 2 3\nshirt 1 2\n")
    with pytest.raises(PedError, match="line 3: 2 values"):
        load_word_vectors(str(ragged), ["shirt"])
    with pytest.raises(PedError, match="none of the vocabulary"):
        load_word_vectors(str(write_word2vec(tmp_path / "other.txt", VECTORS, binary=False)), ["hat"])


def test_minilm_vectors_put_synonyms_nearer_than_unrelated_words() -> None:
    words = ["jacket", "coat", "shoes", "trousers", "pants", "woman", "<pad>", "<unk>"]
    vectors, found = load_word_vectors(MINILM, words)
    assert found.tolist() == [True] * 6 + [False, False] and vectors.shape == (8, 384)  # no "<", "unk", ">"
    assert not vectors[6:].any()
    v = torch.nn.functional.normalize(torch.from_numpy(vectors), dim=1)
    cos = v @ v.T
    assert cos[0, 1] > cos[0, 2] + 0.1  # jacket–coat against jacket–shoes
    assert cos[3, 4] > cos[3, 5] + 0.1  # trousers–pants against trousers–woman


def test_init_words_keeps_the_vectors_directions_at_the_embeddings_own_scale() -> None:
    torch.manual_seed(0)
    encoder = RNNTextEncoder(vocab_size=50, embed_dim=4, hidden=3)
    before = encoder.embed.weight.detach().clone()
    vectors = torch.randn(50, 4) * 0.05  # MiniLM's spread: too small an input for the LSTM as it is
    found = torch.arange(50) % 2 == 0
    found[PAD] = False
    encoder.init_words(vectors, found)
    weight = encoder.embed.weight.detach()
    scale = weight[found] / vectors[found]
    torch.testing.assert_close(scale, torch.full_like(scale, float(scale[0, 0])))  # one factor for all
    assert 0.7 < float(weight[found].std()) < 1.3  # N(0, 1), as the words without vectors
    torch.testing.assert_close(weight[~found][1:], before[~found][1:])
    assert torch.all(weight[PAD] == 0)
    with pytest.raises(PedError, match="4 wide") as err:
        RNNTextEncoder(vocab_size=50, embed_dim=6, hidden=3).init_words(vectors, found)
    assert "word_dim=4" in err.value.hint


def test_han_starts_its_word_embedding_from_the_vectors(tmp_path: Path) -> None:
    path = write_word2vec(tmp_path / "vectors.txt", VECTORS, binary=False)
    words = ["<pad>", "<unk>", "shirt", *(f"w{i}" for i in range(TINY_INFO.vocab_size - 3))]
    tiny = {"pretrained": "none", "embed_dim": 8, "word_dim": 3, "hidden": 5, "attention_dim": 4}
    han = create_method("han", TINY_INFO, tiny | {"word_vectors": str(path)})
    han.init_from_vocab(words)
    row = han.text_encoder.embed.weight[2].detach()
    assert torch.cosine_similarity(row, torch.tensor(VECTORS["shirt"]), dim=0) > 0.9999
    random = create_method("han", TINY_INFO, tiny)
    before = random.text_encoder.embed.weight.detach().clone()
    random.init_from_vocab(words)  # word_vectors=random: the paper's vectors are not there, nothing changes
    torch.testing.assert_close(random.text_encoder.embed.weight.detach(), before)
