"""The text pipeline: tokens, vocabulary, noun phrases, BERT sub-sentence spans, batch = single."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from pedcli.data.schema import Record
from pedcli.errors import PedError
from pedcli.text import PAD, UNK, TextOptions, TextPipeline, Vocab, vocab_from_records
from pedcli.text.bert import load_tokenizer, resolve_bert_model
from pedcli.text.phrases import noun_phrases
from pedcli.text.pipeline import TEXT_ARRAYS
from pedcli.text.tokenize import tokenize_words

EXAMPLE = "A woman wearing a red shirt and black shorts carries a white bag."
CAPTIONS = [
    EXAMPLE,
    "The man has short black hair, a red short-sleeved shirt and white shoes.He carries a black backpack.",
    "A girl in a pink dress, holding an umbrella, walks with a man in a grey coat.",
    "Someone with 1,000 beads on a 3.5 metre scarf",
]


def _words(tokens: list[str], spans: np.ndarray, n: int) -> list[str]:
    return [" ".join(tokens[s:e]) for s, e in spans[:n]]


def _squash(text: str) -> str:
    """Text without spaces: BERT's decode spaces out hyphens and apostrophes."""
    return "".join(text.split())


@pytest.fixture(scope="module")
def pipeline() -> TextPipeline:
    vocab = Vocab.build(
        [tokenize_words(c) for c in CAPTIONS[1:]], min_count=1
    )  # EXAMPLE's "woman" is unknown
    return TextPipeline(vocab).load()


def test_tokenizer_lowercases_keeps_commas_and_splits_glued_sentences() -> None:
    tokens = tokenize_words('A "Red" shirt,black shorts.She (maybe) runs!')
    assert tokens == ["a", "red", "shirt", ",", "black", "shorts", ".", "she", "maybe", "runs"]
    assert "," not in tokenize_words("a shirt, shorts.", keep_punct="")
    assert tokenize_words("a short-sleeved t-shirt") == ["a", "short-sleeved", "t-shirt"]


@pytest.mark.parametrize("backend", ["nltk", "spacy"])
def test_noun_phrases_of_the_example(backend: str) -> None:
    tokens = tokenize_words(EXAMPLE)
    (spans,) = noun_phrases([tokens], backend)
    assert [" ".join(tokens[s:e]) for s, e in spans] == [
        "a woman",
        "a red shirt",
        "black shorts",
        "a white bag",
    ]


def test_nltk_phrases_keep_hyphenated_adjectives_across_sentences() -> None:
    tokens = tokenize_words(CAPTIONS[1])
    (spans,) = noun_phrases([tokens], "nltk")
    phrases = [" ".join(tokens[s:e]) for s, e in spans]
    assert "a red short-sleeved shirt" in phrases
    assert "white shoes" in phrases and "a black backpack" in phrases


def test_vocab_min_count_order_and_train_only() -> None:
    vocab = Vocab.build([["b", "a", "c"], ["a", "b", "d"], ["a"]], min_count=2)
    assert vocab.words == [PAD, UNK, "a", "b"]  # a ×3 before b ×2; c and d seen once are dropped
    records = [
        Record("x.jpg", 1, "train", ("a red coat", "a red hat")),
        Record("y.jpg", 2, "val", ("a purple purple purple scarf",)),
    ]
    vocab = vocab_from_records(records, TextOptions(min_count=2))
    assert "red" in vocab.words and "purple" not in vocab.words
    assert "coat" not in vocab.words  # seen once


def test_vocab_save_load_and_bad_files(tmp_path: Path) -> None:
    vocab = Vocab([PAD, UNK, "red", "coat"])
    vocab.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json") == vocab
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(PedError, match="bad.json"):
        Vocab.load(tmp_path / "bad.json")
    with pytest.raises(PedError):
        Vocab(["red", PAD, UNK])


def test_encode_round_trip_with_unknown_words(pipeline: TextPipeline) -> None:
    arrays = pipeline.encode([EXAMPLE])
    n = int(arrays["length"][0])
    expected = [t if t in pipeline.vocab.words else UNK for t in tokenize_words(EXAMPLE)]
    assert pipeline.vocab.decode(arrays["tokens"][0]) == expected
    assert UNK in expected and n == len(expected)
    assert not arrays["tokens"][0, n:].any()


def test_arrays_follow_the_cache_layout(pipeline: TextPipeline) -> None:
    arrays = pipeline.encode(CAPTIONS)
    opts = pipeline.options
    m = len(CAPTIONS)
    shapes = {
        "tokens": ((m, opts.max_length), np.int32),
        "length": ((m,), np.int32),
        "phrases": ((m, opts.max_phrases, 2), np.int16),
        "n_phrases": ((m,), np.int16),
        "bert_ids": ((m, opts.bert_max_length), np.int32),
        "bert_length": ((m,), np.int32),
        "bert_spans": ((m, opts.max_spans, 2), np.int16),
        "n_spans": ((m,), np.int16),
    }
    assert set(arrays) == set(TEXT_ARRAYS) == set(shapes)
    for name, (shape, dtype) in shapes.items():
        assert arrays[name].shape == shape and arrays[name].dtype == dtype, name
    for i in range(m):
        assert (arrays["phrases"][i, arrays["n_phrases"][i] :] == -1).all()


