"""GRU, then attention over the grid, a residual connection and layer norm (system S3).

For words y_0 .. y_{T-1} (y_0 = <start>) and image regions a_1 .. a_P:

    o_t     = GRU(dropout(E y_t), h_{t-1})                     h_0 = tanh(W_0 mean_i a_i), or 0 as in S3
    z_t     = MultiHead(query = o_t, keys = values = a_1..a_P)  dot-product attention (heads = 1: S3's
                                                                single-head layer; more by option)
    p(y_{t+1}) = softmax(W_o dropout(LayerNorm(o_t + z_t)))    Add (residual), then LayerNorm

The GRU does not depend on the attention, so teacher-forced training runs it over the whole
sequence in one call (no Python loop over time steps); decoding carries its state explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from captioner.models.attention import MultiHeadAttention
from captioner.models.base import Decoder, DecoderConfig, DecoderOutput, Memory, State, log_probs, register_architecture


@dataclass
class GRUResidualConfig(DecoderConfig):
    embed_dim: int = 512
    hidden_dim: int = 512  # GRU units = attention size
    heads: int = 1  # 1 = one dot-product attention (S3); more = multi-head
    dropout: float = 0.3
    image_init: bool = True  # h_0 from the mean region; false = zeros, as S3


@register_architecture("gru-residual", GRUResidualConfig)
class GRUResidualDecoder(Decoder):
    def __init__(self, cfg: GRUResidualConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.init_h = nn.Linear(cfg.feature_dim, cfg.hidden_dim) if cfg.image_init else None
        self.gru = nn.GRU(cfg.embed_dim, cfg.hidden_dim, batch_first=True)
        self.attention = MultiHeadAttention(cfg.hidden_dim, cfg.heads, kv_dim=cfg.feature_dim)
        self.norm = nn.LayerNorm(cfg.hidden_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_dim, cfg.vocab_size)

    def encode(self, features: torch.Tensor) -> Memory:
        features = features.float()
        k, v = self.attention.project_kv(features)  # (B, h, P, d): once per image
        return k, v, features.mean(dim=1)

    def init_state(self, memory: Memory) -> State:
        mean = memory[2]
        if self.init_h is None:
            return (mean.new_zeros(mean.shape[0], self.cfg.hidden_dim),)
        return (torch.tanh(self.init_h(mean)),)

    def _head(self, o: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """GRU outputs o (B, T, H) -> logits (B, T, V), attention averaged over heads (B, T, P)."""
        z, weights = self.attention.attend(o, k, v)
        return self.out(self.dropout(self.norm(o + z))), weights.mean(dim=1)

    def step(self, prev_tokens: torch.Tensor, state: State, memory: Memory):
        o, h = self.gru(self.embed(prev_tokens).unsqueeze(1), state[0].unsqueeze(0).contiguous())
        logits, att = self._head(o, memory[0], memory[1])
        return log_probs(logits[:, 0]), (h[0],), att[:, 0]

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> DecoderOutput:
        k, v, mean = self.encode(features)
        T = int(lengths.max()) - 1
        (h0,) = self.init_state((k, v, mean))
        # positions past a caption's end see only its padding; the loss ignores them
        o, _ = self.gru(self.dropout(self.embed(tokens[:, :T])), h0.unsqueeze(0))
        logits, att = self._head(o, k, v)
        return DecoderOutput(logits=logits, attention=att)
