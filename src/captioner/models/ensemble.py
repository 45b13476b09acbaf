"""Several trained decoders decoded as one: at each step, the mean of the members' log-probabilities.

    memory = (memory of member 1) + (memory of member 2) + ...        each member's own tuple, concatenated
    state  = (state of member 1) + (state of member 2) + ...
    log p_ens(w | prefix, image) = 1/M sum_m log p_m(w | prefix, image)

The members share the vocabulary (the same word has the same id in every one) and the image encoder (one
pass of it serves them all: the grid the ensemble gets is the grid every member was trained on). The mean of
log-probabilities is the log of the members' geometric mean: a word must be likely for every member, as in the
product-of-experts ensembles of neural machine translation; it is not renormalised (its exponentials sum to at
most 1), so a caption's score is the members' mean score, and beam search, n-best lists, sampling (which
renormalises after its temperature) and guided search (:mod:`captioner.decoding.constrained`) run on it
unchanged: every tensor of ``memory`` and ``state`` is batch-first, which is all the engine asks to expand
and reorder them. The attention of a step is the mean of the maps of the members that attend (None when
none does).

Words added after training (:mod:`captioner.models.extension`) are per member: their rows are computed from
each member's own weights, so an :class:`EnsembleExtension` holds one :class:`VocabExtension` per member,
with the same words in the same order; the ensemble's extended view is the ensemble of the members' views.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from captioner.data.text import Vocab
from captioner.models.base import Decoder, DecoderOutput, Memory, State
from captioner.models.extension import (DEFAULT_VECTORS, ExtensionError, VocabExtension, extended_view,
                                        known_vectors, transfer)

MAX_MEMBERS = 16


class EnsembleExtension(VocabExtension):
    """The added words of an ensemble: one :class:`VocabExtension` per member (``parts``), each with its own rows
    for the same words in the same order. Read as a whole (words, index, neighbours) it is its first member's."""

    def __init__(self, parts: Sequence[VocabExtension]):
        parts = list(parts)
        if not parts:
            raise ExtensionError("an ensemble's extension needs one part per member")
        for k, part in enumerate(parts[1:], 2):
            if part.words != parts[0].words:
                raise ExtensionError(f"member {k} adds the words {part.words[:5]}, member 1 {parts[0].words[:5]}: "
                                     "every member must add the same words in the same order")
        first = parts[0]
        super().__init__(list(first.words), first.embed, first.out_weight, first.out_bias, first.vectors,
                         dict(first.neighbours))
        self.parts = parts

    def merged(self, other: VocabExtension) -> VocabExtension:
        if not len(other):
            return self
        if not isinstance(other, EnsembleExtension) or len(other.parts) != len(self.parts):
            raise ExtensionError("words added to an ensemble need rows for each of its members")
        return EnsembleExtension([a.merged(b) for a, b in zip(self.parts, other.parts)])


def _split(tensors: tuple[torch.Tensor, ...], sizes: Sequence[int]) -> list[tuple[torch.Tensor, ...]]:
    out, at = [], 0
    for n in sizes:
        out.append(tuple(tensors[at:at + n]))
        at += n
    if at != len(tensors):
        raise ValueError(f"an ensemble's tuple holds {len(tensors)} tensors, its members' {at}")
    return out


