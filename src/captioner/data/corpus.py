"""The caption corpus: images with their reference captions, split into train/val/test, and the
validation report of how it was read. Saved as ``corpus.json`` by ``captioner prepare``.

The readers of the dataset formats (Flickr8k text files, Karpathy JSON, Kaggle CSV, COCO
``captions_*.json``, your own CSV/JSONL) are in :mod:`captioner.data.readers`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from captioner.checks import is_int
from captioner.data.text import read_json_file, write_json_atomic

SPLITS: tuple[str, ...] = ("train", "val", "test")
KNOWN_SPLITS: tuple[str, ...] = (*SPLITS, "restval")
# train/val/test shares of the hash split, for sources that have no split of their own
Ratios = tuple[float, float, float]
DEFAULT_RATIOS: Ratios = (0.9, 0.05, 0.05)

CORPUS_FORMAT = "captioner-corpus"
CORPUS_VERSION = 1

PathLike = str | os.PathLike[str]


class CorpusError(ValueError):
    """A caption source cannot be read, or (strict mode) has problems.

    ``problems`` holds one line per problem when there are several.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass
class Item:
    """One image with its captions."""

    image: str  # path relative to Corpus.image_root, "/"-separated
    split: str  # "train" | "val" | "test" (or "restval" when kept)
    captions: list[str]  # raw text, stripped
    tokens: list[list[str]]  # tokenize(caption) for each caption

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready representation."""
        return {
            "image": self.image,
            "split": self.split,
            "captions": list(self.captions),
            "tokens": [list(t) for t in self.tokens],
        }


@dataclass
class ValidationReport:
    """What a reader found; the lists name the entries that were skipped.

    Caption and line entries read ``"<where>: <what is wrong>"`` where
    ``<where>`` is ``file:line``, ``file: images[i]`` or ``image#i``.
    """

    images_per_split: dict[str, int] = field(default_factory=dict)
    captions_per_image: dict[str, int] = field(default_factory=dict)  # {"5": 7990, ...}
    missing_images: list[str] = field(default_factory=list)  # not on disk: skipped
    unreadable_images: list[str] = field(default_factory=list)  # empty / not a file: skipped
    uncaptioned_images: list[str] = field(default_factory=list)  # no usable caption: skipped
    unsplit_images: list[str] = field(default_factory=list)  # in no split file: dropped (info)
    empty_captions: list[str] = field(default_factory=list)  # skipped
    duplicate_captions: list[str] = field(default_factory=list)  # reported; all kept unless dedupe=True
    malformed_lines: list[str] = field(default_factory=list)  # skipped

    @property
    def skipped_images(self) -> list[str]:
        """Every image that had captions or a split entry but is not in the corpus."""
        return [
            *self.missing_images,
            *self.unreadable_images,
            *self.uncaptioned_images,
            *self.unsplit_images,
        ]

    def problems(self) -> list[str]:
        """One line per problem (images in no split are not problems)."""
        out = [f"{name}: image file not found (skipped)" for name in self.missing_images]
        out += [
            f"{name}: image file is empty or not a regular file (skipped)"
            for name in self.unreadable_images
        ]
        out += [f"{name}: no usable caption (skipped)" for name in self.uncaptioned_images]
        out += self.malformed_lines
        out += self.empty_captions
        out += self.duplicate_captions
        return out

    def skipped_count(self) -> int:
        """How many entries were left out because something was wrong with them.

        Duplicate captions (kept, or dropped on request) and images in no split are not counted."""
        return (len(self.missing_images) + len(self.unreadable_images) + len(self.uncaptioned_images)
                + len(self.malformed_lines) + len(self.empty_captions))

    def summary(self, examples: int = 3) -> str:
        """Human-readable multi-line summary with a few examples per problem kind."""
        n_images = sum(self.images_per_split.values())
        n_captions = sum(int(k) * v for k, v in self.captions_per_image.items())
        splits = ", ".join(f"{s} {n}" for s, n in self.images_per_split.items()) or "none"
        hist = ", ".join(
            f"{v} images with {k}"
            for k, v in sorted(self.captions_per_image.items(), key=lambda kv: -int(kv[0]))
        )
        lines = [
            f"images: {n_images} ({splits})",
            f"captions: {n_captions}" + (f" ({hist})" if hist else ""),
        ]
        groups: list[tuple[str, list[str]]] = [
            ("images missing on disk (skipped)", self.missing_images),
            ("unreadable images (skipped)", self.unreadable_images),
            ("images without a usable caption (skipped)", self.uncaptioned_images),
            ("images in no split (dropped)", self.unsplit_images),
            ("malformed lines/entries (skipped)", self.malformed_lines),
            ("empty captions (skipped)", self.empty_captions),
            ("duplicate captions", self.duplicate_captions),
        ]
        for label, entries in groups:
            lines.append(f"{label}: {len(entries)}")
            lines += [f"    {e}" for e in entries[:examples]]
            if len(entries) > examples:
                lines.append(f"    ... and {len(entries) - examples} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready representation."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ValidationReport:
        """Inverse of :meth:`to_dict`; raises ValueError on a wrong shape."""
        if not isinstance(data, dict):
            raise ValueError("'report' must be an object")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name in ("images_per_split", "captions_per_image"):
                ok = isinstance(value, dict) and all(
                    isinstance(k, str) and is_int(v) for k, v in value.items()
                )
            else:
                ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            if not ok:
                raise ValueError(f"report field {f.name!r} has the wrong type")
            kwargs[f.name] = value
        return cls(**kwargs)


@dataclass
class Corpus:
    """Images with captions, split into train/val/test, plus the validation report."""

    name: str
    image_root: Path
    items: list[Item]
    report: ValidationReport = field(default_factory=ValidationReport)
    vocab_sha256: str | None = None  # `captioner prepare`: the vocabulary prepared with it (prepare.vocab_digest)

    def splits(self) -> dict[str, list[Item]]:
        """Items per split; train/val/test are always present (possibly empty)."""
        out: dict[str, list[Item]] = {s: [] for s in SPLITS}
        for item in self.items:
            out.setdefault(item.split, []).append(item)
        return out

    def split(self, name: str) -> list[Item]:
        """Items of one split (in corpus order)."""
        groups = self.splits()
        if name not in groups and name not in KNOWN_SPLITS:
            raise ValueError(f"unknown split {name!r}; known splits: {', '.join(groups)}")
        return groups.get(name, [])

    def images(self, splits: Collection[str] | None = None) -> list[str]:
        """Image names of the items in ``splits`` (every item when None), in corpus order."""
        return [it.image for it in self.items if splits is None or it.split in splits]

    def image_path(self, item: Item | str) -> Path:
        """Full path of an item's image."""
        return self.image_root / (item.image if isinstance(item, Item) else item)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready representation (the corpus.json content)."""
        return {
            "format": CORPUS_FORMAT,
            "version": CORPUS_VERSION,
            "name": self.name,
            "image_root": str(Path(self.image_root).expanduser().absolute()),
            "items": [item.to_dict() for item in self.items],
            "report": self.report.to_dict(),
            **({"vocab_sha256": self.vocab_sha256} if self.vocab_sha256 else {}),
        }

    def save(self, path: PathLike) -> None:
        """Write corpus.json (atomically)."""
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: PathLike) -> Corpus:
        """Read and validate a corpus.json; CorpusError names the file and the problem."""
        path = Path(path)
        try:
            data = read_json_file(path, what="corpus")
        except ValueError as e:
            raise CorpusError(str(e)) from None

        def fail(problem: str) -> CorpusError:
            return CorpusError(f"{path}: not a valid corpus file: {problem}")

        if not isinstance(data, dict):
            raise fail("expected a JSON object")
        if data.get("format") != CORPUS_FORMAT:
            raise fail(f"'format' is {data.get('format')!r}, expected {CORPUS_FORMAT!r}")
        if data.get("version") != CORPUS_VERSION:
            raise fail(
                f"'version' is {data.get('version')!r}, this code reads version {CORPUS_VERSION}"
            )
        name, root, raw_items = data.get("name"), data.get("image_root"), data.get("items")
        if not isinstance(name, str):
            raise fail("'name' must be a string")
        if not isinstance(root, str) or not root:
            raise fail("'image_root' must be a non-empty string")
        if not isinstance(raw_items, list):
            raise fail("'items' must be a list")
        items: list[Item] = []
        for i, raw in enumerate(raw_items):
            problem = _item_problem(raw)
            if problem:
                raise fail(f"items[{i}]: {problem}")
            items.append(
                Item(raw["image"], raw["split"], list(raw["captions"]), list(raw["tokens"]))
            )
        try:
            report = ValidationReport.from_dict(data.get("report", {}))
        except ValueError as e:
            raise fail(str(e)) from None
        digest = data.get("vocab_sha256")
        if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
            raise fail("'vocab_sha256' must be the SHA-256 of a vocabulary (64 hex digits)")
        return cls(name=name, image_root=Path(root), items=items, report=report, vocab_sha256=digest)


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _item_problem(raw: object) -> str | None:
    """Describe what is wrong with a stored item, or None."""
    if not isinstance(raw, dict):
        return "expected an object"
    if not isinstance(raw.get("image"), str) or not raw["image"]:
        return "'image' must be a non-empty string"
    if raw.get("split") not in KNOWN_SPLITS:
        return f"'split' is {raw.get('split')!r}, expected one of {', '.join(KNOWN_SPLITS)}"
    captions, tokens = raw.get("captions"), raw.get("tokens")
    if not _is_str_list(captions):
        return "'captions' must be a list of strings"
    if not isinstance(tokens, list) or not all(_is_str_list(t) for t in tokens):
        return "'tokens' must be a list of lists of strings"
    if len(tokens) != len(captions):
        return f"{len(captions)} captions but {len(tokens)} token lists"
    return None


# --------------------------------------------------------------------------- splits


def hash_split(name: str, ratios: Sequence[float] = DEFAULT_RATIOS, seed: int = 0) -> str:
    """Deterministic train/val/test assignment from a SHA-256 hash of ``name``."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"ratios must be 3 non-negative numbers with a positive sum, got {ratios}")
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    total = float(sum(ratios))
    edge = 0.0
    for split, ratio in zip(SPLITS, ratios):
        edge += ratio / total
        if ratio > 0 and u < edge:
            return split
    return [s for s, r in zip(SPLITS, ratios) if r > 0][-1]  # float rounding at the top


def all_tokens(items: Iterable[Item]) -> Iterable[list[str]]:
    """Every caption's tokens, e.g. for ``Vocab.build(all_tokens(corpus.split("train")))``."""
    for item in items:
        yield from item.tokens