def test_truncation_is_counted_and_clips_phrases() -> None:
    vocab = Vocab([PAD, UNK, "a"])
    pipe = TextPipeline(vocab, TextOptions(max_length=5, bert_max_length=6, max_phrases=2, max_spans=1))
    arrays, stats = pipe.encode_with_stats([EXAMPLE, "a coat"])
    assert arrays["length"].tolist() == [5, 2]
    assert stats.truncated == 1 and stats.bert_truncated == 1
    assert stats.phrases_dropped == 0  # "black shorts" and "a white bag" start past token 5: not counted
    assert (arrays["phrases"][0, : arrays["n_phrases"][0], 1] <= 5).all()
    tokenizer = load_tokenizer(None)
    assert arrays["bert_length"][0] == 6 and arrays["bert_ids"][0, 5] == tokenizer.sep_token_id


def test_bert_spans_decode_to_the_text_between_commas(pipeline: TextPipeline) -> None:
    caption = "A girl in a pink dress, holding an umbrella, walks with a man in a grey coat."
    arrays = pipeline.encode([caption])
    tokenizer = load_tokenizer(None)
    ids, n = arrays["bert_ids"][0], int(arrays["bert_length"][0])
    assert ids[0] == tokenizer.cls_token_id and ids[n - 1] == tokenizer.sep_token_id and not ids[n:].any()
    spans = arrays["bert_spans"][0, : arrays["n_spans"][0]]
    decoded = [_squash(tokenizer.decode(ids[s:e])) for s, e in spans]
    assert decoded == [_squash(part.lower()) for part in caption.rstrip(".").split(",")]


def test_bert_spans_split_sentences_but_not_numbers(pipeline: TextPipeline) -> None:
    tokenizer = load_tokenizer(None)
    sentences, numbers = CAPTIONS[1], CAPTIONS[3]
    arrays = pipeline.encode([sentences, numbers])
    decoded = [
        [_squash(tokenizer.decode(arrays["bert_ids"][row, s:e])) for s, e in arrays["bert_spans"][row, :n]]
        for row, n in enumerate(arrays["n_spans"])
    ]
    assert decoded[0] == [_squash(p.lower()) for p in re.split(r"[,.]", sentences) if p.strip()]
    assert decoded[1] == [_squash(numbers.lower())]


def test_one_caption_equals_its_row_in_a_batch(pipeline: TextPipeline) -> None:
    batch = pipeline.encode(CAPTIONS * 3)
    for i, caption in enumerate(CAPTIONS):
        single = pipeline.encode([caption])
        for name in TEXT_ARRAYS:
            np.testing.assert_array_equal(single[name][0], batch[name][i], err_msg=name)


def test_pickled_and_rebuilt_pipelines_encode_identically(pipeline: TextPipeline) -> None:
    clone = pickle.loads(pickle.dumps(pipeline))
    rebuilt = TextPipeline.from_options(
        pipeline.vocab.words, {**pipeline.options.to_dict(), "image_size": [1, 1]}
    )
    reference = pipeline.encode(CAPTIONS)
    for other in (clone, rebuilt):
        assert other.options == pipeline.options
        out = other.encode(CAPTIONS)
        for name in TEXT_ARRAYS:
            np.testing.assert_array_equal(out[name], reference[name], err_msg=name)


def test_spacy_backend_gives_spans_in_order() -> None:
    pipe = TextPipeline(Vocab([PAD, UNK]), TextOptions(phrase_backend="spacy"))
    arrays = pipe.encode(CAPTIONS)
    for row in range(len(CAPTIONS)):
        spans = arrays["phrases"][row, : arrays["n_phrases"][row]]
        assert (spans[:, 0] < spans[:, 1]).all() and (spans[1:, 0] >= spans[:-1, 1]).all()


def test_missing_bert_folder_and_bad_inputs_are_ped_errors(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(PedError, match="no-such-model") as info:
        resolve_bert_model(missing)
    assert "--bert-model" in str(info.value)
    with pytest.raises(PedError, match="no tokenizer"):
        resolve_bert_model(tmp_path)
    with pytest.raises(PedError, match="no-such-model"):
        TextPipeline(Vocab([PAD, UNK]), TextOptions(bert_model=str(missing))).encode(["a red coat"])
    with pytest.raises(PedError, match="has no words"):
        TextPipeline(Vocab([PAD, UNK])).encode(["..."])
    with pytest.raises(PedError, match="backend"):
        TextOptions(phrase_backend="stanza")
