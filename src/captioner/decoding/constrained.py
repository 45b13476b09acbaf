"""Constrained beam search (Anderson et al., 2017): captions that must hold given words, for every architecture.

Each image brings up to G *groups* of word ids; a caption satisfies a group when it holds any one of its words
("cat" or "cats"). The search is a finite-state machine over which groups are satisfied so far: a state is a
bit mask (bit g set: group g is in the caption), there are S = 2**G states, and each state keeps its own beam
of k hypotheses. At every step each hypothesis of state s extended by word w lands in state ``s | bits(w)``;
every state keeps the k best candidates that land in it, from whichever state they came. The answer is the
best hypotheses of the full state (every group satisfied), ranked as :func:`~captioner.decoding.search.beam_search`
ranks them. The words are placed where the model scores them best and the scores are the model's own
log-probabilities: nothing is pasted onto a caption.

All images and all S x k hypotheses advance in one ``step`` call per word, like the unconstrained search.
An image with fewer groups than the batch's most starts in the state where the groups it lacks are set.
If no hypothesis of an image reaches the full state within ``max_len`` words (a word that no-repeat n-grams or
banned words make unreachable), its hypotheses with the most groups satisfied are returned.
"""

from __future__ import annotations

import torch

from captioner.decoding.search import (Hypothesis, _ban, _block_repeats, _check_step, _expand, _extend_attention,
                                       _check_hypotheses, _eval_mode, _leave, _per_row, _ranked, _select,
                                       _settings, _shares)
from captioner.decoding.settings import DecodingSettings
from captioner.models.base import Decoder

Groups = list[list[int]]  # one image's constraints: groups of word ids, one word of each must be in the caption


