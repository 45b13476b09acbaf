"""Bahdanau-attention GRU captioner (systems S1 and S2).

Notation (image regions a_i, i = 1..P, each C-dimensional; word y_{t-1} before step t):

    f_i      = ReLU(W_e a_i)                                   regions projected to proj_dim
    score_ti = V^T tanh(W1 f_i + W2 h_{t-1})                   additive (Bahdanau) attention
    alpha_t  = softmax_i(score_ti)                             (B, P)
    c_t      = sum_i alpha_ti f_i                              context
    h_t      = GRU([c_t; E y_{t-1}], h_{t-1}),  h_0 = 0        (S1 resets the state to zeros)
    p(y_t)   = softmax(W_2 BN(dropout(W_1 h_t)))               S1's head: dense, dropout, batch norm

Batch normalisation sees every real (non-padding) word position of the batch at once: the
teacher-forced pass runs the GRU step by step, then the head once over all steps. The order is
S1's (dropout before batch norm), so the running variance batch norm keeps is measured on
dropped-out activations, larger than what it sees when decoding: the decoded logits come out
somewhat flatter than in training (about 0.7x on the input-dependent part at dropout 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from captioner.models.base import (Decoder, DecoderConfig, DecoderOutput, Memory, State, log_probs,
                                   register_architecture, running_per_step)


@dataclass
class BahdanauGRUConfig(DecoderConfig):
    embed_dim: int = 256  # word embedding (S1: 256)
    proj_dim: int = 256  # W_e: regions projected to this size (S1: the embedding size, 256)
    hidden_dim: int = 512  # GRU units (S1: 512)
    attention_dim: int = 512
    dropout: float = 0.5


@register_architecture("bahdanau-gru", BahdanauGRUConfig)
class BahdanauGRUDecoder(Decoder):
    output_name = "fc2"
    def __init__(self, cfg: BahdanauGRUConfig):
        super().__init__()
        self.cfg = cfg
        self.W_e = nn.Linear(cfg.feature_dim, cfg.proj_dim)
        self.W1 = nn.Linear(cfg.proj_dim, cfg.attention_dim)
        self.W2 = nn.Linear(cfg.hidden_dim, cfg.attention_dim)
        self.V = nn.Linear(cfg.attention_dim, 1)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.gru = nn.GRUCell(cfg.proj_dim + cfg.embed_dim, cfg.hidden_dim)
        self.fc1 = nn.Linear(cfg.hidden_dim, cfg.hidden_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.bn = nn.BatchNorm1d(cfg.hidden_dim)
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.vocab_size)

    def encode(self, features: torch.Tensor) -> Memory:
        f = F.relu(self.W_e(features.float()))  # (B, P, proj)
        return f, self.W1(f)  # regions and their attention keys, computed once per image

    def init_state(self, memory: Memory) -> State:
        f = memory[0]
        return (f.new_zeros(f.shape[0], self.cfg.hidden_dim),)

    def _advance(self, prev_tokens, h, f, keys):
        score = self.V(torch.tanh(keys + self.W2(h).unsqueeze(1))).squeeze(2)  # (B, P)
        alpha = F.softmax(score, dim=1)
        context = torch.bmm(alpha.unsqueeze(1), f).squeeze(1)  # (B, proj)
        h = self.gru(torch.cat([context, self.embed(prev_tokens)], dim=1), h)
        return h, alpha

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, V) logits."""
        return self.fc2(self.bn(self.dropout(self.fc1(h))))

    def step(self, prev_tokens: torch.Tensor, state: State, memory: Memory):
        h, alpha = self._advance(prev_tokens, state[0], *memory)
        return log_probs(self.head(h)), (h,), alpha

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> DecoderOutput:
        """Captions sorted by decreasing length: step t only runs the captions still going."""
        f, keys = self.encode(features)
        running = running_per_step(lengths, "BahdanauGRUDecoder")
        B, T = tokens.shape[0], len(running)
        (h,) = self.init_state((f, keys))
        hs = f.new_zeros(B, T, self.cfg.hidden_dim)
        alphas = f.new_zeros(B, T, f.shape[1])
        for t, n in enumerate(running):
            h, alpha = self._advance(tokens[:n, t], h[:n], f[:n], keys[:n])
            hs[:n, t] = h
            alphas[:n, t] = alpha
        mask = torch.arange(T, device=lengths.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)  # real target positions
        logits = f.new_zeros(B, T, self.cfg.vocab_size)
        logits[mask] = self.head(hs[mask])
        return DecoderOutput(logits=logits, attention=alphas)
