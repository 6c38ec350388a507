"""Text encoders (bi-RNN over word tokens, BERT over word pieces) and span helpers.

Spans are [start, end) token positions padded with -1 (noun phrases, comma-separated sub-sentences);
`span_pool` pools encoder states over them, `gather_spans` cuts them out as short sequences of their
own (MIA / PMA encode each noun phrase separately).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pedcli.errors import PedError
from pedcli.text.bert import resolve_bert_model

PAD = 0  # token id of padding (base.py batch keys)


class RNNTextEncoder(nn.Module):
    """Word embedding + bidirectional LSTM/GRU over packed sequences, so padding never enters a state."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 300,
        hidden: int = 512,
        cell: str = "lstm",
        num_layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        cells = {"lstm": nn.LSTM, "gru": nn.GRU}
        if cell not in cells:
            raise PedError(f"unknown RNN cell '{cell}'", "choose lstm or gru")
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.drop = nn.Dropout(dropout)  # on word embeddings; between layers the RNN applies its own
        self.rnn = cells[cell](
            embed_dim,
            hidden,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.out_dim = 2 * hidden

    @torch.no_grad()
    def init_words(self, vectors: Tensor, found: Tensor) -> None:
        """Start the embedding from pretrained word vectors [V, D] where `found`, rescaled to the
        root-mean-square of the embedding's own N(0, 1) start: the directions are what is pretrained
        (MiniLM's vectors, std 0.056, left HAN's LSTM inputs too small to learn from: test R@1 3.8 and 3.7
        on bench-methods seeds 0 and 1, 9.4 and 6.3 rescaled). The other words keep their random
        vectors; <pad> stays zero."""
        if vectors.shape != self.embed.weight.shape:
            raise PedError(
                f"the word vectors are {vectors.shape[1]} wide for {vectors.shape[0]} words; the embedding "
                f"is {self.embed.weight.shape[1]} wide for {self.embed.weight.shape[0]}",
                f"pass --set word_dim={vectors.shape[1]}",
            )
        weight = self.embed.weight
        if found.any():
            rms = vectors[found].pow(2).mean().sqrt().clamp(min=1e-12)
            weight[found] = (vectors[found] * (weight.pow(2).mean().sqrt() / rms)).to(weight)
        weight[PAD] = 0.0

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(word states [B,L,D] zero at padding, sentence vector [B,D], valid mask [B,L]).

        The sentence vector concatenates the forward state after the last word and the backward
        state after the first word (the last layer's final states)."""
        length = tokens.shape[1]
        packed = pack_padded_sequence(
            self.drop(self.embed(tokens)),
            lengths.clamp(min=1).cpu(),  # an empty caption is read as one pad token
            batch_first=True,
            enforce_sorted=False,
        )
        out, h = self.rnn(packed)
        if isinstance(h, tuple):  # LSTM: (h_n, c_n)
            h = h[0]
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=length)
        sentence = torch.cat([h[-2], h[-1]], dim=1)
        mask = torch.arange(length, device=tokens.device)[None, :] < lengths[:, None].to(tokens.device)
        return states, sentence, mask


# ---- spans ---------------------------------------------------------------------------------------
class _Windows(NamedTuple):
    index: Tensor  # [B,P,W] token position of each window slot (clamped into range)
    inside: Tensor  # [B,P,W] slot lies inside its span
    valid: Tensor  # [B,P] span exists and is non-empty
    length: Tensor  # [B,P] span length (0 when invalid), at most max_len


def _span_windows(spans: Tensor, n_spans: Tensor, seq_len: int, max_len: int | None = None) -> _Windows:
    """Index every span as a fixed-width window W = longest span, so one gather reads all of them."""
    n_slots = spans.shape[1]
    start = spans[..., 0].clamp(min=0)
    end = spans[..., 1].clamp(max=seq_len)
    valid = (torch.arange(n_slots, device=spans.device)[None, :] < n_spans[:, None]) & (end > start)
    length = torch.where(valid, end - start, torch.zeros_like(start))
    if max_len is not None:
        length = length.clamp(max=max_len)
    width = max(int(length.max()), 1) if length.numel() else 1
    offsets = torch.arange(width, device=spans.device)
    index = (start[..., None] + offsets).clamp(max=seq_len - 1)
    return _Windows(index, offsets < length[..., None], valid, length)


def span_pool(states: Tensor, spans: Tensor, n_spans: Tensor, mode: str = "mean") -> tuple[Tensor, Tensor]:
    """Pool word states [B,L,D] over each [start, end) span: ([B,P,D], valid mask [B,P]).

    Invalid (padded or empty) spans give zero vectors."""
    if mode not in ("mean", "max"):
        raise ValueError(f"span_pool mode must be mean or max, got {mode!r}")
    b, p = spans.shape[:2]
    d = states.shape[2]
    win = _span_windows(spans, n_spans, states.shape[1])
    w = win.index.shape[2]
    picked = states.gather(1, win.index.reshape(b, p * w, 1).expand(-1, -1, d)).reshape(b, p, w, d)
    inside = win.inside[..., None]
    if mode == "mean":
        pooled = (picked * inside).sum(dim=2) / win.length.clamp(min=1)[..., None]
    else:
        pooled = picked.masked_fill(~inside, float("-inf")).max(dim=2).values
        pooled = pooled.masked_fill(~win.valid[..., None], 0.0)
    return pooled, win.valid


class SpanBatch(NamedTuple):
    """Valid spans cut out of their captions, one row each (N rows in caption-major order)."""

    tokens: Tensor  # [N, Lp] token ids, PAD after each span's end
    lengths: Tensor  # [N]
    caption: Tensor  # [N] row of the source caption in the batch
    slot: Tensor  # [N] index of the span among its caption's spans

    def unflatten(self, values: Tensor, batch_size: int, n_slots: int) -> tuple[Tensor, Tensor]:
        """Put per-span values [N, ...] back to [B, P, ...] (zeros where no span), with the mask [B, P]."""
        out = values.new_zeros((batch_size, n_slots, *values.shape[1:]))
        out[self.caption, self.slot] = values
        mask = torch.zeros(batch_size, n_slots, dtype=torch.bool, device=values.device)
        mask[self.caption, self.slot] = True
        return out, mask


def gather_spans(tokens: Tensor, spans: Tensor, n_spans: Tensor, max_len: int | None = None) -> SpanBatch:
    """Cut each valid span out of `tokens` [B,L] as its own sequence, truncated to `max_len` tokens."""
    b, p = spans.shape[:2]
    win = _span_windows(spans, n_spans, tokens.shape[1], max_len)
    w = win.index.shape[2]
    cut = tokens.gather(1, win.index.reshape(b, p * w)).reshape(b, p, w)
    cut = cut.masked_fill(~win.inside, PAD)
    caption, slot = win.valid.nonzero(as_tuple=True)
    return SpanBatch(cut[caption, slot], win.length[caption, slot], caption, slot)


# ---- BERT ----------------------------------------------------------------------------------------
class BertEncoder(nn.Module):
    """A BERT-family encoder whose attention can be restricted per token (NAFS eq. 1).

    `attention_mask_3d[b, i, j]` says token i may attend to token j: a sub-sentence's [CLS] sees
    only its own sub-sentence, so its final state describes that part of the caption alone.
    """

    def __init__(
        self,
        model_dir: str | None = None,
        trainable: bool = True,
        random_init: bool = False,
        num_layers: int | None = None,
        hidden: int | None = None,
    ) -> None:
        """random_init builds the same architecture with random weights (fast tests); num_layers and
        hidden shrink it further."""
        super().__init__()
        from transformers import AutoConfig, AutoModel  # deferred: importing transformers takes seconds

        path = resolve_bert_model(model_dir)  # None = the offline MiniLM package's folder
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            _shrink(config, num_layers, hidden)
            if random_init:
                self.bert = AutoModel.from_config(config, attn_implementation="sdpa")
            else:
                self.bert = AutoModel.from_pretrained(
                    path, config=config, local_files_only=True, attn_implementation="sdpa"
                )
        except (OSError, ValueError) as exc:  # no config.json, not a model config, or no weights
            msg = f"no loadable BERT model in {path} ({exc})"
            raise PedError(msg, "pass a folder holding config.json and the model weights") from exc
        self.hidden = config.hidden_size
        self.trainable = trainable
        self.bert.requires_grad_(trainable)

    def train(self, mode: bool = True) -> BertEncoder:
        """A frozen encoder stays in eval mode (no dropout) so its features are deterministic."""
        super().train(mode)
        if not self.trainable:
            self.bert.eval()
        return self

    def forward(self, ids: Tensor, mask: Tensor, attention_mask_3d: Tensor | None = None) -> Tensor:
        """Final hidden states [B,L,H]; `mask` [B,L] marks real word pieces (1) against padding (0)."""
        if attention_mask_3d is None:
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        allowed = attention_mask_3d.bool() & mask.bool()[:, None, :]
        dtype = self.bert.get_input_embeddings().weight.dtype
        # HF takes a 4-D mask as-is and adds it to the attention logits (eager and sdpa alike).
        additive = torch.zeros(allowed.shape, dtype=dtype, device=ids.device)
        additive = additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
        return self.bert(input_ids=ids, attention_mask=additive).last_hidden_state


def _shrink(config: Any, num_layers: int | None, hidden: int | None) -> None:
    """Fewer layers / a narrower width for tiny test models; the per-head width stays the same."""
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    if hidden is not None:
        head_dim = config.hidden_size // config.num_attention_heads
        if hidden % head_dim:
            raise PedError(f"BERT hidden size {hidden} is not a multiple of the head width {head_dim}")
        config.num_attention_heads = hidden // head_dim
        config.hidden_size, config.intermediate_size = hidden, 4 * hidden
