"""GNMT-style attention encoder-decoder whose recurrent layers are LSTM, LN LSTM, HyperLSTM or
LN HyperLSTM (the paper's WMT'14 En->Fr experiment).

Encoder: a bidirectional first layer (forward and backward halves of ``hidden_size``), then
unidirectional layers; residual connections from layer index ``residual_start`` on (GNMT: the
third layer). Decoder: the bottom layer's output queries an additive (Bahdanau) or
multiplicative (Luong "general") attention over the encoder states; the context is fed to every
upper decoder layer and to the output layer ``tanh(W [h_top; context])``. With
``input_feeding`` that attentional vector is also fed to the bottom layer at the next step (Luong).

All recurrent layers run time-major through :func:`hypernetworks.nn.build_recurrent`; decoding
steps them one token at a time with the carried state tuples ((h, c) or (h, c, h_hat, c_hat)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hypernetworks.models.registry import register_model
from hypernetworks.nn import CELL_KINDS, build_recurrent

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
ATTENTIONS = ("additive", "multiplicative")


@dataclass
class Encoded:
    memory: torch.Tensor  # (S, B, H) encoder states
    keys: torch.Tensor  # (S, B, A) attention keys (projected once per sentence)
    mask: torch.Tensor  # (B, S) True at real tokens

    def repeat(self, k: int) -> "Encoded":
        return Encoded(self.memory.repeat_interleave(k, 1), self.keys.repeat_interleave(k, 1),
                       self.mask.repeat_interleave(k, 0))


class Attention(nn.Module):
    """Additive ``v^T tanh(W_q q + W_k k)`` or multiplicative ``q^T W k`` attention; padded
    source positions get zero weight."""

    def __init__(self, query_size: int, key_size: int, kind: str = "additive", attn_size: int | None = None):
        super().__init__()
        if kind not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {kind!r}")
        self.kind = kind
        if kind == "additive":
            attn_size = attn_size or query_size
            self.key_proj = nn.Linear(key_size, attn_size, bias=False)
            self.query_proj = nn.Linear(query_size, attn_size)
            self.v = nn.Linear(attn_size, 1, bias=False)
        else:
            self.key_proj = nn.Linear(key_size, query_size, bias=False)

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        return self.key_proj(memory)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor):
        """query (T, B, Q), keys (S, B, A), memory (S, B, H), mask (B, S) -> context (T, B, H), weights (T, B, S)."""
        if self.kind == "additive":
            q = self.query_proj(query)  # (T, B, A)
            scores = self.v(torch.tanh(q.unsqueeze(2) + keys.transpose(0, 1).unsqueeze(0))).squeeze(-1)  # (T, B, S)
        else:
            scores = torch.einsum("tbq,sbq->tbs", query, keys)
        scores = scores.masked_fill(~mask.unsqueeze(0), float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(memory.dtype)
        context = torch.einsum("tbs,sbh->tbh", weights, memory)
        return context, weights


def _reorder(state, index: torch.Tensor):
    """Select batch rows ``index`` of a decoder state (tensors of (1, N, .) and the (N, .) feed)."""
    layers, feed = state
    layers = [None if s is None else tuple(t.index_select(1, index) for t in s) for s in layers]
    return layers, (None if feed is None else feed.index_select(0, index))


class Seq2Seq(nn.Module):
    """Attention encoder-decoder over a joint (shared source/target) subword vocabulary.

    Args:
        vocab_size: joint subword vocabulary (ids pad=0, unk=1, bos=2, eos=3).
        embed_size, hidden_size: embedding and recurrent sizes (``hidden_size`` even: the
            bidirectional first layer has two halves).
        encoder_layers, decoder_layers: depths (encoder >= 1 counting the bidirectional layer).
        cell: ``lstm`` | ``ln-lstm`` | ``hyperlstm`` | ``ln-hyperlstm``.
        attention: ``additive`` | ``multiplicative``.
        input_feeding: feed the previous attentional vector to the bottom decoder layer.
        dropout: on embeddings and between layers; recurrent_dropout: on the candidate (paper).
        hyper_size, hyper_embedding_size: the HyperLSTM's N_hat and N_z (paper: 128, 32).
        residual_start: layers with index >= this add their input (GNMT: 2).
        tie_embeddings: share source/target embeddings and the output projection.
        hyper_recurrent_dropout, z_input, layer_norm_eps, layer_norm_bias, input_init: the cells'
            switches (see :class:`hypernetworks.nn.HyperLSTMCell`); None / defaults keep the package's.
    """

    def __init__(self, vocab_size: int, embed_size: int = 256, hidden_size: int = 256, encoder_layers: int = 2,
                 decoder_layers: int = 2, cell: str = "lstm", attention: str = "additive",
                 input_feeding: bool = False, dropout: float = 0.2, recurrent_dropout: float = 0.0,
                 hyper_size: int = 128, hyper_embedding_size: int = 32, residual_start: int = 2,
                 tie_embeddings: bool = True, hyper_recurrent_dropout: float | None = None,
                 z_input: str = "current", layer_norm_eps: float = 1e-5, layer_norm_bias: bool = True,
                 input_init: str | None = None):
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("embed_size", embed_size), ("hidden_size", hidden_size),
                        ("encoder_layers", encoder_layers), ("decoder_layers", decoder_layers)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if vocab_size <= EOS_ID:
            raise ValueError(f"vocab_size must exceed the 4 special ids, got {vocab_size}")
        if hidden_size % 2:
            raise ValueError(f"hidden_size must be even (bidirectional first layer), got {hidden_size}")
        if cell not in CELL_KINDS:
            raise ValueError(f"cell must be one of {CELL_KINDS}, got {cell!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.vocab_size, self.hidden_size, self.cell = vocab_size, hidden_size, cell
        self.input_feeding, self.residual_start = input_feeding, residual_start
        self.dropout = nn.Dropout(dropout)
        H = hidden_size
        rec = dict(recurrent_dropout=recurrent_dropout, hyper_size=hyper_size, embedding_size=hyper_embedding_size,
                   hyper_recurrent_dropout=hyper_recurrent_dropout, z_input=z_input, layer_norm_eps=layer_norm_eps,
                   layer_norm_bias=layer_norm_bias, input_init=input_init)

        self.embedding = nn.Embedding(vocab_size, embed_size, padding_idx=PAD_ID)
        self.tgt_embedding = self.embedding if tie_embeddings else nn.Embedding(vocab_size, embed_size,
                                                                                padding_idx=PAD_ID)
        self.enc_fwd = build_recurrent(cell, embed_size, H // 2, **rec)
        self.enc_bwd = build_recurrent(cell, embed_size, H // 2, **rec)
        self.encoder = nn.ModuleList(build_recurrent(cell, H, H, **rec) for _ in range(encoder_layers - 1))
        out_size = embed_size if tie_embeddings else H
        feed = out_size if input_feeding else 0
        self.decoder = nn.ModuleList(
            [build_recurrent(cell, embed_size + feed, H, **rec)]
            + [build_recurrent(cell, 2 * H, H, **rec) for _ in range(decoder_layers - 1)])
        self.attention = Attention(H, H, attention)
        self.combine = nn.Linear(2 * H, out_size)
        self.out_bias = nn.Parameter(torch.zeros(vocab_size))
        self.out_weight = self.tgt_embedding.weight if tie_embeddings else nn.Parameter(
            torch.empty(vocab_size, out_size).normal_(0, out_size ** -0.5))
        nn.init.normal_(self.embedding.weight, 0, embed_size ** -0.5)
        with torch.no_grad():
            self.embedding.weight[PAD_ID].zero_()

    # ------------------------------------------------------------------ encoder
    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> Encoded:
        """src (B, S) right-padded ids, src_lengths (B,) -> encoder states; padded positions
        never reach a real position (the backward half reverses each sentence within its length)."""
        if src.dim() != 2:
            raise ValueError(f"src must be (batch, seq_len), got shape {tuple(src.shape)}")
        B, S = src.shape
        lengths = src_lengths.to(src.device).clamp(min=1)
        mask = torch.arange(S, device=src.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, S)
        x = self.dropout(self.embedding(src).transpose(0, 1))  # (S, B, E)
        fwd, _ = self.enc_fwd(x)
        pos = torch.arange(S, device=src.device).unsqueeze(1)  # (S, 1)
        rev = torch.where(pos < lengths.unsqueeze(0), lengths.unsqueeze(0) - 1 - pos, pos)  # (S, B), an involution
        gather = lambda t: t.gather(0, rev.unsqueeze(-1).expand_as(t))  # noqa: E731
        bwd, _ = self.enc_bwd(gather(x))
        out = torch.cat([fwd, gather(bwd)], dim=-1)
        for k, layer in enumerate(self.encoder, start=1):
            y, _ = layer(self.dropout(out))
            out = y + out if k >= self.residual_start else y
        out = out * mask.t().unsqueeze(-1)
        return Encoded(out, self.attention.keys(out), mask)

    # ------------------------------------------------------------------ decoder
    def init_state(self):
        return [None] * len(self.decoder), None

    def decode(self, tgt_in: torch.Tensor, enc: Encoded, state=None):
        """tgt_in (B, T) ids (starting with BOS) -> logits (B, T, V) and the state after step T."""
        state = self.init_state() if state is None else state
        if self.input_feeding and tgt_in.size(1) > 1:  # the feed makes each step depend on the last
            outs = []
            for t in range(tgt_in.size(1)):
                logits, state = self.decode(tgt_in[:, t:t + 1], enc, state)
                outs.append(logits)
            return torch.cat(outs, dim=1), state
        layer_states, feed = state
        y = self.dropout(self.tgt_embedding(tgt_in).transpose(0, 1))  # (T, B, E)
        if self.input_feeding:
            if feed is None:
                feed = y.new_zeros(y.size(1), self.combine.out_features)
            y = torch.cat([y, feed.unsqueeze(0)], dim=-1)
        new_states = []
        out, s = self.decoder[0](y, layer_states[0])
        new_states.append(s)
        context, _ = self.attention(out, enc.keys, enc.memory, enc.mask)
        for k, layer in enumerate(self.decoder[1:], start=1):
            h, s = layer(torch.cat([self.dropout(out), context], dim=-1), layer_states[k])
            new_states.append(s)
            out = h + out if k >= self.residual_start else h
        a = torch.tanh(self.combine(torch.cat([self.dropout(out), context], dim=-1)))  # (T, B, D)
        logits = F.linear(self.dropout(a), self.out_weight, self.out_bias)
        return logits.transpose(0, 1), (new_states, a[-1] if self.input_feeding else None)

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, V)."""
        return self.decode(tgt_in, self.encode(src, src_lengths))[0]

    # ------------------------------------------------------------------ search
    def _max_steps(self, src_lengths: torch.Tensor, max_len: int | None) -> int:
        return int(max_len) if max_len is not None else int(src_lengths.max()) * 2 + 10

    @staticmethod
    def _step_logprobs(logits: torch.Tensor, finished: torch.Tensor, force_eos: bool) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1)
        logp[:, PAD_ID] = float("-inf")  # live hypotheses never emit pad or bos
        logp[:, BOS_ID] = float("-inf")
        if force_eos:  # length limit reached: end every live hypothesis
            eos = logp[:, EOS_ID].clone()
            logp.fill_(float("-inf"))
            logp[:, EOS_ID] = eos
        logp[finished] = float("-inf")  # finished ones continue with pad at no cost
        logp[finished, PAD_ID] = 0.0
        return logp

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, src_lengths: torch.Tensor, max_len: int | None = None) -> list[list[int]]:
        """Argmax decoding; token ids per sentence without BOS/EOS."""
        enc = self.encode(src, src_lengths)
        B, steps = src.size(0), self._max_steps(src_lengths, max_len)
        tok = src.new_full((B, 1), BOS_ID)
        finished = torch.zeros(B, dtype=torch.bool, device=src.device)
        state, out = None, []
        for t in range(steps):
            logits, state = self.decode(tok, enc, state)
            logp = self._step_logprobs(logits[:, -1], finished, force_eos=t == steps - 1)
            tok = logp.argmax(-1, keepdim=True)
            out.append(tok)
            finished = finished | (tok.squeeze(1) == EOS_ID)
            if bool(finished.all()):
                break
        return _strip(torch.cat(out, dim=1))

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, src_lengths: torch.Tensor, beam: int = 5, max_len: int | None = None,
                    length_penalty: float = 0.6) -> list[list[int]]:
        """Beam search; the final pick divides log-probabilities by GNMT's length penalty
        ``((5 + len) / 6) ** length_penalty``. Token ids per sentence without BOS/EOS."""
        if beam < 1:
            raise ValueError(f"beam must be >= 1, got {beam}")
        B, K, V = src.size(0), beam, self.vocab_size
        enc = self.encode(src, src_lengths).repeat(K)
        steps = self._max_steps(src_lengths, max_len)
        scores = src.new_zeros((B, K), dtype=torch.float)
        scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
        finished = torch.zeros(B * K, dtype=torch.bool, device=src.device)
        hyp_len = torch.zeros(B * K, dtype=torch.long, device=src.device)
        tokens = src.new_full((B * K, 1), BOS_ID)
        state = None
        base = (torch.arange(B, device=src.device) * K).unsqueeze(1)
        for t in range(steps):
            logits, state = self.decode(tokens[:, -1:], enc, state)
            logp = self._step_logprobs(logits[:, -1], finished, force_eos=t == steps - 1)
            cand = (scores.view(B * K, 1) + logp).view(B, K * V)
            scores, idx = cand.topk(K, dim=1)
            rows = (base + torch.div(idx, V, rounding_mode="floor")).view(-1)
            tok = (idx % V).view(-1, 1)
            tokens = torch.cat([tokens.index_select(0, rows), tok], dim=1)
            was_finished = finished.index_select(0, rows)
            hyp_len = torch.where(was_finished, hyp_len.index_select(0, rows), torch.full_like(hyp_len, t + 1))
            finished = was_finished | (tok.squeeze(1) == EOS_ID)
            state = _reorder(state, rows)
            if bool(finished.all()):
                break
        lp = ((5.0 + hyp_len.float()) / 6.0) ** length_penalty
        best = (scores.view(-1) / lp).view(B, K).argmax(1)
        chosen = tokens.view(B, K, -1)[torch.arange(B, device=src.device), best]
        return _strip(chosen[:, 1:])


