"""A Transformer decoder over the image grid (beyond the source systems; S1's "next step").

Memory (once per image): m_i = LayerNorm(W_m a_i + p_i), learned positions p_i of the P regions.
Words: x_t = W_x E y_t * sqrt(d) + PE(t) (sinusoidal positions; W_x only when the word
vectors are smaller than the model, e.g. 50-d GloVe). Then N pre-norm layers:

    x = x + dropout(SelfAttention(LN(x)))        masked: position t sees positions <= t
    x = x + dropout(CrossAttention(LN(x), m))    queries from the words, keys/values from the grid
    x = x + dropout(FFN(LN(x)))                  FFN(x) = W_2 GELU(W_1 x)

    p(y_{t+1}) = softmax(W_o dropout(LN(x_t)))      (dropout, as every dropout here, only in training)

The attention maps drawn for a word are the last layer's cross-attention averaged over heads.
Decoding caches each layer's past keys and values in the state, so a new word costs one
position, not a re-run of the prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from captioner.models.attention import MultiHeadAttention
from captioner.models.base import Decoder, DecoderConfig, DecoderOutput, Memory, State, log_probs, register_architecture


@dataclass
class TransformerConfig(DecoderConfig):
    embed_dim: int = 512  # word embedding; projected to d_model when different
    d_model: int = 512
    heads: int = 8
    num_layers: int = 3
    ff_dim: int = 2048
    dropout: float = 0.3
    max_regions: int = 256  # largest grid (P = H*W) the learned region positions cover


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """PE(t, 2i) = sin(t / 10000^(2i/d)), PE(t, 2i+1) = cos(...). positions (T,) -> (T, dim)."""
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) * (-math.log(10000.0) / dim))
    angles = positions.float().unsqueeze(1) * inv  # (T, dim/2)
    return torch.stack([angles.sin(), angles.cos()], dim=2).flatten(1)[:, :dim]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = MultiHeadAttention(d, cfg.heads)
        self.cross_attn = MultiHeadAttention(d, cfg.heads)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ff_dim), nn.GELU(), nn.Linear(cfg.ff_dim, d))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, self_k, self_v, mem_k, mem_v, mask=None):
        """x (B, T, d); self_k/self_v: keys and values of every position x may see (B, h, S, d_head),
        this call's own included. Returns x and the cross-attention weights (B, h, T, P)."""
        a, _ = self.self_attn.attend(self.ln1(x), self_k, self_v, mask)
        x = x + self.dropout(a)
        c, weights = self.cross_attn.attend(self.ln2(x), mem_k, mem_v)
        x = x + self.dropout(c)
        return x + self.dropout(self.ffn(self.ln3(x))), weights


@register_architecture("transformer", TransformerConfig)
class TransformerDecoder(Decoder):
    # optim.warmup (optimizer steps) when a config leaves it unset and training starts from random weights
    # (training/warmup.py). Without it, Adam's first full-size steps leave this decoder in a state it learns
    # slowly from: at its default sizes, lr 3e-3, batch 32, 6 epochs (180 steps) on the synthetic data, test
    # CIDEr-D 2.7 with no warm-up, 6.0 with 30 steps, 5.9 with 100 (tests/test_warmup.py); 100 rather than 30
    # leaves more of a real dataset's first epoch to the ramp (Flickr8k at batch 64: 469 steps an epoch)
    default_warmup = 100

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.W_m = nn.Linear(cfg.feature_dim, d)
        self.region_pos = nn.Parameter(torch.zeros(cfg.max_regions, d))
        self.ln_m = nn.LayerNorm(d)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.W_x = nn.Linear(cfg.embed_dim, d, bias=False) if cfg.embed_dim != d else nn.Identity()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.ln_out = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(d, cfg.vocab_size)
        nn.init.normal_(self.region_pos, std=0.02)
        nn.init.normal_(self.embed.weight, std=d ** -0.5)
        with torch.no_grad():
            self.embed.weight[0].zero_()  # <pad>

    def _words(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens (B, T) at positions start.. -> (B, T, d)."""
        pos = sinusoid(torch.arange(start, start + tokens.shape[1], device=tokens.device), self.cfg.d_model)
        return self.dropout(self.W_x(self.embed(tokens)) * math.sqrt(self.cfg.d_model) + pos)

    def encode(self, features: torch.Tensor) -> Memory:
        features = features.float()
        P = features.shape[1]
        if P > self.cfg.max_regions:
            raise ValueError(f"transformer: grids of {P} regions, but model.max_regions={self.cfg.max_regions}")
        m = self.ln_m(self.W_m(features) + self.region_pos[:P])
        return tuple(t for layer in self.layers for t in layer.cross_attn.project_kv(m))  # k_0, v_0, k_1, ...

    def init_state(self, memory: Memory) -> State:
        k = memory[0]  # empty caches of past keys and values, one pair per layer: (B, h, 0, d_head)
        empty = k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[3])
        return tuple(empty for _ in range(2 * len(self.layers)))

    def step(self, prev_tokens: torch.Tensor, state: State, memory: Memory):
        x = self._words(prev_tokens.unsqueeze(1), start=state[0].shape[2])  # (B, 1, d)
        new_state = []
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.project_kv(layer.ln1(x))
            k, v = torch.cat([state[2 * i], k], dim=2), torch.cat([state[2 * i + 1], v], dim=2)
            new_state += [k, v]
            x, weights = layer(x, k, v, memory[2 * i], memory[2 * i + 1])
        logits = self.out(self.ln_out(x[:, 0]))
        return log_probs(logits), tuple(new_state), weights[:, :, 0].mean(dim=1)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> DecoderOutput:
        memory = self.encode(features)
        T = int(lengths.max()) - 1
        x = self._words(tokens[:, :T], start=0)
        causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.project_kv(layer.ln1(x))
            x, weights = layer(x, k, v, memory[2 * i], memory[2 * i + 1], mask=causal)
        return DecoderOutput(logits=self.out(self.dropout(self.ln_out(x))), attention=weights.mean(dim=1))
