"""The merge architecture (system S4): the image and the caption so far meet only at the end.

    v       = ReLU(W_v dropout(mean_i a_i))                     image branch: one vector per image
    s_t     = LSTM^L(dropout(E y_0 .. E y_t))                    text branch: pretrained, frozen word
                                                                 vectors (GloVe) and L stacked LSTMs
    p(y_{t+1}) = softmax(W_o ReLU(W_m dropout(v + s_t)))      the branches added, then dense layers

There is no attention over regions: the image is seen only through its mean-pooled vector, so
this model has no attention maps to draw (``has_attention = False``). S4 re-feeds the growing
prefix at every step; carrying the LSTM state gives the same probabilities without the re-run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from captioner.models.base import Decoder, DecoderConfig, DecoderOutput, Memory, State, log_probs, register_architecture


@dataclass
class MergeConfig(DecoderConfig):
    word_vectors: str = "glove-6b-50d"  # S4: pretrained vectors ...
    freeze_embeddings: bool = True  # ... kept frozen (without word_vectors set this to false)
    embed_dim: int = 50  # set from the word vectors when they are used
    hidden_dim: int = 256  # S4: 256
    num_layers: int = 2  # stacked LSTMs
    dropout: float = 0.5


@register_architecture("merge", MergeConfig)
class MergeDecoder(Decoder):
    output_name = "W_o"
    has_attention = False

    def __init__(self, cfg: MergeConfig):
        super().__init__()
        self.cfg = cfg
        self.dropout = nn.Dropout(cfg.dropout)
        self.W_v = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_dim, num_layers=cfg.num_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.W_m = nn.Linear(cfg.hidden_dim, cfg.hidden_dim)
        self.W_o = nn.Linear(cfg.hidden_dim, cfg.vocab_size)

    def encode(self, features: torch.Tensor) -> Memory:
        return (F.relu(self.W_v(self.dropout(features.float().mean(dim=1)))),)  # (B, H)

    def init_state(self, memory: Memory) -> State:
        v = memory[0]
        zeros = v.new_zeros(v.shape[0], self.cfg.num_layers, self.cfg.hidden_dim)  # batch first
        return zeros, zeros.clone()

    def _head(self, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.W_o(F.relu(self.W_m(self.dropout(v + s))))

    def step(self, prev_tokens: torch.Tensor, state: State, memory: Memory):
        h, c = (x.transpose(0, 1).contiguous() for x in state)  # (L, B, H) for nn.LSTM
        s, (h, c) = self.lstm(self.embed(prev_tokens).unsqueeze(1), (h, c))
        logits = self._head(memory[0], s[:, 0])
        return log_probs(logits), (h.transpose(0, 1), c.transpose(0, 1)), None

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> DecoderOutput:
        (v,) = self.encode(features)
        T = int(lengths.max()) - 1
        s, _ = self.lstm(self.dropout(self.embed(tokens[:, :T])))  # (B, T, H), zero initial state
        return DecoderOutput(logits=self._head(v.unsqueeze(1), s))