def _group_bits(groups: list[Groups], vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(bits (B, V) long: the groups each word satisfies, as a bit mask; start state of each image (B,); G)."""
    G = max((len(g) for g in groups), default=0)
    bits = torch.zeros(len(groups), vocab_size, dtype=torch.long, device=device)
    start = torch.zeros(len(groups), dtype=torch.long, device=device)
    for b, image_groups in enumerate(groups):
        for g, ids in enumerate(image_groups):
            bits[b, torch.tensor(sorted(set(ids)), dtype=torch.long, device=device)] |= 1 << g
        start[b] = ((1 << G) - 1) ^ ((1 << len(image_groups)) - 1)  # the groups an image lacks count as satisfied
    return bits, start, G


@_eval_mode
@torch.inference_mode()
def constrained_beam_search(model: Decoder, features: torch.Tensor, groups: list[Groups],
                            settings: DecodingSettings | None = None, *, start_id: int, end_id: int,
                            banned: tuple[int, ...] = (), banned_rows: torch.Tensor | None = None,
                            absent_rows: torch.Tensor | None = None, **fields) -> list[list[Hypothesis]]:
    """The ``n_best`` best hypotheses per image (features (B, P, C)) holding a word of each of its ``groups``.

    ``banned`` words are never chosen; ``banned_rows`` (B, V) bool bans words per image (words a model can
    say only when asked to). ``absent_rows`` (B, V) bool: words outside an image's vocabulary (words added for
    other images of the batch): its log-probabilities are renormalised without them, as if the model's output
    layer had no such rows, and they are never chosen; for a model whose step is one log-softmax over its words
    (not an ensemble's mean of several), images that add different words are then searched together as each
    would be alone (up to float rounding). Settings as for :func:`~captioner.decoding.search.beam_search`. An
    image leaves the batch when every hypothesis of its full state has ended (or every hypothesis at all has)."""
    s = _settings(settings, fields)
    k, lp, no_repeat = s.beam_size, s.length_penalty, s.no_repeat_ngram
    B, device = features.shape[0], features.device
    memory = model.encode(features.float())
    logp, state, att = model.step(torch.full((B,), start_id, dtype=torch.long, device=device),
                                  model.init_state(memory), memory)
    if absent_rows is not None:  # one row per image at the first step; one per working row from then on
        logp = _without(logp, absent_rows)
    V = logp.shape[-1]
    bits, start, G = _group_bits(groups, V, device)
    S, alive = 1 << G, list(range(B))  # alive: the images still searching, in the order of the working rows
    R = S * k  # rows per image: state s, beam j is row s*k + j; every row of an image starts the same
    row_state = torch.arange(S, device=device).repeat_interleave(k)  # (R,)
    memory, state, logp = _per_row(model, memory, R), _expand(state, R), logp.repeat_interleave(R, dim=0)
    att = att.repeat_interleave(R, dim=0) if att is not None else None
    absent = absent_rows.repeat_interleave(R, dim=0) if absent_rows is not None else None
    scores = torch.full((B, R), float("-inf"), device=device, dtype=torch.float64)
    scores[torch.arange(B, device=device), start * k] = 0.0
    finished = torch.zeros(B, R, dtype=torch.bool, device=device)
    history = torch.empty(B, R, 0, dtype=torch.long, device=device)
    att_hist = None
    ended: dict[int, tuple] = {}
    for t in range(s.max_len):
        if t:
            logp, state, att = model.step(prev, state, memory)
            if absent is not None:
                logp = _without(logp, absent)
        n = len(alive)
        _check_step(logp, (~finished & (scores > float("-inf"))).view(-1))
        logp = _ban(logp, banned)
        if banned_rows is not None:
            logp = logp.masked_fill(banned_rows.repeat_interleave(R, dim=0), float("-inf"))
        if no_repeat and t:
            logp = _block_repeats(logp, history.reshape(n * R, -1), no_repeat)
        logp = logp.view(n, R, V)
        frozen = torch.full_like(logp[0, 0], float("-inf"))
        frozen[end_id] = 0.0  # a finished hypothesis only "continues" with <end>, at no cost, in its own state
        cand = scores.unsqueeze(-1) + torch.where(finished.unsqueeze(-1), frozen, logp).double()  # (n, R, V)
        lands = row_state.view(1, R, 1) | bits.unsqueeze(1)  # (n, R, V): the state each candidate lands in
        best = [cand.masked_fill(lands != target, float("-inf")).view(n, R * V).topk(k, dim=1) for target in range(S)]
        scores = torch.cat([b.values for b in best], dim=1)  # (n, R), state-major
        top_idx = torch.cat([b.indices for b in best], dim=1)
        src, word = top_idx // V, top_idx % V
        state = _select(state, (torch.arange(n, device=device).unsqueeze(1) * R + src).view(-1))
        history = torch.cat([history.gather(1, src.unsqueeze(-1).expand(-1, -1, history.shape[2])),
                             word.unsqueeze(-1)], dim=2)
        if att is not None:
            att_hist = _extend_attention(att_hist, att.view(n, R, -1), src)
        finished = finished.gather(1, src) | (word == end_id)
        prev = word.view(-1)
        dead = finished | (scores == float("-inf"))
        done = (finished[:, R - k:] & (scores[:, R - k:] > float("-inf"))).all(dim=1) | dead.all(dim=1)
        for i in done.nonzero().flatten().tolist():
            if alive[i] not in ended:
                ended[alive[i]] = (scores[i], history[i], att_hist[i] if att_hist is not None else None)
        if bool(done.all()):
            break
        # the images that are done leave the batch, the steps left running on fewer rows; a model that keeps a copy
        # of an image's memory per row (not shares_memory) holds S*k of them, so its batch is compacted only once a
        # quarter of it is done
        if bool(done.any()) if _shares(model) else int(done.sum()) * 4 >= n:
            keep = (~done).nonzero().flatten()
            alive = [alive[i] for i in keep.tolist()]
            rows = (keep.unsqueeze(1) * R + torch.arange(R, device=device)).view(-1)
            memory, state, prev = _leave(model, memory, keep, rows), _select(state, rows), prev[rows]
            scores, finished, history, bits = scores[keep], finished[keep], history[keep], bits[keep]
            att_hist = att_hist[keep] if att_hist is not None else None
            banned_rows = banned_rows[keep] if banned_rows is not None else None
            absent = absent[rows] if absent is not None else None
    for i, b in enumerate(alive):
        ended.setdefault(b, (scores[i], history[i], att_hist[i] if att_hist is not None else None))
    return _check_hypotheses([_best_of(*ended[b], row_state, S - 1, end_id=end_id, length_penalty=lp)[:s.n_best]
                              for b in range(B)])


def _without(logp: torch.Tensor, absent: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (rows, V) renormalised over each row's words that are not ``absent`` (rows, V), which
    become impossible (a row holding NaN or infinity stays non-finite, for the step's check to name)."""
    logp = logp.masked_fill(absent, float("-inf"))
    return logp - logp.logsumexp(dim=-1, keepdim=True)


def _best_of(scores: torch.Tensor, history: torch.Tensor, att: torch.Tensor | None, row_state: torch.Tensor,
             full: int, *, end_id: int, length_penalty: float) -> list[Hypothesis]:
    """One image's hypotheses of the state with the most groups satisfied that has any (the full state when
    the search reached it), best first by ``score / length ** length_penalty``."""
    reached = scores > float("-inf")
    counts = torch.tensor([bin(int(x)).count("1") for x in row_state.tolist()], device=scores.device)
    best_count = int(counts[reached].max()) if bool(reached.any()) else 0
    keep = reached & (counts == best_count) if best_count < bin(full).count("1") else reached & (row_state == full)
    rows = keep.nonzero().flatten()
    return _ranked(scores[rows], history[rows], att[rows] if att is not None else None, end_id=end_id,
                   length_penalty=length_penalty)