def _strip(tokens: torch.Tensor) -> list[list[int]]:
    out = []
    for row in tokens.tolist():
        seq = []
        for i in row:
            if i == EOS_ID:
                break
            if i != PAD_ID:
                seq.append(i)
        out.append(seq)
    return out


# ---------------------------------------------------------------------- registry
# Paper scale (WMT'14 En->Fr, GNMT-like: 8+8 layers of 1024, 32k wordpieces; hyper 128, N_z 32).
_WMT14 = dict(vocab_size=32000, embed_size=1024, hidden_size=1024, encoder_layers=8, decoder_layers=8,
              attention="additive", dropout=0.2, hyper_size=128, hyper_embedding_size=32)
# CPU scale (Multi30k En->Fr, minutes on one thread): 2+2 layers of 128, 4k joint subwords, and a
# hyper network scaled with the main one (32 units, N_z 8: the paper's 128/1024 is 1/8).
_MULTI30K = dict(vocab_size=4000, embed_size=128, hidden_size=128, encoder_layers=2, decoder_layers=2,
                 attention="additive", dropout=0.2, hyper_size=32, hyper_embedding_size=8)


def _factory(base: dict, cell: str):
    def make(**overrides) -> Seq2Seq:
        return Seq2Seq(**{**base, "cell": cell, **overrides})

    return make


for _cell in CELL_KINDS:
    register_model(f"wmt14-gnmt-{_cell}")(_factory(_WMT14, _cell))
    register_model(f"multi30k-gnmt-{_cell}")(_factory(_MULTI30K, _cell))
