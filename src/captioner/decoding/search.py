"""One decoding engine for every architecture: greedy, batched beam search, sampling.

Written only against the step interface of :class:`captioner.models.base.Decoder`
(``encode`` / ``init_state`` / ``step``), so every architecture gets all of it.

Every search takes its settings as a :class:`~captioner.decoding.settings.DecodingSettings` (the one
place that defines their defaults and bounds), optionally with some fields overridden by keyword, as
Hugging Face's ``generate(generation_config, **kwargs)`` does: ``beam_search(model, feats, settings,
start_id=1, end_id=2)`` or ``beam_search(model, feats, start_id=1, end_id=2, beam_size=5)``.
:func:`generate` is the entry point from a vocabulary: it bans the words a caption never holds and
samples or searches as the settings say.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from captioner.data.text import Vocab
from captioner.decoding.settings import DecodingSettings, banned_ids
from captioner.models.base import Decoder


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start> / <end>
    score: float  # sum of log-probabilities, <end> included when it was produced
    norm_score: float  # score / length**length_penalty (what the n-best list is ranked by)
    attention: torch.Tensor | None  # (len(tokens), P) attention that produced each word
    finished: bool  # produced <end> before max_len


class NonFiniteError(ValueError):
    """A model's log-probabilities hold NaN or infinity (weights that are damaged or absurd, though finite):
    it can give no caption and no score. ``model`` names it in the message (:meth:`naming`)."""

    def __init__(self, detail: str = "", model: str = "the model"):
        self.detail, self.model = detail, model
        super().__init__(f"{model}: its weights give non-finite log-probabilities (NaN or infinity){detail}, so it "
                         "can give no caption or score; the weights are damaged or absurd (a diverged training "
                         "run?): use another model, or retrain it with a lower optim.lr")

    def naming(self, model: str) -> "NonFiniteError":
        """The same error, naming ``model`` (its directory)."""
        return NonFiniteError(self.detail, model)


def _check_step(logp: torch.Tensor, live: torch.Tensor, allowed: torch.Tensor | None = None) -> None:
    """Before a word is chosen: the log-probabilities of the ``live`` rows (captions not yet ended) hold no NaN
    or +infinity (-infinity is a word made impossible) and, given ``allowed`` (banned words at -infinity), leave
    some word possible."""
    bad = ~(logp.detach().amax(dim=-1) < float("inf"))  # the maximum of a row holding NaN is NaN: not < inf
    if allowed is not None:
        bad |= allowed.detach().amax(dim=-1) == float("-inf")
    if bool((bad & live).any()):
        raise NonFiniteError()


def _check_hypotheses(hyps: list[list[Hypothesis]]) -> list[list[Hypothesis]]:
    """Every image has a hypothesis with a finite score (else its words were chosen from NaN, infinity, or
    from nothing but impossible words)."""
    bad = sum(1 for h in hyps if not h or not all(math.isfinite(x.score) and math.isfinite(x.norm_score)
                                                  for x in h))
    if bad:
        raise NonFiniteError(f" for {bad} of {len(hyps)} images")
    return hyps


def _expand(tensors: tuple[torch.Tensor, ...], k: int) -> tuple[torch.Tensor, ...]:
    return tuple(t.repeat_interleave(k, dim=0) for t in tensors)


def _select(tensors: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.index_select(0, index) for t in tensors)


def _per_row(model: Decoder, memory: tuple[torch.Tensor, ...], k: int) -> tuple[torch.Tensor, ...]:
    """The memory of a search whose images now have ``k`` rows each: the same (one row per image) for a model
    that shares it across an image's rows (``Decoder.shares_memory``), else each image's row repeated k times."""
    return memory if _shares(model) else _expand(memory, k)


def _leave(model: Decoder, memory: tuple[torch.Tensor, ...], images: torch.Tensor, rows: torch.Tensor
           ) -> tuple[torch.Tensor, ...]:
    """The memory of the ``images`` that stay in a search (``rows``: their rows when each row has its own)."""
    return _select(memory, images if _shares(model) else rows)


def _shares(model) -> bool:
    """Whether ``model`` shares an image's memory among its rows (a decoder that does not derive from
    :class:`Decoder`, only follows its step interface, does not)."""
    return bool(getattr(model, "shares_memory", False))


def _norm(score: float, length: int, length_penalty: float) -> float:
    return score / (max(length, 1) ** length_penalty) if length_penalty else score


def _ban(logp: torch.Tensor, banned: tuple[int, ...]) -> torch.Tensor:
    """The log-probabilities with the banned words (e.g. <unk>) made impossible to choose."""
    if not banned:
        return logp
    logp = logp.clone()
    logp[..., list(banned)] = float("-inf")
    return logp


def _block_repeats(logp: torch.Tensor, history: torch.Tensor, size: int) -> torch.Tensor:
    """``no_repeat_ngram``: each row's log-probabilities with -inf for the words that would complete an
    n-gram of ``size`` words its caption (a row of ``history``, (R, T) word ids) already holds
    ("on a skateboard on a skateboard")."""
    T = history.shape[1]
    if not size or T < size:
        return logp
    # every earlier window of size-1 words that equals the caption's last size-1 words bans the word after it
    earlier = history[:, :T - size + 1]
    match = torch.ones_like(earlier, dtype=torch.bool)
    for j in range(size - 1):
        match &= history[:, j:T - size + 1 + j] == history[:, T - size + 1 + j:T - size + 2 + j]
    rows, at = match.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return logp
    logp = logp.clone()
    logp[rows, history[rows, at + size - 1]] = float("-inf")
    return logp


def rollout(model: Decoder, memory, n: int, choose, *, start_id: int, end_id: int, max_len: int,
             banned: tuple[int, ...] = (), no_repeat_ngram: int = 0):
    """Run ``n`` captions one word at a time, ``choose(log_probs) -> words`` picking each word.

    Returns words (n, T), the summed log-probabilities of the chosen words (n,) and the
    attention of each step (list of (n, P) or None)."""
    state = model.init_state(memory)
    device = memory[0].device
    prev = torch.full((n,), start_id, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    scores = torch.zeros(n, device=device, dtype=torch.float64)  # summed as beam search sums
    words, atts = [], []
    for _ in range(max_len):
        logp, state, att = model.step(prev, state, memory)
        allowed = _ban(logp, banned)
        if no_repeat_ngram and words:
            allowed = _block_repeats(allowed, torch.stack(words, 1), no_repeat_ngram)
        _check_step(logp, ~done, allowed)
        word = torch.where(done, torch.full_like(prev, end_id), choose(allowed))
        scores += torch.where(done, torch.zeros_like(scores), logp.gather(1, word[:, None]).squeeze(1).double())
        words.append(word)
        atts.append(att)
        done = done | (word == end_id)  # not in place: SCST backpropagates through torch.where(done, ...)
        prev = word
        if bool(done.all()):
            break
    words_t = torch.stack(words, 1) if words else torch.empty(n, 0, dtype=torch.long, device=device)
    return words_t, scores, atts


def _hypothesis(seq: list[int], score: float, atts: list, row: int, end_id: int,
                length_penalty: float) -> Hypothesis:
    n = seq.index(end_id) if end_id in seq else len(seq)
    att = torch.stack([a[row] for a in atts[:n]]) if atts and atts[0] is not None and n else None
    finished = n < len(seq)
    return Hypothesis(seq[:n], score, _norm(score, n + 1 if finished else n, length_penalty), att, finished)


def _settings(settings: DecodingSettings | None, fields: dict[str, Any]) -> DecodingSettings:
    """``settings`` (default: the defaults) with ``fields`` overridden; not checked (the caller has)."""
    return dataclasses.replace(settings or DecodingSettings(), **fields)


@torch.inference_mode()
def greedy_search(model: Decoder, features: torch.Tensor, settings: DecodingSettings | None = None, *,
                  start_id: int, end_id: int, banned: tuple[int, ...] = (), **fields: Any) -> list[Hypothesis]:
    """Most probable word at every step. features (B, P, C) -> one hypothesis per image.

    ``banned`` word ids are never chosen, nor (``no_repeat_ngram`` = n > 0) a word that would repeat
    an n-gram of the caption; scores stay the model's own log-probabilities."""
    s = _settings(settings, fields)
    B = features.shape[0]
    words, scores, atts = rollout(model, model.encode(features), B, lambda logp: logp.argmax(dim=-1),
                                   start_id=start_id, end_id=end_id, max_len=s.max_len, banned=banned,
                                   no_repeat_ngram=s.no_repeat_ngram)
    return [_hypothesis(words[b].tolist(), float(scores[b]), atts, b, end_id, s.length_penalty) for b in range(B)]


