"""Scaled dot-product attention with several heads (Vaswani et al., 2017), shared by the
`gru-residual` and `transformer` decoders.

    head_j(Q, K, V) = softmax(Q W_j^Q (K W_j^K)^T / sqrt(d_head)) V W_j^V
    MultiHead(Q, K, V) = concat_j(head_j) W^O

Keys and values are projected separately (:meth:`project_kv`), so an image's grid is
projected once and reused at every decoding step, and a decoder's own past keys and values
can be cached.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"attention: dim {dim} must be a positive multiple of heads {heads}")
        self.heads, self.d_head = heads, dim // heads
        self.W_q = nn.Linear(dim, dim)
        self.W_k = nn.Linear(kv_dim or dim, dim)
        self.W_v = nn.Linear(kv_dim or dim, dim)
        self.W_o = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, D) -> (B, h, S, d_head)
        B, S, _ = x.shape
        return x.view(B, S, self.heads, self.d_head).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, kv_dim) -> keys, values (B, h, S, d_head)."""
        return self._split(self.W_k(x)), self._split(self.W_v(x))

    def attend(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, T, dim), k/v (B, h, S, d_head), mask (T, S) True where attention is allowed.
        Returns the output (B, T, dim) and the weights (B, h, T, S)."""
        q = self._split(self.W_q(query))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)  # (B, h, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)
        return self.W_o(out), weights

    def forward(self, query: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None):
        return self.attend(query, *self.project_kv(kv), mask)
