"""Self-critical sequence training (Rennie et al., 2017): fine-tune a captioner on the metric.

For each image the model draws K captions w^1..w^K from its own distribution. Each gets the
reward r(w^k) = CIDEr-D(w^k; the image's references), and the policy gradient

    grad L = -1/N sum_k (r(w^k) - b_k) grad log p(w^k | image)

raises the probability of captions that score better than the baseline b_k. Two baselines:

    "mean"    b_k = mean of the other K-1 samples' rewards (Luo 2020, "a better variant of SCST")
    "greedy"  b_k = reward of the greedy caption (the paper's test-time inference baseline)

CIDEr-D's document frequencies come from the training references, as the reward's idf must
not depend on the batch. ``CiderD`` reproduces coco-caption's CIDEr-D (n = 1..4, tf-idf
vectors, counts clipped to the reference's, Gaussian length penalty sigma = 6, times 10).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch

from captioner.decoding.search import rollout
from captioner.training.config import ScstConfig


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


class CiderD:
    """CIDEr-D of tokenised captions, with document frequencies from a fixed reference corpus."""

    def __init__(self, references: dict[str, list[list[str]]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        df: Counter = Counter()
        for refs in references.values():
            seen = set()
            for r in refs:
                for k in range(1, n + 1):
                    seen.update(_ngrams(r, k))
            df.update(seen)
        self.log_docs = math.log(float(len(references)))
        self.log_df = {g: math.log(max(1.0, c)) for g, c in df.items()}
        self.refs = {image: [self._vector(r) for r in refs] for image, refs in references.items()}

    def _vector(self, words: Sequence[str]):
        vecs, norms = [], []
        for k in range(1, self.n + 1):
            v = {g: c * (self.log_docs - self.log_df.get(g, 0.0)) for g, c in _ngrams(words, k).items()}
            vecs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vecs, norms, len(words)

    def score(self, image: str, words: Sequence[str]) -> float:
        vecs, norms, length = self._vector(words)
        total = 0.0
        refs = self.refs[image]
        for rvecs, rnorms, rlength in refs:
            penalty = math.exp(-((length - rlength) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                if norms[k] == 0 or rnorms[k] == 0:
                    continue
                rv = rvecs[k]
                dot = sum(min(x, rv[g]) * rv[g] for g, x in vecs[k].items() if g in rv)
                total += penalty * dot / (norms[k] * rnorms[k])
        return 10.0 * total / (self.n * len(refs)) if refs else 0.0


def scst_loss(decoder, features: torch.Tensor, images: Sequence[str], cider: CiderD, itos: Sequence[str], *,
              start_id: int, end_id: int, cfg: ScstConfig, banned: tuple[int, ...] = ()):
    """The self-critical loss of one batch of images, and (mean sampled reward, mean baseline).

    Captions are drawn with dropout off unless ``cfg.dropout``: the policy improved is then the
    network that captions at test time."""
    training = decoder.training
    decoder.train(cfg.dropout)
    try:
        return _scst_loss(decoder, features, images, cider, itos, start_id=start_id, end_id=end_id, cfg=cfg,
                          banned=banned)
    finally:
        decoder.train(training)


def _scst_loss(decoder, features, images, cider, itos, *, start_id, end_id, cfg, banned):
    K, B = cfg.samples, features.shape[0]
    memory = decoder.encode(features)
    expanded = tuple(t.repeat_interleave(K, dim=0) for t in memory)

    def draw(logp: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(logp.detach().exp(), 1).squeeze(1)

    words, logp_sum, _ = rollout(decoder, expanded, B * K, draw, start_id=start_id, end_id=end_id,
                                 max_len=cfg.max_len, banned=banned)
    seqs = words.tolist()
    lengths, rewards = [], []
    for i, seq in enumerate(seqs):
        n = seq.index(end_id) if end_id in seq else len(seq)
        lengths.append(n + 1 if n < len(seq) else n)  # the <end> token is a decision too
        rewards.append(cider.score(images[i // K], [itos[t] for t in seq[:n]]))
    reward = torch.tensor(rewards).view(B, K)
    if cfg.baseline == "greedy":
        with torch.no_grad():
            training = decoder.training
            decoder.eval()
            g, _, _ = rollout(decoder, memory, B, lambda lp: lp.argmax(-1), start_id=start_id, end_id=end_id,
                              max_len=cfg.max_len, banned=banned)
            decoder.train(training)
        base = []
        for b, seq in enumerate(g.tolist()):
            n = seq.index(end_id) if end_id in seq else len(seq)
            base.append(cider.score(images[b], [itos[t] for t in seq[:n]]))
        baseline = torch.tensor(base)[:, None].expand(B, K)
    else:
        baseline = (reward.sum(1, keepdim=True) - reward) / max(K - 1, 1)
    advantage = (reward - baseline).view(-1)
    # -sum_k A_k log p(w^k), averaged over the words decided (each sample's log-prob is a sum over its words)
    loss = -(advantage * logp_sum).sum() / max(sum(lengths), 1)
    return loss, float(reward.mean()), float(baseline.mean())
