"""The training loss of one batch: cross-entropy on the references (optionally label-smoothed, optionally
with scheduled sampling) or SCST's self-critical loss, split among the torchrun ranks.

:class:`BatchLoss` is the one module every objective runs through, so that DistributedDataParallel
sees every pass that makes gradients.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from captioner.data.captions import CaptionData
from captioner.data.text import Vocab
from captioner.decoding.search import NonFiniteError
from captioner.decoding.settings import banned_ids
from captioner.runtime.devices import autocast, module_device
from captioner.runtime.distributed import Group
from captioner.training.config import TrainConfig
from captioner.training.scheduled_sampling import scheduled_sampling_forward
from captioner.training.scst import CiderD, scst_loss
from captioner.training.tuned import TunedDecoder


def caption_loss(out, tokens: torch.Tensor, lengths: torch.Tensor,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, cross-entropy): the cross-entropy on real target words only (mask from lengths), with
    ``label_smoothing`` of the target's probability spread evenly over the vocabulary (Szegedy et al.
    2016), plus the model's regulariser."""
    T = out.logits.shape[1]
    targets = tokens[:, 1:T + 1]
    mask = torch.arange(T, device=lengths.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    ce = F.cross_entropy(out.logits[mask], targets[mask], label_smoothing=label_smoothing)
    total = ce + (out.extra_loss if out.extra_loss is not None else 0.0)
    return total, ce


class BatchLoss(torch.nn.Module):
    """This rank's part of a batch's training loss: summed over the ranks, the loss one process
    computes on the whole batch (alone, that loss). One module for every objective, so that
    DistributedDataParallel sees every pass that makes gradients (SCST and scheduled sampling run
    the decoder step by step, not through its forward)."""

    def __init__(self, decoder: torch.nn.Module, data: CaptionData, vocab: Vocab, cfg: TrainConfig, group: Group):
        super().__init__()
        self.decoder, self.data, self.vocab, self.cfg = decoder, data, vocab, cfg
        self.rank, self.world = group.rank, group.world
        self.banned = banned_ids(vocab, False)  # <unk> is never output, in SCST's samples as in deployment
        # SCST's reward: document frequencies from all the training references, the same on every rank
        self.cider = (CiderD({im: [list(t) for t in toks] for im, toks in data.ref_tokens.items()})
                      if cfg.objective == "scst" else None)

    def forward(self, batch: np.ndarray, ss_prob: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, statistics) of this rank's share of ``batch``: every world-th caption from the rank-th
        (a batch is sorted longest first, and so is each share)."""
        mine = batch[self.rank::self.world]
        device, precision = module_device(self.decoder), self.cfg.precision  # auto is decided before (_train_stage)
        if len(mine) == 0:  # a batch with fewer captions than ranks: none here, but every weight takes part
            zero = sum(p.sum() for p in self.decoder.parameters() if p.requires_grad) * 0.0
            return zero, ({"reward": 0.0, "baseline": 0.0} if self.cider else {"ce": 0.0})
        share = len(mine) / len(batch)
        if self.cider is not None:
            images = [self.data.images[i] for i in mine.tolist()]
            try:
                with autocast(device, precision):
                    loss, reward, baseline = scst_loss(self.decoder, self.data.features(mine).to(device), images,
                                                       self.cider, self.vocab.itos, start_id=self.vocab.start_id,
                                                       end_id=self.vocab.end_id, cfg=self.cfg.scst,
                                                       banned=self.banned)
            except NonFiniteError:  # diverged weights: a NaN loss, which stops every rank with the run's message
                nan = torch.tensor(float("nan"), device=device)
                return nan, {"reward": float("nan"), "baseline": float("nan")}
            return loss * share, {"reward": reward * share, "baseline": baseline * share}
        owner = None
        if isinstance(self.decoder, TunedDecoder) and ss_prob == 0:  # the encoder's units: once per image
            feats, owner, tokens, lengths = self.data.image_batch(mine)
            feats, tokens, lengths = feats.to(device), tokens.to(device), lengths.to(device)
        else:
            feats, tokens, lengths = (t.to(device) for t in self.data.batch(mine))
        with autocast(device, precision):
            if ss_prob > 0:
                out = scheduled_sampling_forward(self.decoder, feats, tokens, lengths, ss_prob)
            elif owner is not None:
                out = self.decoder(feats, tokens, lengths, owner=owner)
            else:
                out = self.decoder(feats, tokens, lengths)
            total, ce = caption_loss(out, tokens, lengths, self.cfg.label_smoothing)
        # the cross-entropy is a mean over the batch's words, the regulariser one over its captions: each
        # share weighs by its part of them (alone both parts are 1 and the loss is the batch's)
        words = int((self.data.lengths[mine] - 1).sum()) / int((self.data.lengths[batch] - 1).sum())
        loss = total * share + (ce * (words - share) if words != share else 0.0)
        return loss, {"ce": ce.item() * words}
