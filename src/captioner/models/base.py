"""The decoder interface every architecture implements, and the architecture registry.

A decoder turns a grid of image features into words, one step at a time:

    memory = decoder.encode(features)              # once per image: projections, masks, ...
    state  = decoder.init_state(memory)            # recurrent state before the first word
    log_probs, state, attention = decoder.step(prev_tokens, state, memory)

``memory`` and ``state`` are tuples of tensors whose first dimension is the batch, so the
decoding engine (:mod:`captioner.decoding.search`) can expand them for beam search and reorder
them without knowing the architecture. ``forward`` is the teacher-forced pass for training.

Every architecture's config extends :class:`DecoderConfig` (vocabulary size, feature size,
pretrained word vectors) and names its word embedding ``self.embed``, so pretrained vectors
and freezing work the same way for all of them (:func:`captioner.models.build_decoder`); ``output_name``
names its output projection, so new words can be added to any of them (:mod:`captioner.models.extension`).
An architecture without spatial attention sets ``has_attention = False`` and returns
``None`` as the attention of each step. One whose ``step`` accepts memory with one row per *image* while
``prev_tokens`` and ``state`` hold k rows per image (an image's rows adjacent, k = rows / images) sets
``shares_memory = True``: a beam search then keeps one copy of an image's memory for all its beams instead
of k copies (less to copy when images leave the batch, and less to read at every step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

State = tuple[torch.Tensor, ...]
Memory = tuple[torch.Tensor, ...]


@dataclass
class DecoderConfig:
    """Fields every architecture has. ``vocab_size`` and ``feature_dim`` are set by the trainer
    from the vocabulary and the feature store."""

    vocab_size: int = 0
    feature_dim: int = 1280  # C, from the encoder
    word_vectors: str = ""  # pretrained word vectors for ``embed`` (e.g. "glove-6b-50d"); "" = random
    freeze_embeddings: bool = False  # keep the word embedding fixed during training


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # (B, T, V): scores of target words 1..T given words 0..T-1
    attention: torch.Tensor | None = None  # (B, T, P) attention weights, if the model attends
    extra_loss: torch.Tensor | None = None  # scalar regulariser added to the cross-entropy
    aux: dict = field(default_factory=dict)


class Decoder(nn.Module):
    """Base class: subclasses implement encode / init_state / step / forward."""

    has_attention = True  # False: step and forward return no attention (no maps to draw)
    shares_memory = False  # True: step takes memory with one row per image and k rows of state per image
    embed: nn.Embedding
    output_name = "out"  # the nn.Linear that turns the hidden state into the vocabulary's scores

    def encode(self, features: torch.Tensor) -> Memory:
        """features (B, P, C) -> memory tuple (batch-first tensors)."""
        return (features,)

    def init_state(self, memory: Memory) -> State:
        raise NotImplementedError

    def step(self, prev_tokens: torch.Tensor, state: State, memory: Memory):
        """prev_tokens (B,) -> (log_probs (B, V), new state, attention (B, P) or None)."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> DecoderOutput:
        """Teacher forcing. tokens (B, T+1) = <start> w1 .. wn <end> <pad>...; lengths = n+2."""
        raise NotImplementedError


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """A step's log-probabilities, in float32 whatever the logits' dtype. Under bfloat16 autocast on a CPU the
    logits are bfloat16, and a log-softmax of them would be too: 8 bits, about 0.016 at a log-probability of -3,
    which a beam's score sums over a caption's words (CUDA's autocast computes log_softmax in float32 already). SCST
    and scheduled sampling keep these for the backward pass: twice the memory of bfloat16 ones there (about 38 MB
    for 160 rows x 20 steps x 3000 words)."""
    return F.log_softmax(logits.float(), dim=-1)


def running_per_step(lengths: torch.Tensor, who: str) -> list[int]:
    """For captions sorted by decreasing length (lengths = words + 2), how many of them still
    have a word to predict at each step t: step-by-step decoders run only those rows (the
    finished ones are at the end of the batch), so no compute is spent on padding."""
    steps = (lengths - 1).tolist()  # words to predict per caption
    if any(a < b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"{who}.forward needs captions sorted by decreasing length")
    return [sum(1 for n in steps if n > t) for t in range(steps[0] if steps else 0)]


_ARCHITECTURES: dict[str, tuple[type, type]] = {}


def register_architecture(name: str, config_cls: type) -> Callable[[type], type]:
    """Class decorator: ``@register_architecture("sat", SATConfig)``."""

    def deco(cls: type) -> type:
        _ARCHITECTURES[name] = (cls, config_cls)
        cls.arch_name = name
        return cls

    return deco


def get_architecture(name: str) -> tuple[type, type]:
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; available: {', '.join(sorted(_ARCHITECTURES))}")
    return _ARCHITECTURES[name]


def available_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)
