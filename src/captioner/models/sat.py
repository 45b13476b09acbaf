"""Show, Attend and Tell (Xu et al., 2015), soft attention, as in system S5.

Notation (per time step t, image regions a_i, i = 1..P, each C-dimensional):

    h_0, c_0   = f_init_h(mean_i a_i), f_init_c(mean_i a_i)           initial state
    e_ti       = w^T tanh(W_a a_i + W_h h_{t-1})                      additive attention
    alpha_t    = softmax_i(e_ti)                                      (B, P)
    beta_t     = sigmoid(f_beta(h_{t-1}))                             gate, (B, C)
    z_t        = beta_t * sum_i alpha_ti a_i                          gated context
    h_t, c_t   = LSTMCell([E y_{t-1}; z_t], (h_{t-1}, c_{t-1}))
    p(y_t)     = softmax(W_o dropout(h_t))

Loss = cross-entropy on real words + lambda * sum_i (1 - sum_t alpha_ti)^2   ("doubly
stochastic" attention: over the whole caption every region gets about one unit of attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from captioner.models.base import Decoder, DecoderConfig, DecoderOutput, Memory, State, register_architecture, running_per_step


@dataclass
class SATConfig(DecoderConfig):
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    dropout: float = 0.5
    alpha_c: float = 1.0  # lambda of the doubly stochastic regulariser


class Attention(nn.Module):
    """e_ti = w^T tanh(W_a a_i + W_h h); returns the context sum_i alpha_ti a_i and alpha."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.W_a = nn.Linear(feature_dim, attention_dim)
        self.W_h = nn.Linear(hidden_dim, attention_dim)
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, feats: torch.Tensor, keys: torch.Tensor, h: torch.Tensor):
        # feats (B,P,C), keys = W_a feats (B,P,A) precomputed once per image, h (B,H)
        e = self.w(torch.tanh(keys + self.W_h(h).unsqueeze(1))).squeeze(2)  # (B, P)
        alpha = F.softmax(e, dim=1)
        context = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)  # (B, C)
        return context, alpha


@register_architecture("sat", SATConfig)
class SATDecoder(Decoder):
    def __init__(self, cfg: SATConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.attention = Attention(cfg.feature_dim, cfg.hidden_dim, cfg.attention_dim)
        self.init_h = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
        self.init_c = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
        self.f_beta = nn.Linear(cfg.hidden_dim, cfg.feature_dim)
        self.lstm = nn.LSTMCell(cfg.embed_dim + cfg.feature_dim, cfg.hidden_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.uniform_(self.out.weight, -0.1, 0.1)
        nn.init.zeros_(self.out.bias)

    # --- the step interface used by the decoding engine ---

    def encode(self, features: torch.Tensor) -> Memory:
        features = features.float()
        return features, self.attention.W_a(features)  # (B,P,C), (B,P,A)

    def init_state(self, memory: Memory) -> State:
        mean = memory[0].mean(dim=1)
        return self.init_h(mean), self.init_c(mean)

    def _advance(self, prev_tokens, state, feats, keys):
        h, c = state
        context, alpha = self.attention(feats, keys, h)
        z = torch.sigmoid(self.f_beta(h)) * context
        h, c = self.lstm(torch.cat([self.embed(prev_tokens), z], dim=1), (h, c))
        return self.out(self.dropout(h)), (h, c), alpha

    def step(self, prev_tokens: torch.Tensor, state: State, memory: Memory):
        logits, state, alpha = self._advance(prev_tokens, state, *memory)
        return F.log_softmax(logits, dim=-1), state, alpha

    # --- teacher forcing ---

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> DecoderOutput:
        """Captions must be sorted by decreasing length: step t only runs the captions that
        still have a word to predict (no compute spent on padding)."""
        feats, keys = self.encode(features)
        running = running_per_step(lengths, "SATDecoder")
        B, T = tokens.shape[0], len(running)
        h, c = self.init_state((feats, keys))
        logits = feats.new_zeros(B, T, self.cfg.vocab_size)
        alphas = feats.new_zeros(B, T, feats.shape[1])
        for t, n in enumerate(running):
            # finished captions never restart (sorted by length), so the state just shrinks
            out, (h, c), alpha = self._advance(tokens[:n, t], (h[:n], c[:n]), feats[:n], keys[:n])
            logits[:n, t] = out
            alphas[:n, t] = alpha
        reg = self.cfg.alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).mean()
        return DecoderOutput(logits=logits, attention=alphas, extra_loss=reg)