class Ensemble(Decoder):
    """Member decoders (sharing a vocabulary and an encoder) decoded as one; see the module's docstring.

    ``member_configs`` (optional) are the members' config.json contents and ``member_names`` their folders, kept
    so that the ensemble can be written again as a model directory; ``loaded_extension`` is the extension its
    loader read from the members' directories (None when they add no words)."""

    arch_name = "ensemble"

    def __init__(self, members: Sequence[Decoder], member_configs: Sequence[dict] | None = None):
        super().__init__()
        members = list(members)
        if not 1 <= len(members) <= MAX_MEMBERS:
            raise ValueError(f"an ensemble has 1 to {MAX_MEMBERS} members, got {len(members)}")
        if any(isinstance(m, Ensemble) for m in members):
            raise ValueError("an ensemble's members must be single models, not ensembles")
        self.members = nn.ModuleList(members)
        self.member_configs = list(member_configs) if member_configs is not None else [{} for _ in members]
        self.member_names = [f"members/{k}" for k in range(len(members))]  # their folders in a model directory
        self.has_attention = any(m.has_attention for m in members)
        self.shares_memory = all(m.shares_memory for m in members)  # the engine keeps one memory for them all
        self.loaded_extension: EnsembleExtension | None = None
        # how many tensors each member's memory and state tuples hold (fixed per member: set on first use)
        self._memory_sizes: list[int] | None = None
        self._state_sizes: list[int] | None = None

    def __len__(self) -> int:
        return len(self.members)

    # --- the step interface used by the decoding engine ---

    def encode(self, features: torch.Tensor) -> Memory:
        parts = [m.encode(features) for m in self.members]
        self._memory_sizes = [len(p) for p in parts]
        return tuple(t for p in parts for t in p)

    def _memories(self, memory: Memory) -> list[Memory]:
        if self._memory_sizes is None:
            raise RuntimeError("Ensemble: encode() must run before init_state() and step()")
        return _split(memory, self._memory_sizes)

    def init_state(self, memory: Memory) -> State:
        parts = [m.init_state(mem) for m, mem in zip(self.members, self._memories(memory))]
        self._state_sizes = [len(p) for p in parts]
        return tuple(t for p in parts for t in p)

    def step(self, prev_tokens: torch.Tensor, state: State, memory: Memory):
        if self._state_sizes is None:
            raise RuntimeError("Ensemble: init_state() must run before step()")
        total, new_state, maps = None, [], []
        for m, s, mem in zip(self.members, _split(state, self._state_sizes), self._memories(memory)):
            logp, s, att = m.step(prev_tokens, s, mem)  # each member's log-softmax
            total = logp if total is None else total + logp
            new_state.extend(s)
            if att is not None:
                maps.append(att)
        return total / len(self.members), tuple(new_state), _mean(maps)

    # --- teacher forcing (scoring given captions; an ensemble is not trained as one) ---

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> DecoderOutput:
        """The mean of the members' log-probabilities of each target word (as ``logits``: a softmax of them
        gives the renormalised ensemble distribution), and the mean attention of the members that attend."""
        outs = [m(features, tokens, lengths) for m in self.members]
        logp = torch.stack([F.log_softmax(o.logits.float(), dim=-1) for o in outs]).mean(dim=0)
        return DecoderOutput(logits=logp, attention=_mean([o.attention for o in outs if o.attention is not None]))

    # --- words added after training: each member's own rows ---

    def transfer_words(self, vocab: Vocab, words: list[str], *, vectors: str = DEFAULT_VECTORS) -> EnsembleExtension:
        """:func:`captioner.models.extension.transfer` for each member (its rows from its own weights)."""
        known = known_vectors(vocab, vectors) if words else None
        return EnsembleExtension([transfer(m, vocab, words, vectors=vectors, known=known) for m in self.members])

    def extended(self, ext: VocabExtension, rows: torch.Tensor) -> "Ensemble":
        """:func:`captioner.models.extension.extended_view` of each member with its own part of ``ext``."""
        if not isinstance(ext, EnsembleExtension) or len(ext.parts) != len(self.members):
            raise ExtensionError("an ensemble's added words need rows for each of its members")
        view = Ensemble([extended_view(m, part, rows) for m, part in zip(self.members, ext.parts)],
                        self.member_configs)
        view.member_names = self.member_names
        view.training = self.training  # the members' views are already in this mode (they share its modules)
        return view


def _mean(maps: list[torch.Tensor]) -> torch.Tensor | None:
    if not maps:
        return None
    return maps[0] if len(maps) == 1 else torch.stack(maps).mean(dim=0)


def _reordered(ext: VocabExtension, words: list[str]) -> VocabExtension:
    """``ext`` (holding every word of ``words``) restricted to ``words``, in that order."""
    if ext.words == words:
        return ext
    idx = torch.tensor([ext.index[w] for w in words], dtype=torch.long)
    return VocabExtension(list(words), ext.embed[idx], ext.out_weight[idx], ext.out_bias[idx], ext.vectors,
                          {w: ext.neighbours.get(w, []) for w in words})


def harmonised(members: Sequence[Decoder], parts: Sequence[VocabExtension | None], vocab: Vocab
               ) -> EnsembleExtension | None:
    """One extension for the ensemble from its members' own (None: a member adds no word): every member gets
    every word any member adds, in the order they first appear; a word a member lacks gets that member's rows
    from the word vectors (:func:`transfer`: ExtensionError or WordVectorError when it cannot). None when no
    member adds a word."""
    parts = [p if p is not None else VocabExtension.empty() for p in parts]
    words = list(dict.fromkeys(w for p in parts for w in p.words))
    if not words:
        return None
    kinds = {p.vectors for p in parts if len(p)}
    if len(kinds) > 1:
        raise ExtensionError(f"the members' added words come from different word vectors ({', '.join(sorted(kinds))})")
    vectors = kinds.pop()
    out = []
    for member, part in zip(members, parts):
        missing = [w for w in words if w not in part.index]
        if missing:
            part = part.merged(transfer(member, vocab, missing, vectors=vectors))
        out.append(_reordered(part, words))
    return EnsembleExtension(out)
