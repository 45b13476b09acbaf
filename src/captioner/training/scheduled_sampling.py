"""Scheduled sampling (Bengio et al., 2015), which system S5 planned and never built.

Teacher forcing always feeds the reference word w_{t-1} at step t; at test time the model is fed
its own previous word, a mismatch ("exposure bias"). Scheduled sampling feeds, at each step and for
each caption independently, the model's own sampled word with probability p instead of the
reference, and raises p during training:

    y_{t-1} = w_{t-1}                          with probability 1 - p
            ~ p_model(. | y_<t-1, image)       with probability p
    loss    = - sum_t log p_model(w_t | y_<t, image)

It runs through the step interface (``encode`` / ``init_state`` / ``step``), so every
architecture has it. The schedule (``ScheduledSamplingConfig.prob`` in :mod:`captioner.training.config`)
follows the usual recipe: p = 0 before ``start_epoch``, then rises by ``increase_prob`` every
``increase_every`` epochs, up to ``max_prob``.
"""

from __future__ import annotations

import torch

from captioner.models.base import Decoder, DecoderOutput


def scheduled_sampling_forward(decoder: Decoder, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                               prob: float) -> DecoderOutput:
    """The training pass with the model's own words mixed in; ``logits`` are log-probabilities
    (B, T, V) of target words 1..T, ready for :func:`captioner.training.loss.caption_loss`."""
    memory = decoder.encode(features)
    state = decoder.init_state(memory)
    steps = int(lengths.max()) - 1
    prev = tokens[:, 0]
    out = []
    for t in range(steps):
        logp, state, _ = decoder.step(prev, state, memory)
        out.append(logp)
        if t + 1 < steps:
            gold = tokens[:, t + 1]
            own = torch.multinomial(logp.detach().float().exp(), 1).squeeze(1)
            mixed = torch.rand(gold.shape, device=gold.device) < prob
            prev = torch.where(mixed, own, gold)
    return DecoderOutput(logits=torch.stack(out, 1))