@torch.inference_mode()
def beam_search(model: Decoder, features: torch.Tensor, settings: DecodingSettings | None = None, *,
                start_id: int, end_id: int, banned: tuple[int, ...] = (), **fields: Any) -> list[list[Hypothesis]]:
    """Batched beam search: all images and all beams advance together in one ``step`` call.

    Finished beams keep their score and stay in the beam (they only extend with <end> at no
    cost). An image leaves the batch when its result can no longer change: all its beams have
    finished (or, with no length penalty, its ``n_best`` best have); the search stops when every
    image has left or at ``max_len``.
    The final hypotheses are ranked by ``score / length ** length_penalty`` (length counts
    the <end> token; 0 = raw log-probability). ``no_repeat_ngram`` = n > 0: no beam repeats an n-gram.
    Returns ``n_best`` hypotheses per image.
    """
    s = _settings(settings, fields)
    k, max_len, length_penalty, n_best, no_repeat_ngram = (s.beam_size, s.max_len, s.length_penalty, s.n_best,
                                                          s.no_repeat_ngram)
    B, device = features.shape[0], features.device
    memory = model.encode(features)  # one row per image until the first step is taken
    state = model.init_state(memory)
    prev = torch.full((B,), start_id, dtype=torch.long, device=device)
    # summed in float64: a caption's score does not depend on how many images share the batch beyond rounding
    scores = torch.full((B, k), float("-inf"), device=device, dtype=torch.float64)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first step picks k distinct words
    finished = torch.zeros(B, k, dtype=torch.bool, device=device)
    history = torch.empty(B, k, 0, dtype=torch.long, device=device)
    att_hist = None
    alive = list(range(B))  # the images still searching, in the order of the working rows
    ended: dict[int, tuple] = {}  # image -> (scores (k,), history (k, T), attention (k, T, P) or None)

    def settled(i: int) -> tuple:  # working row i's image, as it leaves the search
        return scores[i], history[i], att_hist[i] if att_hist is not None else None

    for t in range(max_len):
        n = len(alive)
        logp, state, att = model.step(prev, state, memory)  # (n*k, V)
        if t == 0:  # an image's k beams start the same: its first step ran once, and now becomes k rows
            memory, state, logp = _per_row(model, memory, k), _expand(state, k), logp.repeat_interleave(k, dim=0)
            att = att.repeat_interleave(k, dim=0) if att is not None else None
        _check_step(logp, ~finished.view(-1))
        V = logp.shape[-1]
        logp = _ban(logp, banned)
        if no_repeat_ngram and t:
            logp = _block_repeats(logp, history.reshape(n * k, -1), no_repeat_ngram)
        logp = logp.view(n, k, V)
        # a finished beam may only "continue" with <end> at zero cost
        frozen = torch.full_like(logp[0, 0], float("-inf"))
        frozen[end_id] = 0.0
        logp = torch.where(finished.unsqueeze(-1), frozen, logp)
        cand = (scores.unsqueeze(-1) + logp.double()).view(n, k * V)
        top_scores, top_idx = cand.topk(k, dim=1)  # (n, k)
        beam_idx, word = top_idx // V, top_idx % V
        flat = (torch.arange(n, device=device).unsqueeze(1) * k + beam_idx).view(-1)
        state = _select(state, flat)
        history = torch.cat([history.gather(1, beam_idx.unsqueeze(-1).expand(-1, -1, history.shape[2])),
                             word.unsqueeze(-1)], dim=2)
        if att is not None:
            att_hist = _extend_attention(att_hist, att.view(n, k, -1), beam_idx)
        finished = finished.gather(1, beam_idx) | (word == end_id)
        scores = top_scores
        prev = word.view(-1)
        # an image is done when all its beams have ended; without a length penalty, already when its
        # n_best best beams have (the beams are sorted by score, and a beam's score only falls as it
        # grows, so nothing still running can pass them): the result is the same, sooner
        done = finished.all(dim=1) if length_penalty else finished[:, :n_best].all(dim=1)
        if bool(done.any()):
            # an image whose beams have all ended leaves the batch: the steps left run on fewer rows
            for i in done.nonzero().flatten().tolist():
                ended[alive[i]] = settled(i)
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                break
            alive = [alive[i] for i in keep.tolist()]
            rows = (keep.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
            memory, state = _leave(model, memory, keep, rows), _select(state, rows)
            scores, finished, history, prev = scores[keep], finished[keep], history[keep], prev[rows]
            att_hist = att_hist[keep] if att_hist is not None else None
    for i, b in enumerate(alive):
        if b not in ended:  # still searching at max_len
            ended[b] = settled(i)
    return [_ranked(*ended[b], end_id=end_id, length_penalty=length_penalty)[:n_best] for b in range(B)]


def _extend_attention(att_hist: torch.Tensor | None, att: torch.Tensor, beam_idx: torch.Tensor) -> torch.Tensor:
    """The attention history (n, k, T, P) of the beams chosen by ``beam_idx`` (n, k), with this step's
    attention ``att`` (n, k, P) of each chosen beam appended."""
    step_att = att.gather(1, beam_idx.unsqueeze(-1).expand(-1, -1, att.shape[-1]))
    if att_hist is None:
        return step_att.unsqueeze(2)
    idx = beam_idx[:, :, None, None].expand(-1, -1, att_hist.shape[2], att_hist.shape[3])
    return torch.cat([att_hist.gather(1, idx), step_att.unsqueeze(2)], dim=2)


def _ranked(scores: torch.Tensor, history: torch.Tensor, att: torch.Tensor | None, *, end_id: int,
            length_penalty: float) -> list[Hypothesis]:
    """One image's beams as hypotheses (scores (k,), history (k, T), attention (k, T, P) or None), best
    first by ``score / length ** length_penalty``; a beam that never got a word (score -inf) is left out."""
    hyps = []
    for j in range(len(scores)):
        if scores[j] == float("-inf"):
            continue
        seq = history[j].tolist()
        n = seq.index(end_id) if end_id in seq else len(seq)
        score = float(scores[j])
        hyps.append(Hypothesis(seq[:n], score, _norm(score, n + 1 if n < len(seq) else n, length_penalty),
                               att[j, :n] if att is not None and n else None, n < len(seq)))
    hyps.sort(key=lambda h: h.norm_score, reverse=True)
    return hyps


def _eval_mode(fn):
    """Run a search with the model in eval mode (no dropout, batch norm's running statistics) and
    give it back in the mode it was in."""

    def wrapper(model: Decoder, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            return fn(model, *args, **kwargs)
        finally:
            model.train(was_training)

    wrapper.__doc__, wrapper.__name__ = fn.__doc__, fn.__name__
    return wrapper


def image_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of the ``index``-th image of a run seeded with ``seed``."""
    return torch.Generator().manual_seed(hash((seed, index)) & (2 ** 63 - 1))


@_eval_mode
@torch.inference_mode()
def sample(model: Decoder, features: torch.Tensor, settings: DecodingSettings | None = None, *, start_id: int,
           end_id: int, banned: tuple[int, ...] = (), seed_offset: int = 0, **fields: Any) -> list[list[Hypothesis]]:
    """Draw ``num_captions`` captions per image from the model's distribution (system S3's decoding), seeded.

    With a ``seed``, image b draws from its own stream (``image_generator(seed, seed_offset + b)``),
    so its captions depend on the seed and its position only, not on the other images of the
    batch. Scores are the model's own log-probabilities of the drawn words (before temperature)."""
    s = _settings(settings, fields)
    temperature, top_k, top_p, num_samples, seed = s.temperature, s.top_k, s.top_p, s.num_captions, s.seed
    B = features.shape[0]
    gens = [image_generator(seed, seed_offset + b) for b in range(B)] if seed is not None else None

    def draw(logp: torch.Tensor) -> torch.Tensor:
        logits = logp / max(temperature, 1e-6)
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_l, order = logits.sort(dim=-1, descending=True)
            probs = sorted_l.softmax(-1)
            drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
            logits = logits.scatter(1, order, sorted_l.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1)
        if gens is None:
            return torch.multinomial(probs, 1).squeeze(1)
        # seeded: drawn on the CPU from each image's CPU stream, so a seed gives the same captions on any device
        cpu_probs = probs.float().cpu()
        return torch.cat([torch.multinomial(cpu_probs[b * num_samples:(b + 1) * num_samples], 1, generator=g)
                          for b, g in enumerate(gens)]).squeeze(1).to(probs.device)

    B = features.shape[0]
    memory = _expand(model.encode(features), num_samples)
    words, scores, atts = rollout(model, memory, B * num_samples, draw, start_id=start_id, end_id=end_id,
                                   max_len=s.max_len, banned=banned)
    out: list[list[Hypothesis]] = []
    for b in range(B):
        rows = range(b * num_samples, (b + 1) * num_samples)
        out.append([_hypothesis(words[i].tolist(), float(scores[i]), atts, i, end_id, 0.0) for i in rows])
    return out


@_eval_mode
def decode(model: Decoder, features: torch.Tensor, settings: DecodingSettings | None = None, *, start_id: int,
           end_id: int, banned: tuple[int, ...] = (), **fields: Any) -> list[list[Hypothesis]]:
    """Greedy when beam_size == 1 (exactly the beam-1 result), beam search otherwise."""
    s = _settings(settings, fields)
    if s.beam_size == 1:
        return [[h] for h in greedy_search(model, features, s, start_id=start_id, end_id=end_id, banned=banned)]
    return beam_search(model, features, s, start_id=start_id, end_id=end_id, banned=banned)


def generate(model: Decoder, vocab: Vocab, features: torch.Tensor, settings: DecodingSettings, *,
             seed_offset: int = 0) -> list[list[Hypothesis]]:
    """Hypotheses per image (features (B, P, C)) as ``settings`` say: the n best of a beam search, or
    ``num_captions`` samples (image b drawing from the stream of ``(seed, seed_offset + b)``); the
    vocabulary's special words (and <unk> unless allowed) are never output. Log-probabilities holding NaN or
    infinity (a damaged model) are a :class:`NonFiniteError`, never a caption with a NaN score."""
    ids = dict(start_id=vocab.start_id, end_id=vocab.end_id, banned=banned_ids(vocab, settings.allow_unk))
    if settings.sample:
        return _check_hypotheses(sample(model, features.float(), settings, seed_offset=seed_offset, **ids))
    return _check_hypotheses(decode(model, features.float(), settings, **ids))
